import math

import numpy as np
import pytest
import torch

from ddim_edu.schedules import Schedule, cosine_schedule, linear_schedule


def test_linear_schedule_is_ddpm(sched):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert sched.T == 1000
    assert sched.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=0)
    # ᾱ_T of the DDPM schedule, a number quoted widely (≈ 4.04e-5).
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)


def test_cosine_schedule_matches_its_closed_form():
    s = cosine_schedule(T=1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 10, 500, 900):
        assert s.alphas_cumprod[i].item() == pytest.approx(f((i + 1) / 1000) / f(0), rel=1e-10)


def test_continuous_alpha_bar_agrees_at_integers_and_is_log_linear(sched):
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha_bar(t), sched.alphas_cumprod, rtol=1e-14, atol=0)
    assert sched.alpha_bar(-1.0).item() == 1.0  # the paper's α_0 := 1
    # Halfway between integers ᾱ is the geometric mean (log ᾱ is linear there).
    mid = sched.alpha_bar(t[:-1] + 0.5)
    torch.testing.assert_close(mid, torch.sqrt(sched.alphas_cumprod[:-1] * sched.alphas_cumprod[1:]), rtol=1e-13, atol=0)
    u = torch.linspace(-1, 999, 10001, dtype=torch.float64)
    assert bool((sched.alpha_bar(u)[1:] < sched.alpha_bar(u)[:-1]).all())


