"""Sample-quality metrics for point clouds: compare generated samples ``x`` [n, d] with held-out data ``y`` [m, d].

All three are two-sample statistics of the distance between the two underlying distributions;
they are zero (in expectation, or up to an O(1/n) bias) when the distributions agree.
Computation is in float64; pairwise sums are taken over row blocks so that a 4096 × 4096
comparison needs only a few tens of MB. A 1-D input [n] is treated as [n, 1].

- :func:`energy_distance`: squared energy distance (Székely & Rizzo), ``2E|X−Y| − E|X−X'| − E|Y−Y'|``.
- :func:`sliced_wasserstein`: sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015).
- :func:`mmd_rbf`: squared maximum mean discrepancy with a sum of Gaussian kernels (Gretton et al. 2012).

And one per-sample distance, for images as much as points: :func:`nearest_neighbour_distances`, from
each sample to the nearest point of a reference set (digit-likeness, and copies of training images).
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["energy_distance", "mmd_rbf", "nearest_neighbour_distances", "pixel_rms", "sliced_wasserstein"]

_CHUNK = 1024  # rows per block of a pairwise matrix: 1024 × 4096 float64 is 32 MB


def _as_points(x, name: str) -> Tensor:
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a point cloud [n, d] (or [n] in 1-D) with n >= 1, got shape {tuple(x.shape)}")
    return x


def _pair(x, y, min_n: int = 1) -> tuple[Tensor, Tensor]:
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension d, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[0] < min_n or y.shape[0] < min_n:
        raise ValueError(f"x and y need at least {min_n} points each, got {x.shape[0]} and {y.shape[0]}")
    return x, y.to(x.device)


def _pairwise_sum(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor], chunk: int = _CHUNK) -> Tensor:
    """``Σ_ij fn(|a_i − b_j|²)`` over all pairs, computed block by block of rows of ``a``."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    b_sq = (b * b).sum(1)
    for start in range(0, a.shape[0], chunk):
        block = a[start:start + chunk]
        # |a|² + |b|² − 2 a·b, clamped: rounding can make tiny squared distances negative
        d2 = ((block * block).sum(1)[:, None] + b_sq[None, :] - 2 * block @ b.T).clamp_min(0)
        total = total + fn(d2).sum()
    return total


def energy_distance(x, y, *, unbiased: bool = False) -> Tensor:
    """Squared energy distance ``D² = 2E|X−Y| − E|X−X'| − E|Y−Y'|`` between samples x [n, d] and y [m, d].

    By default the V-statistic: every expectation is the mean over all pairs, the n (resp. m)
    zero self-distances included. It is ≥ 0, and in 1-D it equals the square of
    ``scipy.stats.energy_distance(x, y)``; its bias is about ``E|X−X'|/n + E|Y−Y'|/m``.
    With ``unbiased=True`` the within-sample means skip the diagonal (divide by n(n−1)), giving the
    U-statistic, whose expectation is the population D² and which can be slightly negative.
    D² = 0 iff the distributions are equal (for finite first moments). Returns a float64 scalar.
    """
    x, y = _pair(x, y, min_n=2 if unbiased else 1)
    n, m = x.shape[0], y.shape[0]
    dist = torch.sqrt
    xy = _pairwise_sum(x, y, dist) / (n * m)
    xx = _pairwise_sum(x, x, dist) / (n * (n - 1) if unbiased else n * n)
    yy = _pairwise_sum(y, y, dist) / (m * (m - 1) if unbiased else m * m)
    return 2 * xy - xx - yy


