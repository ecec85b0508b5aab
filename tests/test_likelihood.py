"""Log-likelihood along the probability-flow ODE: exact densities of noised mixtures, Hutchinson, bits/dim, bad input."""
import math

import pytest
import torch

from ddim_edu.likelihood import (
    BIN_WIDTH_8BIT,
    bits_per_dim,
    bits_per_dim_from_logp,
    divergence_exact,
    divergence_hutchinson,
    draw_probe,
    log_likelihood,
)
from ddim_edu.mixture import GaussianMixture
from ddim_edu.model import eps_at_sigma
from ddim_edu.sde import standard_normal_logp


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.ring(K=8, radius=1.0, std=0.1)


def noised_sample(gm, sched, t, n, seed):
    """n draws of x_t from the mixture's noised marginal at ᾱ(t) (Eq 4)."""
    g = torch.Generator().manual_seed(seed)
    alpha = sched.alpha_bar(float(t))
    return alpha.sqrt() * gm.sample(n, generator=g) + (1 - alpha).sqrt() * torch.randn(n, gm.dim, generator=g, dtype=torch.float64)


def exact_prior(gm, sched):
    """The mixture's own noised marginal at t = T-1 (≠ N(0, I): ᾱ(T-1) ≈ 4e-5)."""
    alpha_T = sched.alpha_bar(float(sched.T - 1))
    return lambda z: gm.log_prob(z, alpha_T)


@pytest.mark.parametrize("t_min", [0.0, 10.5])
def test_log_density_of_the_noised_mixture(sched, t_min):
    """With the exact ε and the exact top-end density, the flow gives log p_{t_min}(x) to ~1e-6."""
    gm = GaussianMixture.ring(K=8, radius=1.0, std=0.05)
    x = noised_sample(gm, sched, t_min, 12, seed=1)
    res = log_likelihood(gm.eps_model(sched), x, sched, t_min=t_min, rtol=1e-7, atol=1e-7, prior=exact_prior(gm, sched))
    exact = gm.log_prob(x, sched.alpha_bar(t_min))
    # Achieved: ~2e-6 at rtol = atol = 1e-7 (and ~3e-8 at 1e-9, ~2e-4 at the default 1e-5).
    torch.testing.assert_close(res.logp, exact, rtol=0, atol=1e-5)
    assert res.nfe > 0