def test_sigma_and_its_inverse(sched):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(1000, generator=g, dtype=torch.float64) * 1000 - 1
    sigma = sched.sigma(t)
    a = sched.alpha_bar(t)
    torch.testing.assert_close(sigma, torch.sqrt((1 - a) / a), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.t_from_sigma(sigma), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(Schedule.alpha_bar_from_sigma(sigma), a, rtol=1e-13, atol=0)
    assert sched.sigma(-1.0).item() == 0.0
    assert sched.t_from_sigma(0.0).item() == -1.0


# The reference formulas, written with numpy as their sources write them.

def reference_uniform(T, S):
    """The paper's reference code (ermongroup/ddim, runners/diffusion.py), skip_type "uniform"."""
    skip = T // S
    seq = range(0, T, skip)
    return list(seq)


def reference_quad(T, S):
    """The paper's reference code, skip_type "quad" (repeats kept)."""
    seq = np.linspace(0, np.sqrt(T * 0.8), S) ** 2
    seq = [int(s) for s in list(seq)]
    return seq


def diffusers_leading(T, S, steps_offset=0):
    """diffusers' DDIMScheduler.set_timesteps, timestep_spacing "leading" (decreasing)."""
    step_ratio = T // S
    timesteps = (np.arange(0, S) * step_ratio).round()[::-1].copy().astype(np.int64)
    timesteps += steps_offset
    return timesteps


def diffusers_trailing(T, S):
    """diffusers' DDIMScheduler.set_timesteps, timestep_spacing "trailing" (decreasing)."""
    step_ratio = T / S
    timesteps = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
    timesteps -= 1
    return timesteps


def every_S(T):
    """Every S from 1 to T, or for large T the first 300, a dense sample and the last 300."""
    if T <= 2000:
        return range(1, T + 1)
    return sorted({*range(1, 301), *range(301, T - 300, 7), *range(T - 300, T + 1)})


@pytest.mark.parametrize("T", [1000, 2, 3, 7, 64, 999, 1001, 1024, 4000])
def test_integer_spacings_match_their_reference_formulas(T):
    sched = linear_schedule(T=T)
    overshoots = 0
    for S in every_S(T):
        uniform = sched.timesteps(S, "uniform")
        assert uniform.tolist() == reference_uniform(T, S), (T, S)
        leading = sched.timesteps(S, "leading")
        assert leading.tolist() == diffusers_leading(T, S)[::-1].tolist(), (T, S)
        # quad: the reference's set of values; a repeat is a step from a timestep to itself (the identity).
        quad = sched.timesteps(S, "quad")
        assert quad.tolist() == sorted(set(reference_quad(T, S))), (T, S)
        trailing = sched.timesteps(S, "trailing")
        ref = diffusers_trailing(T, S)
        if len(ref) == S + 1:  # numpy's arange overshoots by one entry near 0, which diffusers returns as -1
            assert ref[-1] == -1, (T, S)
            ref = ref[:-1]
            overshoots += 1
        assert trailing.tolist() == ref[::-1].tolist(), (T, S)
        for tau in (uniform, leading, quad, trailing):
            assert tau.dtype == torch.float64
            sched.check_timesteps(tau)  # strictly increasing, in [0, T-1]
        assert len(uniform) == math.ceil(T / (T // S)) >= S
        assert len(leading) == len(trailing) == S
        assert len(quad) <= S
        assert trailing[-1] == T - 1
    if T == 1000:
        assert overshoots > 0  # the dropped -1 is not hypothetical (S = 61, for one)


def test_spacings(sched):
    assert sched.timesteps(10, "uniform").tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert sched.timesteps(10, "trailing").tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    # Reference code: int((linspace(0, sqrt(0.8 T), S))²).
    quad = [int(v**2) for v in torch.linspace(0, math.sqrt(800), 10, dtype=torch.float64).tolist()]
    assert sched.timesteps(10, "quad").tolist() == quad
    for spacing in ("uniform", "leading", "quad", "trailing"):
        for S in (1, 7, 50, 100, 1000):
            tau = sched.timesteps(S, spacing)
            sched.check_timesteps(tau)  # strictly increasing, in range
            if spacing in ("leading", "trailing"):
                assert len(tau) == S
            if spacing == "quad":
                assert len(tau) <= S
    # The default stays "uniform", and on divisors of T it is the exact-S grid (i-1)·T/S.
    for S in (10, 20, 50, 100, 1000):
        expected = [i * (1000 // S) for i in range(S)]
        assert sched.timesteps(S).tolist() == sched.timesteps(S, "uniform").tolist() == expected
        assert sched.timesteps(S, "leading").tolist() == expected
    assert sched.timesteps(1000, "uniform").tolist() == list(range(1000))
    # Where S does not divide T, "uniform" is range(0, T, T // S) and "leading" keeps exactly S points.
    assert sched.timesteps(3, "uniform").tolist() == [0, 333, 666, 999]
    assert sched.timesteps(3, "leading").tolist() == [0, 333, 666]
    assert sched.timesteps(7, "uniform").tolist() == [0, 142, 284, 426, 568, 710, 852, 994]
    assert len(sched.timesteps(600, "uniform")) == 1000  # ⌊T/S⌋ = 1: every timestep
    assert sched.timesteps(600, "leading").tolist() == list(range(600))
    # quad is int() of numpy's float64 linspace squared: 287 and 511 here, where a float rounding
    # of the linspace puts the square just below an integer.
    quad16 = sched.timesteps(16, "quad").tolist()
    assert 287 in quad16 and 511 in quad16 and 288 not in quad16 and 512 not in quad16
    assert quad16 == reference_quad(1000, 16)
    # Large S: int() repeats small indices; the repeats are dropped, the values are the reference's.
    assert len(sched.timesteps(1000, "quad")) == len(set(reference_quad(1000, 1000))) < 1000
    # trailing keeps exactly S points where diffusers' numpy arange overshoots to -1.
    assert sched.timesteps(61, "trailing").tolist() == diffusers_trailing(1000, 61)[:-1][::-1].tolist()


def test_spacings_match_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the 'compare' extra) is not installed")
    sched = linear_schedule()
    for spacing in ("leading", "trailing"):
        for S in (3, 7, 10, 16, 50, 61, 100, 333, 999, 1000):
            ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            ref.set_timesteps(S)
            theirs = [t for t in ref.timesteps.tolist() if t >= 0]  # trailing, S = 61: diffusers ends at -1
            ours = sched.timesteps(S, spacing)
            assert ours.long().flip(0).tolist() == theirs
            if S in (10, 50, 100, 1000):
                assert sched.timesteps(S, "uniform").tolist() == sched.timesteps(S, "leading").tolist()


@pytest.mark.parametrize(
    "tau, match",
    [
        ([5, 3, 10], "strictly monotone"),
        ([0, 0, 1], "strictly monotone"),
        ([-1, 10], r"\[0, T-1\]"),
        ([10, 1000], r"\[0, T-1\]"),
        ([0.0, float("nan")], r"\[0, T-1\]"),
        ([], "non-empty"),
        ([[1, 2]], "1-D"),
        (list(range(1001)), "more than T"),
    ],
)
def test_bad_timesteps(sched, tau, match):
    with pytest.raises(ValueError, match=match):
        sched.check_timesteps(tau)


def test_bad_arguments(sched):
    with pytest.raises(ValueError, match="S"):
        sched.timesteps(1001)
    with pytest.raises(ValueError, match="S"):
        sched.timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        sched.timesteps(10, "cubic")
    with pytest.raises(ValueError, match="t must lie"):
        sched.alpha_bar(1000.0)
    with pytest.raises(ValueError, match="T must"):
        linear_schedule(T=1)
    with pytest.raises(ValueError, match="betas"):
        Schedule(torch.tensor([0.1, 1.5]))


def test_blend_runs_from_uniform_in_t_to_uniform_in_log_sigma(sched):
    """``"blend"`` is (1 - w) τ_linear + w τ_logsnr point by point: w = 0 and 1 give the two grids, and
    every w an increasing grid from t_min to T - 1 lying between them."""
    for S, t_min in ((2, 0.0), (7, 3.0), (30, 10.0)):
        linear = sched.timesteps(S, "linear", t_min=t_min)
        logsnr = sched.timesteps(S, "logsnr", t_min=t_min)
        torch.testing.assert_close(sched.timesteps(S, "blend", t_min=t_min, weight=0.0), linear, rtol=0, atol=0)
        torch.testing.assert_close(sched.timesteps(S, "blend", t_min=t_min, weight=1.0), logsnr, rtol=0, atol=1e-12)
        for w in (0.25, 0.6):
            tau = sched.timesteps(S, "blend", t_min=t_min, weight=w)
            assert tau[0] == t_min and tau[-1] == sched.T - 1 and bool((tau.diff() > 0).all())
            assert bool((tau >= torch.minimum(linear, logsnr) - 1e-9).all() and (tau <= torch.maximum(linear, logsnr) + 1e-9).all())
    with pytest.raises(ValueError, match=r"weight must be a number in \[0, 1\]"):
        sched.timesteps(5, "blend", weight=1.5)


def test_calibrated_grid_is_the_frozen_blend_between_its_anchors(sched):
    """At an anchor of ``CALIBRATED_GRID`` the grid is that blend; between two anchors w and log(1 + t_min)
    are linear in log S (checked at the geometric midpoint); beyond the ends they are held."""
    from ddim_edu.schedules import CALIBRATED_GRID, calibrated_blend

    for S, w, t_min in CALIBRATED_GRID:
        torch.testing.assert_close(sched.timesteps(S, "calibrated"), sched.timesteps(S, "blend", t_min=t_min, weight=w),
                                   rtol=0, atol=1e-9)
    (S0, w0, t0), (S1, w1, t1) = CALIBRATED_GRID[:2]
    mid = math.sqrt(S0 * S1)
    w, t_min = calibrated_blend(mid)
    assert w == pytest.approx((w0 + w1) / 2) and math.log1p(t_min) == pytest.approx((math.log1p(t0) + math.log1p(t1)) / 2)
    assert calibrated_blend(2) == pytest.approx(calibrated_blend(S0)) and calibrated_blend(400) == pytest.approx(calibrated_blend(CALIBRATED_GRID[-1][0]))
    for S in range(2, 60):
        tau = sched.timesteps(S, "calibrated")
        assert len(tau) == S and tau[-1] == sched.T - 1 and bool((tau.diff() > 0).all())
    with pytest.raises(ValueError, match="chooses its own t_min"):
        sched.timesteps(10, "calibrated", t_min=3.0)