def _w2_squared_1d(xs: Tensor, ys: Tensor) -> Tensor:
    """Exact ``W_2²`` between 1-D empirical measures, column by column: xs [n, P], ys [m, P], both sorted.

    ``W_2² = ∫₀¹ (F⁻¹(u) − G⁻¹(u))² du``; both quantile functions are step functions, constant on the
    intervals between the merged breakpoints {i/n} ∪ {j/m}, so the integral is a finite sum.
    With n = m it is the mean of the squared differences of the sorted values.
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).pow(2).mean(0)
    cuts = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    cuts = torch.unique(cuts)  # sorted, ends at 1
    width = torch.diff(cuts, prepend=cuts.new_zeros(1))
    mid = cuts - width / 2
    ix = torch.floor(mid * n).long().clamp(max=n - 1).to(xs.device)
    iy = torch.floor(mid * m).long().clamp(max=m - 1).to(xs.device)
    return (width.to(xs.device)[:, None] * (xs[ix] - ys[iy]).pow(2)).sum(0)


def sliced_wasserstein(x, y, n_projections: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Sliced 2-Wasserstein distance ``SW_2 = (E_θ W_2²(θᵀX, θᵀY))^{1/2}``, θ uniform on the unit sphere.

    The expectation is a Monte-Carlo mean over ``n_projections`` directions drawn (as normalised
    Gaussians) from ``generator``; each 1-D ``W_2²`` between the projected samples is exact: by
    sorting when n = m, and through the quantile functions otherwise (so unequal sample sizes are
    fine). Returns the distance itself, not its square (a float64 scalar); in 1-D it is the exact
    W_2 between the two empirical measures. For X ~ N(0, I_d) and Y = X + δ, ``SW_2² = |δ|²/d``.
    """
    x, y = _pair(x, y)
    if not isinstance(n_projections, numbers.Integral) or isinstance(n_projections, bool) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    d = x.shape[1]
    if d == 1:
        theta = torch.ones(1, 1, dtype=torch.float64)  # the only direction (up to sign, which W_2 ignores)
    else:
        theta = torch.randn(d, n_projections, generator=generator, dtype=torch.float64)
        theta = theta / theta.norm(dim=0, keepdim=True)
    theta = theta.to(x.device)
    xs = torch.sort(x @ theta, dim=0).values  # [n, P]
    ys = torch.sort(y @ theta, dim=0).values  # [m, P]
    return _w2_squared_1d(xs, ys).mean().sqrt()


def mmd_rbf(x, y, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0), *, unbiased: bool = False) -> Tensor:
    """Squared MMD ``E k(X,X') + E k(Y,Y') − 2E k(X,Y)`` with ``k(a,b) = Σ_h exp(−|a−b|²/(2h²))``.

    One Gaussian kernel per bandwidth h, summed, so that both fine and coarse mismatches count; the
    defaults suit data at the scale of :mod:`ddim_edu.toy.datasets` (about [−2, 2]²). By default the
    V-statistic (all pairs, diagonal included: ≥ 0, biased upwards by about ``K (1/n + 1/m)`` with K
    the number of bandwidths, minus the off-diagonal means over n and m); ``unbiased=True`` drops the
    diagonal terms, giving Gretton et al.'s unbiased MMD²_u, which can be slightly negative.
    Returns a float64 scalar.
    """
    x, y = _pair(x, y, min_n=2 if unbiased else 1)
    h = torch.as_tensor(bandwidths, dtype=torch.float64).flatten()
    if h.numel() < 1 or not bool((h > 0).all()):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths!r}")
    scales = (0.5 / h**2).tolist()

    def kernel(d2: Tensor) -> Tensor:
        return sum(torch.exp(-s * d2) for s in scales)

    n, m = x.shape[0], y.shape[0]
    K = h.numel()  # k(a, a) = K on the diagonal
    kxy = _pairwise_sum(x, y, kernel) / (n * m)
    if unbiased:
        kxx = (_pairwise_sum(x, x, kernel) - n * K) / (n * (n - 1))
        kyy = (_pairwise_sum(y, y, kernel) - m * K) / (m * (m - 1))
    else:
        kxx = _pairwise_sum(x, x, kernel) / (n * n)
        kyy = _pairwise_sum(y, y, kernel) / (m * m)
    return kxx + kyy - 2 * kxy


def nearest_neighbour_distances(x, reference, *, chunk: int = _CHUNK) -> Tensor:
    """``min_j |x_i − r_j|`` for every row of ``x``: the Euclidean distance to the nearest point of ``reference``.

    ``x`` [n, ...] and ``reference`` [m, ...] are flattened per example (images [n, C, H, W] become
    [n, C·H·W]) and compared in float64, ``chunk`` rows of ``x`` at a time. Returns float64 [n].
    Against the training set, generated samples whose distances are like held-out data's are neither
    off the data (much larger) nor copies of training examples (much smaller, near 0).
    """
    x, reference = torch.as_tensor(x), torch.as_tensor(reference)
    if x.ndim < 1 or reference.ndim < 1:
        raise ValueError(f"x and reference must be batches [n, ...], got shapes {tuple(x.shape)} and {tuple(reference.shape)}")
    x, reference = _pair(x.reshape(len(x), -1), reference.reshape(len(reference), -1))
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    r_sq = (reference * reference).sum(1)
    out = []
    for start in range(0, x.shape[0], chunk):
        block = x[start:start + chunk]
        # |a|² + |r|² − 2 a·r, clamped: rounding can make tiny squared distances negative
        d2 = ((block * block).sum(1)[:, None] + r_sq[None, :] - 2 * block @ reference.T).clamp_min(0)
        out.append(d2.min(1).values.sqrt())
    return torch.cat(out)


def pixel_rms(a: Tensor, b: Tensor) -> float:
    """The root-mean-square difference of two image batches in [-1, 1], in pixels of [0, 1] (the difference halved)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return ((a - b) / 2).pow(2).mean().sqrt().item()
