"""Training an image ε-model (e.g. a UNet) with DDPM's L_1, with checkpoints that resume exactly.

DDIM (Section 5) samples from networks trained as in DDPM (Ho et al. 2020, Appendix B): L_1
(Eq 5 with γ = 1, :func:`ddim_edu.training.simple_loss`), Adam at lr 2e-4 with a linear warm-up
over 5000 steps, gradient norms clipped at 1, an EMA of the weights with decay 0.9999, random
horizontal flips, batch 128. :func:`train_image_model` does this for any ``nn.Module`` with
``forward(x, t)`` (x [B, C, H, W], t float [B] of timestep indices), with what a real run needs:

- all randomness of a step (minibatch indices, flips, timesteps t, noise ε) comes from one
  ``torch.Generator`` seeded with ``seed``, drawn for the whole (global) batch in a fixed order;
- checkpoints hold model, EMA, optimiser, lr scheduler, step, loss history, the random states
  (torch's CPU and CUDA generators and the data generator) and, for a :class:`~ddim_edu.image.unet.UNet`,
  its config (so that ``python -m ddim_edu sample --checkpoint`` needs no ``--config``), as plain
  tensors and Python values, so
  ``torch.load(path, weights_only=True)`` reads them; they are written atomically (temporary file
  in the same folder, fsync, ``os.replace``), so a crash or Ctrl-C never leaves a torn file;
- resuming is exact: on a CPU, N steps, stop, resume, N more steps give the same bits as 2N steps;
- Ctrl-C (KeyboardInterrupt) between steps writes a checkpoint of the last finished step first;
  SIGTERM (what a job scheduler or torchrun sends to stop a run) is treated as Ctrl-C;
- under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in
  DistributedDataParallel and each rank takes its contiguous share of the global batch; since
  DDP averages gradients and every rank draws the same global batch, the result equals
  one-process training on the global batch up to float rounding (for a model without dropout).
  The model's own randomness (dropout) is seeded per rank and step, so masks differ across
  ranks and a resumed run draws the same ones. Only rank 0 writes files.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ..forward import q_sample
from ..schedules import Schedule
from ..solvers import sample
from ..training import simple_loss
from ..utils.checks import check_int
from ..utils.files import atomic_write, load_weights_only
from ..utils.seeds import derive_seed
from ..utils.signals import sigterm_as_keyboard_interrupt
from .data import pixels_to_float
from .grids import make_grid, save_png
from .pretrained import unet_from_state_dict
from .unet import UNet, UNetConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_WEIGHTS",
    "ImageTrainResult",
    "linear_warmup",
    "load_checkpoint",
    "load_checkpoint_unet",
    "save_checkpoint",
    "train_image_model",
]

CHECKPOINT_FORMAT = "ddim_edu.image_training/1"
# Under DDP, torch's generators (dropout) are seeded per (rank, step) from this stream: shared
# generators would give every rank the same masks, and states carried from step to step would differ
# per rank and would all have to be checkpointed.
_STREAM_DROPOUT = 2
_CHECKPOINT_KEYS = ("format", "step", "model", "ema", "ema_n_averaged", "optimizer", "scheduler", "rng", "losses", "config")


@dataclass
class ImageTrainResult:
    """What :func:`train_image_model` returns.

    ``model`` is the trained network (the object passed in), ``ema`` its EMA copy in eval mode (the
    one to sample with), ``losses`` the global-batch L_1 loss of every step since step 0 (float64
    [step], earlier runs' steps read from the checkpoint), ``step`` the number of steps done, and
    ``seconds`` / ``images_per_second`` the wall time and throughput of this call's steps.
    """

    model: nn.Module
    ema: nn.Module
    losses: Tensor
    step: int
    seconds: float
    images_per_second: float


def linear_warmup(step: int, warmup: int) -> float:
    """The lr multiplier at ``step`` (0-based): ``(step + 1) / warmup`` during warm-up, then 1 (DDPM's schedule)."""
    return 1.0 if step >= warmup else (step + 1) / warmup


# --- the loss on one rank's share of the global batch -----------------------------------------------


def shard_loss(model, x0: Tensor, schedule: Schedule, generator: torch.Generator, batch_size: int, lo: int) -> Tensor:
    """L_1 on rows ``lo : lo + len(x0)`` of a global batch of ``batch_size`` examples.

    Draws t and ε for the *whole* global batch, in :func:`~ddim_edu.training.simple_loss`'s order
    (t [B] first, then ε [B, …]), and uses this shard's rows, so the generator advances alike on
    every rank. With ``lo = 0`` and ``len(x0) = batch_size`` this is ``simple_loss`` exactly.
    """
    n = x0.shape[0]
    t = torch.randint(0, schedule.T, (batch_size,), generator=generator)[lo:lo + n]
    eps = torch.randn((batch_size, *x0.shape[1:]), generator=generator, dtype=x0.dtype)[lo:lo + n].to(x0.device)
    x_t = q_sample(x0, schedule.alphas_cumprod[t], eps)  # Eq 4
    pred = model(x_t, t.to(device=x0.device, dtype=x0.dtype))
    return (pred - eps).pow(2).flatten(1).sum(1).mean()


# --- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(path, checkpoint: dict) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`ddim_edu.utils.files.atomic_write`): if anything fails
    (or Ctrl-C arrives) before the rename, the previous file at ``path`` is untouched."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(checkpoint, f)
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint of :func:`train_image_model` with ``weights_only=True`` (no arbitrary unpickling).

    Raises FileNotFoundError if it is missing and ValueError if it is truncated, corrupt, or not
    such a checkpoint. ``checkpoint["ema"]`` is a ``state_dict`` for the bare model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = load_weights_only(path)
    except ValueError as err:
        raise ValueError(f"checkpoint {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (written by ddim_edu.image.training.train_image_model)")
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; it is damaged or from another version")
    return checkpoint


CHECKPOINT_WEIGHTS = ("ema", "model")


def load_checkpoint_unet(path, config: UNetConfig | None = None, weights: str = "ema") -> UNet:
    """A :func:`ddim_edu.image.training.train_image_model` checkpoint's EMA weights (or, with
    ``weights="model"``, the trained weights themselves) as a UNet (eval mode).

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


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch_cpu": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # one row per visible device
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch_cpu"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --- distributed helpers ----------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_(tensor: Tensor, device: torch.device) -> Tensor:
    """Rank 0's value of a CPU tensor on every rank (through ``device`` for NCCL)."""
    buf = tensor.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(buf, src=0)
    return buf.cpu()


def _sync_ranks(step: int, generator: torch.Generator, device: torch.device, checkpoint) -> None:
    """Check that every rank starts at rank 0's step, then give all ranks rank 0's data generator.

    The same collectives run on every rank, resumed or not. DDP broadcasts the weights itself;
    the data generators must agree too, so that all ranks draw the same global batch.
    """
    bounds = torch.tensor([step, -step], dtype=torch.int64)
    bounds = bounds.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)  # (largest step, -smallest step) over the ranks
    if int(bounds[0]) != -int(bounds[1]):
        raise ValueError(f"the ranks start at different steps ({-int(bounds[1])} to {int(bounds[0])}; this is rank "
                         f"{dist.get_rank()} at step {step}): every rank must see the same checkpoint {checkpoint} "
                         "(put it on a shared file system)")
    generator.set_state(_broadcast_(generator.get_state(), device))


def _global_mean(loss: Tensor, world: int) -> Tensor:
    if world == 1:
        return loss.detach()
    total = loss.detach().clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / world


# --- the trainer -------------------------------------------------------------------------------------------


def train_image_model(
    model: nn.Module,
    data: Tensor,
    schedule: Schedule,
    *,
    steps: int = 800_000,
    batch_size: int = 128,
    lr: float = 2e-4,
    warmup: int = 5000,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.9999,
    hflip: bool = True,
    seed: int = 0,
    checkpoint=None,
    checkpoint_every: int = 5000,
    sample_dir=None,
    sample_every: int = 5000,
    n_samples: int = 64,
    sample_steps: int = 50,
    bf16: bool = True,
    channels_last: bool = True,
    compile: bool | dict = False,
    progress: bool = True,
    callback: Callable[[int, Tensor, nn.Module, nn.Module], None] | None = None,
) -> ImageTrainResult:
    """Minimise L_1 with AdamW on random minibatches of ``data`` (DDPM's CIFAR-10 recipe by default).

    ``data``: images [N, C, H, W], uint8 pixels (mapped to [-1, 1] per batch) or floats in [-1, 1];
    on the CPU is fine, batches are moved to the model's device. Each step draws ``batch_size``
    indices (with replacement), then a flip bit per image (if ``hflip``), then t and ε per image
    (:func:`shard_loss`), all from one generator seeded with ``seed``. The lr rises linearly over
    ``warmup`` steps (:func:`linear_warmup`), then stays at ``lr``; gradients are clipped to total
    norm ``grad_clip`` (None: no clipping); the EMA is torch's ``AveragedModel`` with
    ``get_ema_multi_avg_fn(ema_decay)`` (the first update copies the weights). The defaults are
    DDPM's (Adam, so ``weight_decay = 0``); ``steps`` = 800k is its CIFAR-10 run.

    ``checkpoint``: a file path. If it exists, training resumes from it (the hyperparameters above
    must match the ones stored, ``steps`` may grow, not shrink) and continues to ``steps`` in total; it is
    rewritten every ``checkpoint_every`` steps, at the end, and on Ctrl-C between steps. Files are
    written by rank 0 only; under DDP every rank reads the checkpoint, so it must be on a shared
    file system. ``sample_dir``: every ``sample_every`` steps and at the end, ``n_samples`` DDIM
    samples (η = 0, ``sample_steps`` uniform steps) of the EMA model from fixed noise are saved as
    ``samples_<step>.png`` (its own generator: sampling does not change the training run).

    On CUDA, ``bf16`` runs forward and loss under bfloat16 autocast and ``channels_last`` stores
    activations NHWC; on a CPU both are ignored. ``compile`` wraps the forward in ``torch.compile``
    (a dict is passed to it as keyword arguments, e.g. ``{"mode": "max-autotune"}``); checkpoints
    hold the bare model's weights either way.
    ``callback(step, loss, model, ema)`` runs after every step (0-based ``step``, global-batch loss).
    Under DDP, torch's generators (which dropout draws from) are seeded at every step from
    (``seed``, rank, step) by :func:`~ddim_edu.utils.seeds.derive_seed`: each rank draws its own masks, and resuming
    needs no per-rank state. The one-process equality holds for models without randomness in ``forward``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (it is optimised), got {type(model).__name__}")
    if not isinstance(data, Tensor) or data.ndim != 4 or data.shape[0] < 1 or not (data.dtype == torch.uint8 or data.is_floating_point()):
        desc = (tuple(data.shape), data.dtype) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be images [N, C, H, W] (uint8 pixels or floats in [-1, 1]) with N >= 1, got {desc}")
    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0),
                                 ("checkpoint_every", checkpoint_every, 1), ("sample_every", sample_every, 1),
                                 ("n_samples", n_samples, 1), ("sample_steps", sample_steps, 1)):
        check_int(name, value, minimum)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    if not 0 <= ema_decay <= 1:
        raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay!r}")
    rank, world = _world()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    unet_config = model.config if isinstance(getattr(model, "config", None), UNetConfig) else None
    if unet_config is not None:
        takes = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
        if tuple(data.shape[1:]) != takes:
            raise ValueError(f"data are images {tuple(data.shape[1:])} but the UNet takes {takes}: resize the data or "
                             "change UNetConfig(in_channels=..., image_size=...)")
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint {checkpoint} is a folder; pass a file path such as {Path(checkpoint) / 'checkpoint.pt'}")
    device = params[0].device
    on_cuda = device.type == "cuda"
    use_bf16 = bf16 and on_cuda and torch.cuda.is_bf16_supported()
    memory_format = torch.channels_last if (channels_last and on_cuda) else torch.contiguous_format
    config = {"batch_size": batch_size, "lr": float(lr), "warmup": warmup, "weight_decay": float(weight_decay),
              "betas": [float(b) for b in betas], "grad_clip": None if grad_clip is None else float(grad_clip),
              "ema_decay": float(ema_decay), "hflip": bool(hflip), "seed": seed, "T": schedule.T}

    # --- state: optimiser, scheduler, EMA, generators; restored from the checkpoint if there is one
    generator = torch.Generator().manual_seed(seed)
    resume = load_checkpoint(checkpoint) if checkpoint is not None and Path(checkpoint).is_file() else None
    if resume is not None:
        changed = {k: (resume["config"].get(k), v) for k, v in config.items() if resume["config"].get(k) != v}
        if changed:
            raise ValueError(f"checkpoint {checkpoint} was made with other settings, (stored, given): {changed}; "
                             "pass the stored values or use a new checkpoint path")
        if int(resume["step"]) > steps:
            raise ValueError(f"checkpoint {checkpoint} is at step {int(resume['step'])}, past steps={steps} (steps counts "
                             "from the start of training): pass a larger steps, or a new checkpoint path to start over")
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as err:
            details = [line.strip()[:300] for line in str(err).splitlines()[1:] if line.strip()]
            raise ValueError(f"checkpoint {checkpoint} was trained with another architecture than this model's: "
                             + "; ".join(details[:4])) from err
    if memory_format == torch.channels_last:
        model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup(s, warmup))
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    step, losses_before = 0, torch.zeros(0, dtype=torch.float64)
    if resume is not None:
        averaged.module.load_state_dict(resume["ema"])
        averaged.n_averaged.copy_(resume["ema_n_averaged"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"], generator)
        step, losses_before = int(resume["step"]), resume["losses"].to(torch.float64)
    if world > 1:
        _sync_ranks(step, generator, device, checkpoint)
    start_step = step

    forward: nn.Module = model
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    if compile:
        forward = torch.compile(forward, **(compile if isinstance(compile, dict) else {}))
    share = batch_size // world
    lo = rank * share

    def make_checkpoint(losses: Tensor) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
                "ema": averaged.module.state_dict(), "ema_n_averaged": averaged.n_averaged.detach().cpu(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(generator), "losses": losses, "config": config,
                **({"unet_config": asdict(unet_config)} if unet_config is not None else {})}

    sample_noise = None
    if sample_dir is not None and rank == 0:
        sample_noise = torch.randn((n_samples, *data.shape[1:]), generator=torch.Generator().manual_seed(seed))

    def save_samples() -> None:
        ema = averaged.module
        was_training = ema.training
        ema.eval()
        with torch.no_grad():
            x0 = sample(ema, sample_noise.to(device), schedule, schedule.timesteps(min(sample_steps, schedule.T)), method="ddim", eta=0.0)
        ema.train(was_training)
        save_png(make_grid(x0), Path(sample_dir) / f"samples_{step:07d}.png")

    losses = torch.zeros(max(0, steps - start_step), dtype=torch.float64, device=device)

    def all_losses() -> Tensor:
        return torch.cat([losses_before, losses[:step - start_step].cpu()])

    between_steps = True  # False while a step is half done: its state must not be saved
    saved_step = step
    bar = tqdm(total=steps, initial=step, disable=not progress or rank != 0, desc="training", leave=False)
    model.train()
    start = time.perf_counter()
    with sigterm_as_keyboard_interrupt():
        try:
            while step < steps:
                between_steps = False
                # one global batch: indices, flips, then (in shard_loss) t and ε, all from `generator`
                idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)[lo:lo + share]
                flip = (torch.rand(batch_size, generator=generator) < 0.5)[lo:lo + share] if hflip else None
                x0 = data[idx.to(data.device)].to(device, non_blocking=True)
                x0 = pixels_to_float(x0) if x0.dtype == torch.uint8 else x0.float()
                if flip is not None:
                    x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
                x0 = x0.contiguous(memory_format=memory_format)
                if world > 1:
                    torch.manual_seed(derive_seed(seed, _STREAM_DROPOUT, rank, step))  # this rank's dropout masks
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    if world == 1:
                        loss = simple_loss(forward, x0, schedule, generator)
                    else:
                        loss = shard_loss(forward, x0, schedule, generator, batch_size, lo)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP: gradients averaged over ranks here
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                scheduler.step()
                averaged.update_parameters(model)
                loss = _global_mean(loss, world)
                losses[step - start_step] = loss
                step += 1
                between_steps = True

                if callback is not None:
                    callback(step - 1, loss, model, averaged.module)
                if rank == 0 and checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
                    save_checkpoint(checkpoint, make_checkpoint(all_losses()))
                    saved_step = step
                if sample_noise is not None and (step % sample_every == 0 or step == steps):
                    save_samples()
                bar.update(1)
                if progress and rank == 0 and (step % 25 == 0 or step == steps):
                    done = step - start_step
                    recent = losses[max(0, done - 50):done].mean().item()
                    rate = done * batch_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{recent:.4f}", img_s=f"{rate:.0f}")
        except KeyboardInterrupt:
            if rank == 0 and checkpoint is not None and between_steps and step > saved_step:
                save_checkpoint(checkpoint, make_checkpoint(all_losses()))
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    if world > 1:
        dist.barrier()  # rank 0's files are complete when any rank returns

    ema = averaged.module
    ema.eval()
    done = step - start_step
    return ImageTrainResult(model=model, ema=ema, losses=all_losses(), step=step, seconds=seconds,
                            images_per_second=done * batch_size / seconds if seconds > 0 else math.inf)
