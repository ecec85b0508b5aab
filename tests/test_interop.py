"""Adapters: a diffusers UNet2DModel on our samplers (from_diffusers), our methods inside a diffusers pipeline
(DiffusersScheduler), and an EDM-style denoiser D(x̄, σ) on every ODE method (denoiser_field + integrate).

The diffusers tests build a small random UNet2DModel (with ``downsample_padding=1``, a configuration our own
UNet does not implement) and need no network."""
import math

import pytest
import torch

from ddim_edu.mixture import GaussianMixture
from ddim_edu.model import EpsField, denoiser_field
from ddim_edu.schedules import karras_sigmas, linear_schedule
from ddim_edu.solvers import ADAPTIVE, METHODS, SAMPLERS, integrate, sample

diffusers = pytest.importorskip("diffusers")

from ddim_edu.interop import DiffusersScheduler, from_diffusers  # noqa: E402

# float32 sampling: the pipeline and sample() may round a model input differently, and a random UNet amplifies that
# over the steps (up to 5e-6 on one CPU, 1.1e-5 on another, for heun on the karras grid); a step on a wrong grid or
# with a wrong coefficient moves the images by 0.1 or more.
ATOL = 1e-4


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, downsample_padding=1,
    )
    return net.eval()


@pytest.fixture(scope="module")
def ddpm_scheduler():
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


class VPrediction(torch.nn.Module):
    """The same network, answering in v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0 (or x_0 itself with ``kind="sample"``)."""

    def __init__(self, unet, alphas_cumprod, kind="v"):
        super().__init__()
        self.unet, self.alphas_cumprod, self.kind = unet, alphas_cumprod, kind

    def forward(self, x, t):
        eps = self.unet(x, t).sample
        a = self.alphas_cumprod[torch.as_tensor(t).reshape(-1)[:1].round().long()].to(x.dtype).reshape(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        out = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.kind == "v" else x0
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample=out)


def pipeline_images(unet, scheduler, steps, seed=0):
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="pt").images


def loop_images(net, scheduler, steps, seed=0):
    """The loop of DDPMPipeline.__call__, for a network that is not a diffusers model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t).sample, t, x, generator=g).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def our_images(model, schedule, tau, method, seed=0, **options):
    """sample() from the x_T the pipeline draws (same generator, then its per-step noise), as the pipeline outputs it."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    x0 = sample(model, x_T, schedule, tau, method, generator=g, **options)
    return (x0 / 2 + 0.5).clamp(0, 1)  # as the pipeline returns it with output_type="pt"


# --- from_diffusers -----------------------------------------------------------------------------------


def test_from_diffusers_is_one_call_for_any_unet_and_dtype(unet, ddpm_scheduler):
    model, schedule = from_diffusers(unet, ddpm_scheduler)
    assert torch.allclose(schedule.alphas_cumprod, linear_schedule().alphas_cumprod, rtol=1e-6, atol=0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 321.0)
    torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=0, atol=0)  # ε as the network gives it
    eps64 = model(x.double(), t.double())  # a float32 network on a float64 state: cast in, cast back
    assert eps64.dtype == torch.float64
    torch.testing.assert_close(eps64.float(), unet(x, t).sample, rtol=0, atol=0)
    ddpm_scheduler.set_timesteps(4)  # diffusers' descending timesteps are accepted as τ
    tau = ddpm_scheduler.timesteps
    for method in ("ddim", "dpmpp_2m"):
        x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        out32 = sample(model, x_T, schedule, tau, method)
        out64 = sample(model, x_T.double(), schedule, tau, method)
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), out32, rtol=0, atol=1e-4)
        torch.testing.assert_close(out32, sample(model, x_T, schedule, tau.flip(0), method), rtol=0, atol=0)


