import math
import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use small tensors, where intra-op threads only add synchronisation; on a busy
    machine they can make a step tens of times slower. One thread keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """A model ``model(x, t)`` or field ``eps(x̄, σ)`` that records the second argument of each call in ``calls``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, at):
        self.calls.append(at)
        return self.fn(x, at)


@pytest.fixture(scope="session")
def recorder():
    """The class :class:`Recorder`, to wrap a model or field: ``recorder(model).calls``."""
    return Recorder


@pytest.fixture
def no_torch_fidelity(monkeypatch):
    """As if torch-fidelity were not installed: importing it, or the submodule we use, raises ImportError
    (a submodule already imported stays in sys.modules and would be found without its package)."""
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="session")
def tiny_unet_config():
    """A UNet of 8×8 RGB images small enough to run in milliseconds (two levels, attention at 4×4)."""
    from ddim_edu.image.unet import UNetConfig

    return UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), norm_groups=8, dropout=0.0)


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory, tiny_unet_config):
    """A random UNet of ``tiny_unet_config`` saved in the diffusers layout: (its folder, the model)."""
    import json

    from safetensors.torch import save_file

    from ddim_edu.image.pretrained import CONFIG_NAME, WEIGHTS_NAMES, diffusers_config, to_diffusers_state_dict
    from ddim_edu.image.unet import UNet

    torch.manual_seed(0)
    model = UNet(tiny_unet_config).eval()
    folder = tmp_path_factory.mktemp("tiny_unet")
    (folder / CONFIG_NAME).write_text(json.dumps(diffusers_config(tiny_unet_config)))
    save_file({k: v.contiguous() for k, v in to_diffusers_state_dict(model.state_dict()).items()},
              str(folder / WEIGHTS_NAMES[0]))
    return folder, model


@pytest.fixture(scope="session")
def sched():
    """DDPM's linear schedule, T = 1000."""
    from ddim_edu.schedules import linear_schedule

    return linear_schedule()


@pytest.fixture(scope="session")
def ring():
    """8 Gaussians of std 0.05 on the unit circle, whose exact ε is known."""
    from ddim_edu.mixture import GaussianMixture

    return GaussianMixture.ring(K=8, radius=1.0, std=0.05)


def _dpmpp_3m_variant(ddim_start: bool, half_d2: bool):
    """Our DPM-Solver++(3M) step, optionally with either of the two changes that make it the widely used one.

    k-diffusion's ``sample_dpmpp_3m_sde`` with η = 0 and diffusers' ``DPMSolverMultistepScheduler``
    (order 3, on 15 or more steps) differ from :func:`ddim_edu.solvers.dpmpp_3m_step` in two places:
    their first step is DDIM (``ddim_start``; ours is a DPM-Solver-2 step, one more evaluation, so
    that the start-up error is O(h³)), and they weight the second difference d₂ by
    ``-φ₃ = ½ - φ₂/h`` (``half_d2``), half the exact ``1 - 2φ₂/h``. Their second step (φ₂ on the one
    difference) and their last, x̄' = D into σ = 0, are ours. With neither change this is ours.
    """

    from ddim_edu import solvers

    def step(x, s, s_next, history):
        if s_next == 0 or len(history) == 2 or (len(history) == 1 and not ddim_start):
            return (yield from solvers.dpmpp_3m_step(x, s, s_next, history))
        d = history[-1].denoised
        x_next = (s_next / s) * x + (1 - s_next / s) * d  # DDIM; with two predictions back, plus:
        if len(history) >= 3:
            h = math.log(s / s_next)
            phi_2 = math.expm1(-h) / h + 1
            p1, p2 = history[-2], history[-3]
            r0, r1 = math.log(p1.sigma / s) / h, math.log(p2.sigma / p1.sigma) / h
            d1_0 = (d - p1.denoised) / r0
            d1_1 = (p1.denoised - p2.denoised) / r1
            d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
            x_next = x_next + phi_2 * d1 + ((0.5 - phi_2 / h) if half_d2 else (1 - 2 * phi_2 / h)) * d2
        return x_next

    return step


@pytest.fixture(scope="session")
def dpmpp_3m_variant():
    """The factory ``variant(ddim_start, half_d2)`` of DPM-Solver++(3M) step functions (see ``_dpmpp_3m_variant``)."""
    return _dpmpp_3m_variant
