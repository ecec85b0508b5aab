"""The ODE view (Section 4.3): Eq 14, ``dx̄/dσ = ε_θ(x̄ / sqrt(σ² + 1), t(σ))``.

One state space for every ODE method: ``x̄ = x / sqrt(ᾱ)`` and the noise level
``σ = sqrt((1-ᾱ)/ᾱ)`` (:meth:`Schedule.sigma`; σ = 0 is clean data). In it ``x̄ = x_0 + σ ε``,
so the x_0 prediction of Eq 9 is ``x̄ - σ ε_θ`` and Eq 14's right-hand side is ε_θ itself.
Models keep their native contract ``model(x, t)``; :mod:`ddim_edu.model` converts.
"""
from __future__ import annotations

from torch import Tensor

from .model import Model, eps_at_sigma
from .schedules import Schedule

__all__ = ["probability_flow"]


def probability_flow(model: Model, schedule: Schedule, *, check_finite: bool = False):
    """Eq 14 as a vector field ``f(σ, x̄) -> dx̄/dσ`` in torchdiffeq's ``func(t, y)`` shape.

    Integrate it with ``torchdiffeq.odeint(f, x_T * sqrt(1 + σ_max²), span, options={"step_t": span})``,
    ``span = torch.tensor([σ_max, σ_min])``, for sampling, or from σ_min up to σ_max for encoding
    (``step_t`` stops adaptive solvers from stepping past the end, where the model is not defined).
    ``f.nfe`` counts its evaluations; with ``check_finite`` a NaN or inf in ε raises FloatingPointError.
    """

    def f(sigma: Tensor, x_bar: Tensor) -> Tensor:
        f.nfe += 1
        return eps_at_sigma(model, schedule, x_bar, float(sigma), check_finite=check_finite)

    f.nfe = 0
    return f
