"""Round trips x_0 → x_T → x_0 (the paper's Table 2, Section 5.4) and the monotonicity of the step they hinge on.

:func:`round_trip` encodes a batch with :func:`ddim_edu.solvers.encode` (explicit or exact inversion)
and decodes it with :func:`ddim_edu.solvers.sample` on the same timesteps. Where an exact encode does
not converge for some samples it keeps the others (``converged``) and the first failed step's message.
:func:`second_step_monotonicity` measures, at each sample's explicit encode, how monotone DDIM's step
τ_2 → τ_1 is (:func:`ddim_edu.solvers.step_monotonicity`): with the exact ε at least ρ = σ(τ_1)/σ(τ_2),
which makes exact inversion's hardest step, the long one up from σ(τ_1), have one answer.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ddim_edu.schedules import Schedule
from ddim_edu.solvers import ConvergenceError, encode, sample, step_monotonicity

__all__ = ["round_trip", "second_step_monotonicity"]


def round_trip(model, schedule: Schedule, x0: Tensor, timesteps, method: str = "euler", *, inversion: str = "explicit",
               tol: float | None = None, max_iterations: int = 200) -> dict:
    """Encode ``x0`` [B, …] with ``method`` and ``inversion`` on ``timesteps``, decode with the same method.

    Returns a dict: ``x_T`` and ``x0_back`` [B, …]; ``mse`` [B], each sample's mean squared error per
    dimension in the data's units (pixels in [-1, 1]: divide by 4 for pixels in [0, 1]); ``converged``
    [B] (bool: all true unless the encode raised :class:`~ddim_edu.solvers.ConvergenceError`, whose
    result is kept); ``failure``, that error's first step and residual, or None; ``nfe``, the encode's
    model evaluations; ``iterations``, those of its fixed-point solves (see :func:`~ddim_edu.solvers.encode`).
    """
    stats = {}
    try:
        x_T = encode(model, x0, schedule, timesteps, method, inversion=inversion, tol=tol,
                     max_iterations=max_iterations, stats=stats)
        converged, failure = torch.ones(len(x0), dtype=torch.bool, device=x0.device), None
    except ConvergenceError as err:
        if err.x is None:
            raise
        x_T, converged, failure = err.x, err.converged, str(err).split(";")[0]  # the step, and the residual
    x0_back = sample(model, x_T, schedule, timesteps, method)
    mse = (x0_back - x0).pow(2).flatten(1).mean(1)
    return {"x_T": x_T, "x0_back": x0_back, "mse": mse, "converged": converged, "failure": failure, **stats}


def second_step_monotonicity(model, schedule: Schedule, x0: Tensor, timesteps) -> tuple[float, Tensor]:
    """(ρ, smallest eigenvalue [B]): ρ = σ(τ_1)/σ(τ_2) and, at each sample's explicit encode to τ_2, the smallest
    eigenvalue of the symmetric part of the Jacobian of DDIM's step τ_2 → τ_1 (at least ρ for the exact ε)."""
    tau = schedule.check_timesteps(timesteps)
    if len(tau) < 2:
        raise ValueError(f"timesteps must hold at least two timesteps (the step τ_2 → τ_1), got {len(tau)}")
    s_1, s_2 = schedule.sigma(tau[:2]).tolist()
    x_bar = encode(model, x0, schedule, tau[:2], "euler") * math.sqrt(1 + s_2 ** 2)  # x̄ = x_T sqrt(1 + σ²) at τ_2
    return s_1 / s_2, step_monotonicity(model, schedule, x_bar, s_2, s_1)
