"""Training an image ε-model (e.g. a UNet): :func:`ddim_edu.training.train_eps_model` with what images add.

DDIM (Section 5) samples from networks trained as in DDPM (Ho et al. 2020, Appendix B), whose CIFAR-10
recipe is ``TrainConfig()`` (:class:`ddim_edu.training.TrainConfig`). The trainer, its checkpoints
(atomic, exactly resumable, written on Ctrl-C or SIGTERM) and DDP are :func:`~ddim_edu.training.train_eps_model`'s;
:func:`train_image_model` runs it on images [N, C, H, W] and adds:

- for a :class:`~ddim_edu.image.unet.UNet`, a check that the images fit it, and its config stored in
  every checkpoint (``"unet_config"``), so that ``python -m ddim_edu sample --checkpoint`` needs no
  ``--config``; :func:`load_checkpoint_unet` reads a checkpoint back as a UNet;
- sample sheets: DDIM samples of the EMA model from fixed noise, saved as PNG grids during training;
- bfloat16 autocast and channels_last on by default (they act on CUDA only).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..schedules import Schedule
from ..solvers import sample
from ..training import TrainConfig, TrainResult, data_range, load_checkpoint, train_eps_model
from ..utils.checks import check_int
from .grids import make_grid, save_png
from .pretrained import unet_from_state_dict
from .unet import UNet, UNetConfig

__all__ = ["CHECKPOINT_WEIGHTS", "load_checkpoint_unet", "train_image_model"]

CHECKPOINT_WEIGHTS = ("ema", "model")
# Float images may stray this far beyond [-1, 1] (e.g. dequantised pixels lie within 1/255 of it).
_FLOAT_IMAGE_SLACK = 0.01


def load_checkpoint_unet(path, config: UNetConfig | None = None, weights: str = "ema") -> UNet:
    """A :func:`train_image_model` checkpoint's EMA weights (or, with ``weights="model"``, the trained
    weights themselves) as a UNet (eval mode).

    The file is read with ``torch.load(..., weights_only=True)``; its ``"ema"`` and ``"model"`` entries
    are state dicts of the bare model. The EMA is what one samples from after a long run; early in a
    run (fewer than about 1/(1 − decay) steps) it is still close to the initial weights. The
    architecture is ``config`` if given, else the one the trainer stored with a UNet
    (``"unet_config"``), else the CIFAR-10 UNet.
    """
    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights must be one of {CHECKPOINT_WEIGHTS}, got {weights!r}")
    try:
        checkpoint = load_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"{e}; for a plain state dict or a diffusers folder use load_unet (--model)") from None
    stored = checkpoint.get("unet_config")
    if config is None and stored is not None:
        try:
            config = UNetConfig(**stored)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} stores a UNet config that cannot be used ({e}); pass config= (--config)") from None
    return unet_from_state_dict(checkpoint[weights], config, source=f"{path} ({weights} weights)")


def train_image_model(model: nn.Module, data: Tensor, schedule: Schedule, config: TrainConfig, *, sample_dir=None,
                      sample_every: int = 5000, n_samples: int = 64, sample_steps: int = 50, bf16: bool = True,
                      channels_last: bool = True, callback: Callable[[int, Tensor, nn.Module, nn.Module], None] | None = None,
                      **options) -> TrainResult:
    """:func:`~ddim_edu.training.train_eps_model` on images (``TrainConfig()`` is DDPM's CIFAR-10 recipe).

    ``data``: images [N, C, H, W], uint8 pixels (mapped to [-1, 1] per batch) or floats in [-1, 1]
    (used as float32; floats beyond [-1.01, 1.01], e.g. pixels 0–255 as floats, are refused before
    training); on the CPU is fine, batches are moved to the model's device. A UNet's
    ``UNetConfig`` must take these images, and is stored in every checkpoint.
    ``sample_dir``: every ``sample_every`` steps and at the end, ``n_samples`` DDIM samples (η = 0,
    ``sample_steps`` uniform steps) of the EMA model from fixed noise are saved as
    ``samples_<step>.png`` by rank 0 (the noise has its own generator: sampling does not change the
    training run). ``bf16`` and ``callback`` are as in ``train_eps_model`` and so are ``options``
    (``checkpoint``, ``checkpoint_every``, ``compile``, ``progress``, ``threads``); ``channels_last`` stores images
    and activations NHWC on CUDA.
    """
    if not isinstance(data, Tensor) or data.ndim != 4 or data.shape[0] < 1 or not (data.dtype == torch.uint8 or data.is_floating_point()):
        desc = (tuple(data.shape), data.dtype) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be images [N, C, H, W] (uint8 pixels or floats in [-1, 1]) with N >= 1, got {desc}")
    if data.is_floating_point():
        lo, hi = data_range(data)
        if lo < -1 - _FLOAT_IMAGE_SLACK or hi > 1 + _FLOAT_IMAGE_SLACK:
            hint = (": pixels 0–255 as floats? Pass them as uint8 (data.round().to(torch.uint8)) or as data / 127.5 - 1"
                    if hi > 2 else "")
            raise ValueError(f"images must be uint8 pixels or floats in [-1, 1]; these float images lie in "
                             f"[{lo:.4g}, {hi:.4g}]{hint}")
    for name, value in (("sample_every", sample_every), ("n_samples", n_samples), ("sample_steps", sample_steps)):
        check_int(name, value)
    unet_config = model.config if isinstance(getattr(model, "config", None), UNetConfig) else None
    if unet_config is not None:
        takes = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
        if tuple(data.shape[1:]) != takes:
            raise ValueError(f"data are images {tuple(data.shape[1:])} but the UNet takes {takes}: resize the data or "
                             "change UNetConfig(in_channels=..., image_size=...)")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    sample_noise = None
    if sample_dir is not None and rank == 0:
        sample_noise = torch.randn((n_samples, *data.shape[1:]), generator=torch.Generator().manual_seed(config.seed))

    def after_step(step: int, loss: Tensor, model: nn.Module, ema: nn.Module) -> None:
        if callback is not None:
            callback(step, loss, model, ema)
        done = step + 1
        if sample_noise is not None and (done % sample_every == 0 or done == config.steps):
            was_training = ema.training
            ema.eval()
            with torch.no_grad():
                x_T = sample_noise.to(next(ema.parameters()).device)
                x0 = sample(ema, x_T, schedule, schedule.timesteps(min(sample_steps, schedule.T)), method="ddim", eta=0.0)
            ema.train(was_training)
            save_png(make_grid(x0), Path(sample_dir) / f"samples_{done:07d}.png")

    return train_eps_model(model, data if data.dtype == torch.uint8 else data.float(), schedule, config,
                           checkpoint_extra=None if unet_config is None else {"unet_config": asdict(unet_config)},
                           bf16=bf16, channels_last=channels_last, callback=after_step, **options)
