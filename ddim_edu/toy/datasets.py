"""Two-dimensional toy data sets for training and checking small diffusion models.

Every generator has the signature ``fn(n, generator=None) -> Tensor [n, 2]`` (float32) and draws
all its randomness from ``generator`` (a CPU ``torch.Generator``), so a seed fixes the output.
Each set is scaled by fixed constants (not by its sample statistics, which would vary with the
seed) so that its points lie in about [-2, 2]², comparable to the N(0, I) prior of a diffusion
model; the docstrings give the constants. Points of different components (moons, arms, modes)
come in random order, so any slice of a sample is itself a sample.

Frozen samples of each set live in the repository's ``toy_data/`` folder (see its README), which is
installed with the package as its data (``ddim_edu.toy_data``), and are read with :func:`load_frozen`.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..utils.package_data import package_file

__all__ = [
    "DATASETS",
    "checkerboard",
    "eight_gaussians",
    "load_frozen",
    "spirals",
    "swiss_roll",
    "two_moons",
]


def _check(n, generator) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (number of points) must be a positive int, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return int(n)


def _rand(n, generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _randn(*shape, generator) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def swiss_roll(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The 2-D Swiss roll: ``(t cos t, t sin t)`` with ``t ~ U[1.5π, 4.5π]``, plus N(0, 0.3²) noise,
    then shifted by -(1.5, 1.5) and divided by 6.

    The noise-free roll then spans about [-1.8, 1.85] × [-2.1, 2.1]; the noise std is 0.05.
    """
    n = _check(n, generator)
    t = 1.5 * math.pi * (1 + 2 * _rand(n, generator))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    x = x + 0.3 * _randn(n, 2, generator=generator)
    return ((x - 1.5) / 6.0).float()


def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved half circles of radius 1 (as in scikit-learn), plus N(0, 0.05²) noise.

    Upper moon ``(cos θ, sin θ)``, lower moon ``(1 - cos θ, 0.5 - sin θ)``, ``θ ~ U[0, π]``, each
    point's moon a fair coin. Then centred by subtracting (0.5, 0.25) and scaled by 1.2, so the
    noise-free moons span [-1.8, 1.8] × [-0.9, 0.9]; the noise std after scaling is 0.06.
    """
    n = _check(n, generator)
    theta = math.pi * _rand(n, generator)
    lower = torch.randint(0, 2, (n,), generator=generator).bool()
    x = torch.where(lower, 1 - torch.cos(theta), torch.cos(theta))
    y = torch.where(lower, 0.5 - torch.sin(theta), torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) + 0.05 * _randn(n, 2, generator=generator)
    return (1.2 * pts).float()


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """An equal mixture of 8 Gaussians N(μ_k, 0.1² I), ``μ_k = 1.5 (cos(kπ/4), sin(kπ/4))``.

    Already at scale: modes on the circle of radius 1.5 (neighbours 1.15 apart), std 0.1.
    """
    n = _check(n, generator)
    k = torch.randint(0, 8, (n,), generator=generator).double()
    mu = 1.5 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    return (mu + 0.1 * _randn(n, 2, generator=generator)).float()


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark cells of a 4×4 checkerboard with unit cells covering [-2, 2]².

    Cell (i, j), i, j ∈ {0..3}, is dark when i + j is even; a point picks one of the 8 dark cells
    uniformly, then a uniform position inside it. No further scaling.
    """
    n = _check(n, generator)
    cell = torch.randint(0, 8, (n,), generator=generator)
    i = cell // 2  # row 0..3
    j = 2 * (cell % 2) + (i % 2)  # the dark column in that row: (i + j) even
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return (torch.stack([j, i], dim=1).double() + u - 2.0).float()


def spirals(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved spirals: ``±(t cos t, t sin t)`` with ``t = 3π sqrt(u)``, ``u ~ U[0, 1]``, ÷5.

    The square root makes points roughly uniform along the arms (arc length grows like t²). Each
    point's arm (the sign) is a fair coin; after ÷5 the arms reach radius 3π/5 ≈ 1.9, and
    N(0, 0.05²) noise is added.
    """
    n = _check(n, generator)
    t = 3 * math.pi * torch.sqrt(_rand(n, generator))
    sign = 2.0 * torch.randint(0, 2, (n,), generator=generator).double() - 1.0
    x = sign[:, None] * torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5.0
    return (x + 0.05 * _randn(n, 2, generator=generator)).float()


#: Name -> generator, the names used for the frozen files ``toy_data/<name>.csv``.
DATASETS = {
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "spirals": spirals,
}


def load_frozen(name: str) -> Tensor:
    """The frozen sample ``toy_data/<name>.csv`` (header ``x,y``) as a float32 tensor [N, 2].

    These files were written by ``toy_data/make_toy_data.py`` from the generators above with a
    fixed seed, so they can serve as held-out data for a model trained on fresh generator draws.
    They ship inside the package and are found with :func:`~ddim_edu.utils.package_data.package_file`.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    path = package_file(f"{name}.csv")
    if not path.is_file():
        raise FileNotFoundError(
            f"frozen toy data file {path} is missing; in a checkout of the repository regenerate it with "
            "`python toy_data/make_toy_data.py` from the repository root (a wheel ships the file: reinstall ddim-edu)"
        )
    lines = path.read_text().strip().splitlines()
    if not lines or lines[0].strip() != "x,y":
        raise ValueError(f"{path} must start with the header 'x,y'; regenerate it with toy_data/make_toy_data.py")
    rows = [[float(v) for v in line.split(",")] for line in lines[1:]]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 2)