@pytest.mark.parametrize("kind, prediction_type", [("v", "v_prediction"), ("sample", "sample")])
def test_v_and_x0_prediction_give_the_epsilon_route(unet, kind, prediction_type):
    """The same network answering in v (or x_0), through its scheduler's prediction_type, samples as the ε route."""
    eps_scheduler = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False)
    other_scheduler = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False, prediction_type=prediction_type)
    other = VPrediction(unet, eps_scheduler.alphas_cumprod, kind)
    (eps_model, schedule), (other_model, _) = from_diffusers(unet, eps_scheduler), from_diffusers(other, other_scheduler)
    tau = schedule.timesteps(4, "leading")  # integer timesteps: the wrapper reads ᾱ there
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for method in ("ddim", "unipc"):
        torch.testing.assert_close(sample(other_model, x_T, schedule, tau, method), sample(eps_model, x_T, schedule, tau, method),
                                   rtol=0, atol=1e-4)
    for method in ("ddim", "dpmpp_2m"):
        pushed = loop_images(other, DiffusersScheduler(method=method, prediction_type=prediction_type), 4)
        torch.testing.assert_close(pushed, our_images(eps_model, schedule, tau, method), rtol=0, atol=1e-4)


# --- DiffusersScheduler in a pipeline -------------------------------------------------------------------


@pytest.mark.parametrize("method", [*SAMPLERS, *METHODS])
def test_pipeline_with_our_scheduler_equals_sample(unet, ddpm_scheduler, method):
    """DDPMPipeline + DiffusersScheduler(method) = sample(method) on the same weights and x_T, with the model
    called exactly where sample() calls it (as many times as Method.nfe says)."""
    model, schedule = from_diffusers(unet, ddpm_scheduler)
    scheduler = DiffusersScheduler(method=method)
    S = 3
    images = pipeline_images(unet, scheduler, S)
    assert len(scheduler.timesteps) == (S if method in SAMPLERS else METHODS[method].nfe(S))
    torch.testing.assert_close(images, our_images(model, schedule, schedule.timesteps(S, "leading"), method), rtol=0, atol=ATOL)


@pytest.mark.parametrize("method, spacing, options", [
    ("ddim", "trailing", {"eta": 0.5}),  # stochastic: the pipeline's generator draws the same noise
    ("pc_sigma", "logsnr", {"final_step": "extrapolate"}),  # fractional timesteps, the extrapolated last step
    ("heun", "karras", {}),
    ("unipc", "calibrated", {"final_step": "gaussian"}),  # the Gaussian last step, on the calibrated grid
    ("sigma_hat", "leading", {"clip_sample": False}),
])
def test_pipeline_options_and_fractional_grids(unet, ddpm_scheduler, method, spacing, options):
    model, schedule = from_diffusers(unet, ddpm_scheduler)
    scheduler = DiffusersScheduler(method=method, timestep_spacing=spacing, **options)
    images = pipeline_images(unet, scheduler, 4, seed=5)
    ours = dict(options)
    if "clip_sample" in ours:
        ours["clip_x0"] = math.inf if not ours.pop("clip_sample") else 1.0
    assert torch.is_floating_point(scheduler.timesteps) == (spacing in ("logsnr", "karras", "calibrated"))
    torch.testing.assert_close(images, our_images(model, schedule, schedule.timesteps(4, spacing), method, seed=5, **ours),
                               rtol=0, atol=ATOL)


def test_pipeline_on_the_calibrated_and_equalised_grids(unet, ddpm_scheduler):
    """The grids chosen without the answer serve the adapter too: ``timestep_spacing="calibrated"``, and
    ``"equalised"`` with the model's pilot profile, give sample()'s result on the same grid."""
    from ddim_edu.solvers import pilot_profile

    model, schedule = from_diffusers(unet, ddpm_scheduler)
    profile = pilot_profile(model, schedule, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9)), levels=12)
    for spacing, extra in (("calibrated", {}), ("equalised", {"profile": profile})):
        scheduler = DiffusersScheduler(method="dpmpp_2m", timestep_spacing=spacing, **extra)
        images = pipeline_images(unet, scheduler, 4, seed=5)
        tau = schedule.timesteps(4, spacing, **extra)
        torch.testing.assert_close(images, our_images(model, schedule, tau, "dpmpp_2m", seed=5), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="takes profile="):
        DiffusersScheduler(timestep_spacing="equalised")
    with pytest.raises(ValueError, match="for that spacing only"):
        DiffusersScheduler(timestep_spacing="logsnr", profile=profile)


