"""The paper's reported CIFAR-10 results (Song, Meng & Ermon 2021), for benchmarks and notebooks to compare with,
and the sampler of one cell of its Table 1 (:func:`table1_sample`).

Both tables use the same DDPM model (Ho et al. 2020) and the "quad" sequence of timesteps τ.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .model import Model
from .schedules import Schedule
from .solvers import sample

__all__ = ["SIGMA_HAT", "TABLE1_FID", "TABLE2_RECONSTRUCTION_MSE", "table1_row_label", "table1_sample"]

SIGMA_HAT = "sigma_hat"  # Table 1's σ̂ row (Ho et al.'s larger variance), beside the η rows

# Table 1: FID of 50,000 samples, {row: {S: FID}}; a row is η (Eq 16) or SIGMA_HAT.
TABLE1_FID = {
    0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    0.2: {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09},
    0.5: {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
    SIGMA_HAT: {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17},
}

# Table 2: per-dimension MSE of x_0 → x_T → x_0 with DDIM (η = 0), pixels in [0, 1], {S: MSE}.
TABLE2_RECONSTRUCTION_MSE = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}


def table1_row_label(row) -> str:
    """How a Table 1 row is printed: ``"η = 0.2"`` or ``"σ̂"``."""
    return "σ̂" if row == SIGMA_HAT else f"η = {row:g}"


def table1_sample(model: Model, x_T: Tensor, schedule: Schedule, S: int, row, spacing: str = "uniform",
                  generator: torch.Generator | None = None) -> Tensor:
    """x_0 of one cell of Table 1: the sampler of ``row`` on the S-step sub-sequence τ of ``spacing``, from ``x_T``.

    ``row`` is η (a number: Eq 12 with σ_{τ_i}(η) of Eq 16, ``sample(..., method="ddim", eta=η)``; η = 0 is
    DDIM, η = 1 DDPM's sampler on τ) or :data:`SIGMA_HAT` (the table's last row, σ̂_{τ_i} =
    sqrt(1 − α_{τ_i}/α_{τ_{i−1}}): DDPM ancestral steps on τ with the x_0 prediction clipped to [-1, 1], as
    the reference code, ``sample(..., method="sigma_hat")``). τ is ``schedule.timesteps(S, spacing)``; the
    paper's CIFAR-10 table used ``"quad"``, the default here is the reference code's ``"uniform"``.
    The stochastic rows draw their noise from ``generator``; η = 0 ignores it. The result is not clamped.
    """
    tau = schedule.timesteps(S, spacing)
    if row == SIGMA_HAT:
        return sample(model, x_T, schedule, tau, method="sigma_hat", generator=generator)
    if isinstance(row, str) or isinstance(row, bool) or not isinstance(row, (int, float)):
        raise ValueError(f"row must be η (a number >= 0) or SIGMA_HAT ({SIGMA_HAT!r}), got {row!r}")
    return sample(model, x_T, schedule, tau, method="ddim", eta=float(row), generator=generator)
