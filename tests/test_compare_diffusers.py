"""Cross-check against diffusers' DDIMScheduler: same model, x_T, timesteps and noise, float64.

The ODE methods are compared in test_compare_diffusers_ode.py."""
import pytest
import torch

from ddim_edu.mixture import GaussianMixture
from ddim_edu.schedules import linear_schedule
from ddim_edu.solvers import sample

diffusers = pytest.importorskip("diffusers", reason="diffusers (the 'compare' extra) is not installed")


def diffusers_ddim(model, x, sched, S, eta, noises):
    ref = diffusers.DDIMScheduler(num_train_timesteps=sched.T, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="leading")
    ref.alphas_cumprod = sched.alphas_cumprod.clone()  # the same schedule in float64 (diffusers keeps float32)
    ref.set_timesteps(S)
    xs = [x]
    for t, noise in zip(ref.timesteps, noises):
        eps = model(x, torch.full((len(x),), float(t), dtype=torch.float64))
        x = ref.step(eps, int(t), x, eta=eta, variance_noise=noise).prev_sample
        xs.append(x)
    return torch.stack(xs)


@pytest.mark.parametrize("S", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.2, 1.0])
def test_ddim_matches_diffusers_step_by_step(S, eta):
    sched = linear_schedule()
    model = GaussianMixture.ring().eps_model(sched)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample(model, x, sched, sched.timesteps(S, "leading"), eta=eta,
                  generator=torch.Generator().manual_seed(1), return_trajectory=True)
    # Our sampler draws one noise tensor per step with σ > 0 (every step but the last when η > 0).
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(x.shape, generator=gen, dtype=x.dtype) if (eta > 0 and k < S - 1) else torch.zeros_like(x)
              for k in range(S)]
    theirs = diffusers_ddim(model, x, sched, S, eta, noises)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - theirs).abs().max() < 1e-10  # in fact they agree to rounding