def test_standard_normal_prior_differs_by_the_prior_gap(sched):
    """The default prior N(0, I) changes log p by exactly log N(x_T) - log p_{T-1}(x_T).

    For an off-centre mixture that gap is visible (~1e-2 here); for the centred ring it is below 1e-3.
    """
    gm = GaussianMixture([[2.0, 1.0], [1.0, 2.5]], [0.2, 0.3], weights=[0.3, 0.7])
    x = noised_sample(gm, sched, 0, 8, seed=2)
    model = gm.eps_model(sched)
    with_exact = log_likelihood(model, x, sched, rtol=1e-7, atol=1e-7, prior=exact_prior(gm, sched))
    with_normal = log_likelihood(model, x, sched, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(with_normal.x_T, with_exact.x_T, rtol=0, atol=1e-12)  # the prior does not move the flow
    gap = standard_normal_logp(with_exact.x_T) - exact_prior(gm, sched)(with_exact.x_T)
    torch.testing.assert_close(with_normal.logp - with_exact.logp, gap, rtol=0, atol=1e-10)
    assert gap.abs().max() > 5e-3
    exact = gm.log_prob(x, sched.alpha_bar(0.0))
    torch.testing.assert_close(with_exact.logp, exact, rtol=0, atol=1e-5)


def test_centred_ring_with_standard_normal_prior(sched, ring):
    """For the ring (mean 0) N(0, I) is within 1e-3 of the exact top-end density, so the default is fine there."""
    x = noised_sample(ring, sched, 0, 8, seed=3)
    res = log_likelihood(ring.eps_model(sched), x, sched, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(res.logp, ring.log_prob(x, sched.alpha_bar(0.0)), rtol=0, atol=1e-3)


def test_float32(sched, ring):
    """float32 in, float32 out; accurate to the default tolerance (σ(0) rounds below the model's range without the clamp)."""
    x = noised_sample(ring, sched, 0, 4, seed=4)
    res = log_likelihood(ring.eps_model(sched), x.float(), sched)
    assert res.logp.dtype == torch.float32
    torch.testing.assert_close(res.logp.double(), ring.log_prob(x, sched.alpha_bar(0.0)), rtol=0, atol=1e-3)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_divergence_is_unbiased(sched, ring, probe):
    """Mean of vᵀ(∂ε/∂x̄)v over 4000 probes per point = the exact divergence, within 4 standard errors."""
    n_points, n_probes = 4, 4000
    x_bar = noised_sample(ring, sched, 0, n_points, seed=5).repeat(n_probes, 1) * 3.0
    sigma = 0.4  # where the ring's field has a large Jacobian
    x_bar.requires_grad_(True)
    eps = eps_at_sigma(ring.eps_model(sched), sched, x_bar, sigma)
    exact = divergence_exact(eps, x_bar).detach().reshape(n_probes, n_points)
    v = draw_probe(x_bar, probe, torch.Generator().manual_seed(6))
    est = divergence_hutchinson(eps, x_bar, v).detach().reshape(n_probes, n_points)
    assert bool((exact == exact[0]).all())
    stderr = est.std(0) / math.sqrt(n_probes)
    assert bool(((est.mean(0) - exact[0]).abs() < 4 * stderr).all()), (est.mean(0), exact[0], stderr)
    assert bool((est.std(0) > 0).all())  # a real estimator, not the exact trace in disguise


def test_divergence_exact_against_the_analytic_jacobian():
    """For f(x) = A x (row-wise), ∇·f = tr A in every row."""
    A = torch.tensor([[1.5, -2.0, 0.3], [0.7, -0.25, 4.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch.testing.assert_close(divergence_exact(x @ A.T, x), torch.full((5,), 4.25, dtype=torch.float64))


def test_hutchinson_log_likelihood_is_unbiased(sched, ring):
    """One Rademacher probe per trajectory (fixed along it): the mean over 512 trajectories ≈ the exact log p."""
    x = noised_sample(ring, sched, 0, 1, seed=7)
    n = 512
    res = log_likelihood(ring.eps_model(sched), x.repeat(n, 1), sched, divergence="hutchinson",
                         generator=torch.Generator().manual_seed(8), prior=exact_prior(ring, sched))
    exact = ring.log_prob(x, sched.alpha_bar(0.0))
    stderr = res.logp.std() / math.sqrt(n)
    assert abs(res.logp.mean() - exact) < 4 * stderr, (res.logp.mean(), exact, stderr)
    assert res.logp.std() > 0


def gaussian_image_model(sched, shape=(1, 2, 2), mean=0.2, std=0.3):
    """x_0 ~ N(mean, std² I) on images of ``shape``; its marginal at ᾱ is N(sqrt(ᾱ) mean, ᾱ std² + 1 - ᾱ)."""
    D = math.prod(shape)
    return GaussianMixture(torch.full((1, D), mean), torch.tensor([std]))


def eight_bit_images(n, shape=(1, 2, 2), seed=9):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(80, 200, (n, *shape), generator=g)
    return k.to(torch.float64) / 127.5 - 1


def test_bits_per_dim_formula_against_exact_discrete_probabilities():
    """bpd = -(E_u log p(x+u) - D log 127.5)/(D ln 2) bounds the exact -log2 P(bin)/D, and is tight for a smooth density.

    No ODE here: for a Gaussian both sides are closed forms. P(bin) = Π_d [Φ(b⁺) - Φ(b⁻)] over the
    bins x ± 1/255; E_u log N(x+u; m, s²) = log N(x; m, s²) - Δ²/(24 s²) per dimension. A wrong
    offset (e.g. 7 = log2 128, the score_sde convention for another mapping) is off by 0.0056 bits.
    """
    x = eight_bit_images(6).reshape(6, -1)
    m, s = 0.1, 0.3
    D = x.shape[1]
    delta = BIN_WIDTH_8BIT
    upper, lower = (x + delta / 2 - m) / s, (x - delta / 2 - m) / s
    log_P = torch.log(torch.special.ndtr(upper) - torch.special.ndtr(lower)).sum(1)
    bpd_discrete = -log_P / (D * math.log(2))
    e_logp = (-0.5 * ((x - m) / s) ** 2 - 0.5 * math.log(2 * math.pi * s**2) - delta**2 / (24 * s**2)).sum(1)
    bpd = bits_per_dim_from_logp(e_logp, D)
    gap = bpd - bpd_discrete
    assert bool((gap >= 0).all()) and bool((gap < 1e-4).all()), gap
    torch.testing.assert_close(bpd, -(e_logp - D * math.log(127.5)) / (D * math.log(2)), rtol=0, atol=1e-12)


def test_bits_per_dim_matches_log_likelihood(sched):
    """On a tiny 8-bit image batch: bpd is finite and equals the conversion of the exact log p_0 at the dequantised y."""
    gm = gaussian_image_model(sched)
    x = eight_bit_images(3)
    res = bits_per_dim(gm.eps_model(sched), x, sched, generator=torch.Generator().manual_seed(10),
                       rtol=1e-7, atol=1e-7, prior=lambda z: gm.log_prob(z.reshape(len(z), -1), sched.alpha_bar(float(sched.T - 1))))
    assert bool(torch.isfinite(res.bpd).all())
    assert bool(((res.y - x).abs() <= BIN_WIDTH_8BIT / 2).all()) and not torch.equal(res.y, x)
    exact_logp = gm.log_prob(res.y.reshape(3, -1), sched.alpha_bar(0.0))
    torch.testing.assert_close(res.logp, exact_logp, rtol=0, atol=1e-5)
    D = x[0].numel()
    torch.testing.assert_close(res.bpd, -(exact_logp - D * math.log(127.5)) / (D * math.log(2)), rtol=0, atol=1e-5)
    # Same generator: the same dequantisation noise, hence the same y.
    again = bits_per_dim(gm.eps_model(sched), x, sched, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(again.y, res.y, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["unit_interval", "dequantised", "out_of_range"])
def test_bits_per_dim_wants_the_8bit_grid(sched, bad):
    gm = gaussian_image_model(sched)
    x = eight_bit_images(2)
    x = {"unit_interval": (x + 1) / 2 + 1 / 510, "dequantised": x + 0.3 / 127.5, "out_of_range": x * 1.1 + 0.5}[bad]
    with pytest.raises(ValueError, match="8-bit"):
        bits_per_dim(gm.eps_model(sched), x, sched)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rtol": 0.0}, "rtol"),
        ({"rtol": -1e-5}, "rtol"),
        ({"atol": 0}, "atol"),
        ({"atol": float("nan")}, "atol"),
        ({"rtol": float("inf")}, "rtol"),
        ({"divergence": "trace"}, "divergence"),
        ({"divergence": "hutchinson", "probe": "sphere"}, "probe"),
        ({"method": "euler"}, "method"),
        ({"t_min": -0.5}, "t_min"),
        ({"t_min": 999}, "t_min"),
    ],
)
def test_bad_input(sched, ring, kwargs, match):
    x = noised_sample(ring, sched, 0, 2, seed=11)
    with pytest.raises(ValueError, match=match):
        log_likelihood(ring.eps_model(sched), x, sched, **kwargs)


def test_bad_x(sched, ring):
    with pytest.raises(ValueError, match="x must"):
        log_likelihood(ring.eps_model(sched), torch.zeros(3, dtype=torch.float64), sched)
    with pytest.raises(ValueError, match="x must"):
        log_likelihood(ring.eps_model(sched), [[0.0, 1.0]], sched)


def test_nan_from_the_model_is_reported(sched, ring):
    exact = ring.eps_model(sched)

    def model(x, t):  # goes bad above t = 500, halfway up the flow
        return exact(x, t) * (float("nan") if t[0] > 500 else 1.0)

    with pytest.raises(FloatingPointError, match="NaN"):
        log_likelihood(model, noised_sample(ring, sched, 0, 2, seed=12), sched)


def test_default_divergence_is_exact_in_low_dimension_and_hutchinson_above(sched, ring):
    """divergence="auto": exact up to D = 16 (the 2-D ring, a 1×2×2 image), Hutchinson above, where the exact one costs
    D backward passes per evaluation (one 3×8×8 image: D = 192; it took minutes with a UNet)."""
    from ddim_edu.likelihood import EXACT_DIVERGENCE_MAX_DIM

    assert EXACT_DIVERGENCE_MAX_DIM == 16
    x = noised_sample(ring, sched, 0, 2, seed=13)
    assert log_likelihood(ring.eps_model(sched), x, sched).divergence == "exact"
    for shape, expected in (((1, 4, 4), "exact"), ((1, 17, 1), "hutchinson"), ((3, 8, 8), "hutchinson")):
        gm = gaussian_image_model(sched, shape)
        model = gm.eps_model(sched)
        flat = lambda x, t, model=model: model(x.reshape(len(x), -1), t).reshape(x.shape)  # noqa: E731
        res = bits_per_dim(flat, eight_bit_images(1, shape), sched, generator=torch.Generator().manual_seed(14))
        assert res.divergence == expected, shape
        assert bool(torch.isfinite(res.bpd).all())
    # an explicit choice is kept in any dimension
    gm = gaussian_image_model(sched, (1, 17, 1))
    model = gm.eps_model(sched)
    flat = lambda x, t: model(x.reshape(len(x), -1), t).reshape(x.shape)  # noqa: E731
    assert bits_per_dim(flat, eight_bit_images(1, (1, 17, 1)), sched, divergence="exact").divergence == "exact"