def test_scheduler_from_a_diffusers_config_and_its_refusals(unet, ddpm_scheduler):
    config = dict(ddpm_scheduler.config)
    scheduler = DiffusersScheduler.from_config(config, method="dpmpp_3m")
    assert scheduler.config["method"] == "dpmpp_3m" and scheduler.schedule.T == 1000
    with pytest.raises(ValueError, match="clip_sample=True applies to the Eq 12 samplers"):
        DiffusersScheduler.from_config({**config, "clip_sample": True}, method="unipc")
    DiffusersScheduler.from_config({**config, "clip_sample": True}, method="ddim")  # the Eq 12 samplers clip
    with pytest.raises(ValueError, match="chooses its evaluations while it runs"):
        DiffusersScheduler(method=ADAPTIVE[0])
    with pytest.raises(ValueError, match="unknown method"):
        DiffusersScheduler(method="dpm++")
    with pytest.raises(ValueError, match=r"unknown scheduler config entries \['beta_sart'\]"):
        DiffusersScheduler(beta_sart=0.1)
    with pytest.raises(ValueError, match="thresholding.*not implemented"):
        DiffusersScheduler(thresholding=True)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DiffusersScheduler(timestep_spacing="quadratic")

    scheduler = DiffusersScheduler(method="heun")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(3)
    t0 = scheduler.timesteps[0]
    with pytest.raises(ValueError, match=r"timestep 5 where scheduler.timesteps\[0\]"):
        scheduler.step(unet(x, t0).sample, 5, x)
    out = scheduler.step(unet(x, t0).sample, t0, x).prev_sample
    with pytest.raises(ValueError, match="not the one the previous step returned"):
        scheduler.step(unet(out, scheduler.timesteps[1]).sample, scheduler.timesteps[1], out + 1)
    assert scheduler.step(unet(out, scheduler.timesteps[1]).sample, scheduler.timesteps[1], out, return_dict=False)[0].shape == x.shape


def test_add_noise_is_eq4(ddpm_scheduler):
    ours = DiffusersScheduler()
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ddpm_scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)  # float32 ᾱ there


# --- an EDM-style denoiser D(x̄, σ) on a σ grid ------------------------------------------------------------


def test_edm_denoiser_runs_every_method_on_a_variance_exploding_grid():
    """A denoiser in EDM's form (x̄ = x_0 + σ n, D its x_0 prediction, σ from 80 down to 0.002, no β schedule).
    For Gaussian data D is linear, D = μ + s²/(s² + σ²)(x̄ - μ), and Eq 14's exact solution is
    x̄(σ) = μ + (x̄_T - μ) sqrt(s² + σ²)/sqrt(s² + σ_max²): every method reaches it at its measured order
    along Karras et al.'s grid; the last step, σ_min → 0, returns D (the x_0 prediction) for every method."""
    mu, s, s_min, s_max = 0.3, 0.5, 0.002, 80.0
    D = lambda x_bar, sigma: mu + s**2 / (s**2 + sigma[:, None] ** 2) * (x_bar - mu)  # noqa: E731
    field = denoiser_field(D)
    x_bar = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(s**2 + s_max**2) + mu
    exact = mu + (x_bar - mu) * math.sqrt(s**2 + s_min**2) / math.sqrt(s**2 + s_max**2)  # x̄ at σ_min
    for name, m in METHODS.items():
        errors = [(integrate(field, x_bar, karras_sigmas(n, s_min, s_max)[:-1], name) - exact).abs().max().item()
                  for n in (80, 160)]
        assert math.log2(errors[0] / errors[1]) > m.order - 0.4, (name, errors)
        to_zero = integrate(field, exact, [s_min, 0.0], name)
        torch.testing.assert_close(to_zero, D(exact, torch.full((64,), s_min, dtype=torch.float64)), rtol=1e-12, atol=1e-12)


def test_denoiser_field_agrees_with_the_model_route(sched):
    """On a DDPM schedule, the denoiser D(x̄, σ) = x̄ - σ ε(x̄ / sqrt(1+σ²), t(σ)) gives the field of EpsField."""
    ring = GaussianMixture.ring()
    f = ring.probability_flow()  # the exact ε as a function of (σ, x̄)
    D = lambda x_bar, sigma: x_bar - sigma[:, None] * f(sigma[0], x_bar)  # noqa: E731
    x_bar = torch.randn(16, 2, dtype=torch.float64)
    model_field = EpsField(ring.eps_model(sched), sched)
    for level in (0.05, 1.3, 40.0):
        torch.testing.assert_close(denoiser_field(D)(x_bar, level), model_field(x_bar, level), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="denoiser must return D"):
        denoiser_field(lambda x, sigma: x[:, :1])(x_bar, 1.0)
