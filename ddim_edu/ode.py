"""The ODE view (Section 4.3): Eq 14, ``dx̄/dσ = ε_θ(x̄ / sqrt(σ² + 1), t(σ))``.

One state space for every ODE method: ``x̄ = x / sqrt(ᾱ)`` and the noise level
``σ = sqrt((1-ᾱ)/ᾱ)`` (:meth:`Schedule.sigma`; σ = 0 is clean data). In it ``x̄ = x_0 + σ ε``,
so the x_0 prediction of Eq 9 is ``x̄ - σ ε_θ`` and Eq 14's right-hand side is ε_θ itself.
Models keep their native contract ``model(x, t)``: :func:`eps_at_sigma` converts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import Model, call_model
from .schedules import Schedule


def eps_at_sigma(model: Model, schedule: Schedule, x_bar: Tensor, sigma: float) -> Tensor:
    """ε_θ at noise level σ for the scaled state x̄: the model sees ``x = x̄ / sqrt(σ²+1)`` at ``t(σ)``."""
    t = schedule.t_from_sigma(torch.tensor(float(sigma), dtype=torch.float64))
    if -1e-9 < t < 0:  # σ(0) itself, up to rounding in the inverse
        t = torch.zeros((), dtype=torch.float64)
    if not bool(t >= 0):
        raise ValueError(f"sigma={sigma!r} lies below the schedule's smallest noise level σ(0); the model is not defined there")
    x = x_bar / (sigma**2 + 1) ** 0.5
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return call_model(model, x, torch.full((x.shape[0],), t.item(), dtype=dtype, device=x.device), t.item())


def probability_flow(model: Model, schedule: Schedule):
    """Eq 14 as a vector field ``f(σ, x̄) -> dx̄/dσ`` in torchdiffeq's ``func(t, y)`` shape.

    Integrate it with ``torchdiffeq.odeint(f, x_T * sqrt(1 + σ_max²), torch.tensor([σ_max, σ_min]))``
    for sampling, or from σ_min up to σ_max for encoding. ``f.nfe`` counts its evaluations.
    """

    def f(sigma: Tensor, x_bar: Tensor) -> Tensor:
        f.nfe += 1
        return eps_at_sigma(model, schedule, x_bar, float(sigma))

    f.nfe = 0
    return f
