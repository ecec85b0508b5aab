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
    lo, hi = schedule.sigma_range
    # The ends themselves, up to float32 rounding (solvers cast time to the state's dtype).
    sigma_t = min(max(float(sigma), lo), hi) if lo * (1 - 1e-6) <= sigma <= hi * (1 + 1e-6) else float(sigma)
    if not lo <= sigma_t <= hi:
        raise ValueError(
            f"sigma={sigma!r} lies outside the schedule's noise levels [σ(0), σ(T-1)] = [{lo:.6g}, {hi:.6g}]; "
            "the model is not defined there"
        )
    t = schedule.t_from_sigma(torch.tensor(sigma_t, dtype=torch.float64)).clamp(0, schedule.T - 1)
    x = x_bar / (sigma**2 + 1) ** 0.5
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return call_model(model, x, torch.full((x.shape[0],), t.item(), dtype=dtype, device=x.device), t.item())


def probability_flow(model: Model, schedule: Schedule):
    """Eq 14 as a vector field ``f(σ, x̄) -> dx̄/dσ`` in torchdiffeq's ``func(t, y)`` shape.

    Integrate it with ``torchdiffeq.odeint(f, x_T * sqrt(1 + σ_max²), span, options={"step_t": span})``,
    ``span = torch.tensor([σ_max, σ_min])``, for sampling, or from σ_min up to σ_max for encoding
    (``step_t`` stops adaptive solvers from stepping past the end, where the model is not defined).
    ``f.nfe`` counts its evaluations.
    """

    def f(sigma: Tensor, x_bar: Tensor) -> Tensor:
        f.nfe += 1
        return eps_at_sigma(model, schedule, x_bar, float(sigma))

    f.nfe = 0
    return f
