"""A family of exact Gaussian-mixture problems for judging ODE solvers, varied in what makes sampling hard.

One problem (the 8-Gaussian ring, say) rewards whatever was tuned to it. The family varies, one
at a time and together, what makes Eq 14 hard to integrate in few steps: the number of modes
(4 to 48), their width (down to 0.01 of the data's scale), anisotropy and unequal weights, and the
dimension (2 to 64). Each member is a :class:`ddim_edu.mixture.GaussianMixture`, so its ε is exact
and a tight reference solution of Eq 14 costs only field evaluations (:func:`reference_x0`).

Members are drawn from a seeded generator: ``family(seed=0)`` is the family solvers are judged on,
and other seeds give problems of the same kinds that are not the judged ones (a calibration set,
for choosing a grid without looking at the problems it is judged on). The data are scaled so that
the means have unit root mean square per coordinate; widths are then fractions of that scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..mixture import GaussianMixture
from ..schedules import Schedule

__all__ = ["KINDS", "Kind", "family", "point_errors", "random_mixture", "reference_x0"]


@dataclass(frozen=True)
class Kind:
    """A kind of member: dimension ``d``, ``K`` modes, widths log-uniform in [``std_lo``, ``std_hi``]
    (per axis when ``anisotropic``), weights ∝ exp(``unequal`` z) with z ~ N(0, 1) (0: equal),
    and the means on a circle (``ring``, 2-D) or N(0, I) (otherwise)."""

    d: int
    K: int
    std_lo: float
    std_hi: float
    anisotropic: bool = False
    unequal: float = 0.0
    ring: bool = False

    def describe(self) -> str:
        width = f"{self.std_lo:g}" if self.std_lo == self.std_hi else f"{self.std_lo:g}–{self.std_hi:g}"
        return (f"{self.K} modes {'on a circle ' if self.ring else ''}in {self.d}-D, width {width}"
                + (" per axis" if self.anisotropic else "") + (", unequal weights" if self.unequal else ""))


KINDS = {
    "few": Kind(2, 4, 0.05, 0.1),
    "ring-narrow": Kind(2, 8, 0.01, 0.01, ring=True),
    "many": Kind(2, 40, 0.01, 0.05, unequal=1.0),
    "aniso": Kind(2, 6, 0.01, 0.3, anisotropic=True, unequal=0.5),
    "lopsided": Kind(2, 5, 0.02, 0.3, anisotropic=True, unequal=1.5),
    "8d": Kind(8, 16, 0.05, 0.05),
    "16d-narrow": Kind(16, 24, 0.01, 0.03),
    "64d": Kind(64, 10, 0.1, 0.1, unequal=1.0),
    "64d-many-aniso": Kind(64, 48, 0.01, 0.2, anisotropic=True, unequal=1.0),
}


def random_mixture(kind: Kind, generator: torch.Generator) -> GaussianMixture:
    """One member of ``kind``, drawn with ``generator``; means scaled to unit RMS per coordinate."""
    d, K = kind.d, kind.K
    if kind.ring:
        if d != 2:
            raise ValueError(f"a ring is 2-D, got d={d}")
        phase = 2 * math.pi * torch.rand((), generator=generator, dtype=torch.float64)
        angle = phase + torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
        means = torch.stack([angle.cos(), angle.sin()], dim=1)
    else:
        means = torch.randn(K, d, generator=generator, dtype=torch.float64)
    means = means / means.pow(2).mean().sqrt()  # unit RMS per coordinate
    shape = (K, d) if kind.anisotropic else (K, 1)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    stds = (math.log(kind.std_lo) + u * (math.log(kind.std_hi) - math.log(kind.std_lo))).exp().expand(K, d)
    weights = (kind.unequal * torch.randn(K, generator=generator, dtype=torch.float64)).exp()
    return GaussianMixture(means, stds, weights)


def family(seed: int = 0) -> dict[str, GaussianMixture]:
    """A member of every kind of ``KINDS``, drawn from ``seed`` (0: the judged family; others: calibration sets)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: random_mixture(kind, generator) for name, kind in KINDS.items()}


def reference_x0(mixture: GaussianMixture, schedule: Schedule, x_T: Tensor, *, rtol: float = 1e-10,
                 atol: float = 1e-10) -> tuple[Tensor, int]:
    """x_0 from ``x_T`` fed in at the last timestep T-1, along Eq 14 with the exact field, by dopri5 in float64.

    Returns (x_0, the number of field evaluations). The solve starts at x̄ = x_T sqrt(1 + σ_max²),
    σ_max = σ(T-1), where every sampler of the library starts from the same x_T on a grid ending at
    T-1; the field is defined down to σ = 0 (where x̄ is x_0), so it needs no last step of its own.
    """
    from torchdiffeq import odeint

    sigma_max = schedule.sigma(float(schedule.T - 1)).item()
    f = mixture.probability_flow()
    span = torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    out = odeint(f, x_T.to(torch.float64) * math.sqrt(1 + sigma_max**2), span, rtol=rtol, atol=atol, method="dopri5")
    return out[-1], f.nfe


def point_errors(x: Tensor, ref: Tensor, means: Tensor) -> dict:
    """How the errors of samples ``x`` [N, d] against the reference ``ref`` are spread, beyond their RMS.

    ``median``: the median point's error ‖x - ref‖; ``switched``: how many points end nearest another
    mode's mean (``means`` [K, d]) than the reference does, a miss of the distance between modes after
    a small error near the boundary of two modes' basins; ``switched_share``: the share of the squared
    error those points carry.
    """
    err = (x - ref).pow(2).sum(1)
    switched = torch.cdist(x, means).argmin(1) != torch.cdist(ref, means).argmin(1)
    return dict(median=err.sqrt().median().item(), switched=int(switched.sum()),
                switched_share=(err[switched].sum() / err.sum().clamp_min(1e-300)).item())
