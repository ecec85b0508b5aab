import math

import numpy as np
import pytest
import scipy.stats
import torch

from ddim_edu.evaluation import metrics
from ddim_edu.evaluation.metrics import energy_distance, mmd_rbf, nearest_neighbour_distances, sliced_wasserstein


def _normal(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


# --- energy distance --------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(200, 200), (300, 170)])
def test_energy_distance_1d_equals_scipy_squared(n, m):
    rng = np.random.default_rng(0)
    u = rng.standard_t(3, size=n)
    v = 0.3 + 1.5 * rng.normal(size=m)
    ours = energy_distance(torch.tensor(u), torch.tensor(v)).item()
    assert ours == pytest.approx(scipy.stats.energy_distance(u, v) ** 2, rel=1e-9, abs=1e-12)
    # a [n, 1] input is the same 1-D problem
    assert energy_distance(torch.tensor(u)[:, None], torch.tensor(v)[:, None]).item() == pytest.approx(ours, rel=1e-12)


def test_energy_distance_unbiased_matches_gaussian_closed_form():
    # X ~ N(0, 1), Y ~ N(δ, 1): X − Y ~ N(−δ, 2), E|N(μ, s²)| = s sqrt(2/π) exp(−μ²/2s²) + μ (1 − 2Φ(−μ/s)),
    # E|X − X'| = 2/sqrt(π), so D² = 2 E|N(δ, 2)| − 4/sqrt(π).
    delta, s = 0.7, math.sqrt(2.0)
    e_abs = s * math.sqrt(2 / math.pi) * math.exp(-(delta**2) / (2 * s**2)) + delta * (1 - 2 * scipy.stats.norm.cdf(-delta / s))
    exact = 2 * e_abs - 4 / math.sqrt(math.pi)
    est = [energy_distance(_normal(1000, 1, 2 * k), _normal(1000, 1, 2 * k + 1, delta), unbiased=True).item() for k in range(24)]
    assert np.mean(est) == pytest.approx(exact, abs=0.025)  # exact ≈ 0.271; per-draw std ≈ 0.034, so ±3.5σ
    # the V-statistic exceeds the U-statistic by E|X−X'|/n + E|Y−Y'|/m on average
    x, y = _normal(500, 1, 0), _normal(500, 1, 1, delta)
    gap = energy_distance(x, y) - energy_distance(x, y, unbiased=True)
    assert gap.item() == pytest.approx(2 * (2 / math.sqrt(math.pi)) / 500, rel=0.1)


def test_energy_distance_invariances_and_zero():
    x, y = _normal(300, 3, 0), _normal(250, 3, 1, 0.5)
    d = energy_distance(x, y)
    q, _ = torch.linalg.qr(_normal(3, 3, 2))
    shift = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert energy_distance(x @ q + shift, y @ q + shift).item() == pytest.approx(d.item(), rel=1e-9)
    assert energy_distance(2 * x, 2 * y).item() == pytest.approx(2 * d.item(), rel=1e-9)  # degree-1 homogeneous
    assert energy_distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert energy_distance(x, y).item() == pytest.approx(energy_distance(y, x).item(), rel=1e-12)


def test_pairwise_sum_chunking_is_exact():
    a, b = _normal(301, 2, 0), _normal(77, 2, 1)
    brute = torch.cdist(a, b).sum()
    for chunk in (1, 7, 300, 301, 5000):
        assert metrics._pairwise_sum(a, b, torch.sqrt, chunk=chunk).item() == pytest.approx(brute.item(), rel=1e-10)


# --- sliced Wasserstein -------------------------------------------------------------------

def test_sliced_wasserstein_1d_is_exact_w2():
    x, y = _normal(400, 1, 0), _normal(400, 1, 1, 0.3) * 2
    exact = (torch.sort(x[:, 0]).values - torch.sort(y[:, 0]).values).pow(2).mean().sqrt()
    assert sliced_wasserstein(x, y).item() == pytest.approx(exact.item(), rel=1e-12)
    assert sliced_wasserstein(x[:, 0], y[:, 0]).item() == pytest.approx(exact.item(), rel=1e-12)


def test_sliced_wasserstein_unequal_sizes_via_quantiles():
    # repeating every point of y k times leaves its empirical measure unchanged
    x, y = _normal(60, 1, 0), _normal(20, 1, 1, 0.5)
    y_rep = y.repeat(3, 1)
    assert sliced_wasserstein(x, y).item() == pytest.approx(sliced_wasserstein(x, y_rep).item(), rel=1e-12)
    # n and m coprime: against a brute-force integral of the quantile functions on a fine grid
    x, y = _normal(7, 1, 2), _normal(5, 1, 3)
    u = (torch.arange(70000, dtype=torch.float64) + 0.5) / 70000  # 70000 is a multiple of 7 and 5
    qx = torch.sort(x[:, 0]).values[(u * 7).long()]
    qy = torch.sort(y[:, 0]).values[(u * 5).long()]
    assert sliced_wasserstein(x, y).item() ** 2 == pytest.approx((qx - qy).pow(2).mean().item(), rel=1e-9)
    # in d dims, with the same projections
    x2, y2 = _normal(60, 3, 4), _normal(20, 3, 5)
    a = sliced_wasserstein(x2, y2, generator=torch.Generator().manual_seed(0))
    b = sliced_wasserstein(x2, y2.repeat(3, 1), generator=torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("d", [2, 5])
def test_sliced_wasserstein_of_a_shift(d):
    # Y = X + δ: every projection is shifted by θ·δ, so W_2² = (θ·δ)² exactly and SW_2² = E(θ·δ)² = |δ|²/d
    delta = torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    x = _normal(1000, d, 0)
    g = torch.Generator().manual_seed(1)
    sw2 = sliced_wasserstein(x, x + delta, n_projections=4000, generator=g).item() ** 2
    assert sw2 == pytest.approx(delta.pow(2).sum().item() / d, rel=0.05)
    # independent samples of N(0, I) and N(δ, I): the same up to a small finite-sample excess
    y = _normal(4000, d, 2) + delta
    x = _normal(4000, d, 3)
    sw2 = sliced_wasserstein(x, y, n_projections=2000, generator=torch.Generator().manual_seed(4)).item() ** 2
    assert sw2 == pytest.approx(delta.pow(2).sum().item() / d, rel=0.1)


def test_sliced_wasserstein_zero_and_reproducible():
    x = _normal(100, 2, 0)
    assert sliced_wasserstein(x, x[torch.randperm(100)]).item() == pytest.approx(0.0, abs=1e-12)
    y = _normal(100, 2, 1)
    a = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(5))
    b = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()


# --- MMD ---------------------------------------------------------------------------------

def test_mmd_two_points_exact():
    h = 0.7
    expected = 2 - 2 * math.exp(-1 / (2 * h**2))
    assert mmd_rbf(torch.zeros(1, 1), torch.ones(1, 1), bandwidths=[h]).item() == pytest.approx(expected, rel=1e-12)
    both = mmd_rbf(torch.zeros(1, 1), torch.ones(1, 1), bandwidths=[h, 2.0]).item()
    assert both == pytest.approx(expected + 2 - 2 * math.exp(-1 / 8), rel=1e-12)


def test_mmd_gaussian_closed_form_and_same_distribution():
    # X ~ N(0, I_d), Y ~ N(δ, I_d), kernel exp(−|a−b|²/2h²): E k(X,X') = c, E k(X,Y) = c exp(−|δ|²/2(h²+2)),
    # with c = (h²/(h²+2))^{d/2}; so MMD² = 2c (1 − exp(−|δ|²/2(h²+2)))
    d, h = 2, 1.0
    delta = torch.tensor([0.6, 0.0], dtype=torch.float64)
    c = (h**2 / (h**2 + 2)) ** (d / 2)
    exact = 2 * c * (1 - math.exp(-delta.pow(2).sum().item() / (2 * (h**2 + 2))))
    est = [mmd_rbf(_normal(800, d, 2 * k), _normal(800, d, 2 * k + 1) + delta, bandwidths=[h], unbiased=True).item()
           for k in range(6)]
    assert np.mean(est) == pytest.approx(exact, rel=0.1)  # exact ≈ 0.026
    same = [mmd_rbf(_normal(800, d, 2 * k), _normal(800, d, 2 * k + 1), bandwidths=[h], unbiased=True).item()
            for k in range(6)]
    assert abs(np.mean(same)) < 0.002
    # the V-statistic adds the diagonal: K/n + K/m minus the off-diagonal means over n and m
    x, y = _normal(400, d, 0), _normal(400, d, 1) + delta
    assert mmd_rbf(x, y).item() > mmd_rbf(x, y, unbiased=True).item()
    assert mmd_rbf(x, y).item() >= 0


def test_mmd_grows_with_shift():
    x = _normal(1000, 2, 0)
    values = [mmd_rbf(x, _normal(1000, 2, 1) + s).item() for s in (0.0, 0.2, 0.5, 1.0)]
    assert values[0] < 0.01
    assert all(a < b for a, b in zip(values, values[1:]))


def test_mmd_is_float64_and_chunked():
    x = torch.randn(2500, 2, generator=torch.Generator().manual_seed(0))  # float32 in, two row blocks
    y = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    out = mmd_rbf(x, y, bandwidths=[0.5])
    assert out.dtype == torch.float64
    x64, y64 = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / 0.5).mean()  # noqa: E731
    assert out.item() == pytest.approx((k(x64, x64) + k(y64, y64) - 2 * k(x64, y64)).item(), rel=1e-9)


