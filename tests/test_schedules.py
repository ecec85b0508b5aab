import math

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


def test_spacings(sched):
    assert sched.timesteps(10, "uniform").tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert sched.timesteps(10, "trailing").tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    # Reference code: int((linspace(0, sqrt(0.8 T), S))²).
    quad = [int(v**2) for v in torch.linspace(0, math.sqrt(800), 10, dtype=torch.float64).tolist()]
    assert sched.timesteps(10, "quad").tolist() == quad
    for spacing in ("uniform", "quad", "trailing"):
        for S in (1, 7, 50, 100, 1000):
            tau = sched.timesteps(S, spacing)
            sched.check_timesteps(tau)  # strictly increasing, in range
            assert len(tau) <= S
            if spacing != "quad":
                assert len(tau) == S
    assert sched.timesteps(1000, "uniform").tolist() == list(range(1000))


def test_spacings_match_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the 'compare' extra) is not installed")
    sched = linear_schedule()
    for spacing in ("leading", "trailing"):
        for S in (10, 50, 100):
            ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            ref.set_timesteps(S)
            ours = sched.timesteps(S, "uniform" if spacing == "leading" else "trailing")
            assert ours.long().flip(0).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize(
    "tau, match",
    [
        ([5, 3, 10], "strictly increasing"),
        ([0, 0, 1], "strictly increasing"),
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