# --- nearest-neighbour distances ---------------------------------------------------------

def test_nearest_neighbour_distances_tiny_exact_case():
    reference = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [6.0, 8.0], [10.0, 2.0], [-3.0, -4.0], [3.0, 4.0]])
    expected = [0.0, 5.0, 2.0, 5.0, 0.0]  # a copy, 3-4-5 triangles, a plain offset
    for chunk in (1, 2, 5, 1024):
        out = nearest_neighbour_distances(x, reference, chunk=chunk)
        assert out.dtype == torch.float64 and out.tolist() == expected
    # images are flattened per example: [n, C, H, W] against [m, C, H, W]
    images, ref = torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    images[1, 0, 1, 1], ref[2, 0, 0, 0] = 2.0, 1.0
    assert nearest_neighbour_distances(images, ref).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="same dimension"):
        nearest_neighbour_distances(images, torch.zeros(3, 1, 3, 3))
    with pytest.raises(ValueError, match="chunk"):
        nearest_neighbour_distances(x, reference, chunk=0)


# --- bad input ----------------------------------------------------------------------------

def test_bad_inputs_raise():
    x, y = _normal(10, 2, 0), _normal(10, 3, 1)
    for fn in (energy_distance, sliced_wasserstein, mmd_rbf):
        with pytest.raises(ValueError, match="same dimension"):
            fn(x, y)
        with pytest.raises(ValueError, match="point cloud"):
            fn(torch.zeros(2, 2, 2), x)
        with pytest.raises(ValueError, match="point cloud"):
            fn(torch.zeros(0, 2), x)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(x, x, n_projections=0)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(x, x, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance(x[:1], x, unbiased=True)


def test_pixel_rms_is_in_units_of_zero_one_pixels():
    """Images in [-1, 1] differing by 0.2 everywhere differ by 0.1 in [0, 1] pixels; by 0.2 on a quarter of the
    pixels, by sqrt(0.25) · 0.1."""
    a = torch.zeros(3, 1, 8, 8)
    assert metrics.pixel_rms(a + 0.2, a) == pytest.approx(0.1, rel=1e-6)
    b = a.clone()
    b[..., :4, :4] = 0.2
    assert metrics.pixel_rms(b, a) == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        metrics.pixel_rms(a, a[:2])
