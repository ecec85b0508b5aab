"""Training an ε-model with DDPM's simple loss L_1 (Eq 5 with γ = 1), with an EMA copy of the weights.

The paper's DDIM samplers reuse a network trained this way (Theorem 1: for every σ the
variational objective J_σ is some L_γ plus a constant, and an ε-model that minimises L_1 per t
minimises every L_γ). :class:`TrainConfig` is the recipe: its defaults are DDPM's CIFAR-10 run
(Ho et al. 2020, Appendix B: Adam at lr 2e-4 with a linear warm-up over 5000 steps, gradient norms
clipped at 1, an EMA of the weights with decay 0.9999, random horizontal flips, batch 128), and
:meth:`TrainConfig.toy` the one for the 2-D toy sets. :func:`train_eps_model` runs either on any
``nn.Module`` with ``forward(x, t)`` (t float [B] of timestep indices), with what a real run needs:

- all randomness of a step (minibatch indices, flips, timesteps t, noise ε) comes from one
  ``torch.Generator`` seeded with ``config.seed``, drawn for the whole (global) batch in a fixed order,
  so a run is reproducible given the model's initial weights;
- checkpoints hold model, EMA, optimiser, lr scheduler, step, loss history, the random states
  (torch's CPU and CUDA generators and the data generator), the recipe, the noise schedule's β and
  the range of the data, as plain tensors and Python values, so ``torch.load(path, weights_only=True)``
  reads them; they are written atomically (temporary file in the same folder, fsync, ``os.replace``),
  so a crash or Ctrl-C never leaves a torn file; a resume with another recipe, schedule or data range is refused;
- resuming is exact: on a CPU, N steps, stop, resume, N more steps give the same bits as 2N steps;
- Ctrl-C (KeyboardInterrupt) writes a checkpoint of the last finished step first, wherever it lands:
  a step interrupted before its update is dropped (its random draws are taken back), and a signal
  that arrives while a step applies its update (optimiser, lr scheduler, EMA) is held until the
  step is complete; SIGTERM (what a job scheduler or torchrun sends to stop a run) is treated as Ctrl-C;
- a non-finite loss or gradient norm stops the run with a FloatingPointError that names the step,
  before any checkpoint holds it (the last one written stays as it was); data with NaN or inf are
  refused before training;
- on a CPU, small models (under 5M parameters) train on one thread unless the user chose a number
  (:mod:`ddim_edu.utils.threads`: on a busy machine more threads can be many times slower);
- under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in
  DistributedDataParallel and each rank takes its contiguous share of the global batch; since
  DDP averages gradients and every rank draws the same global batch, the result equals
  one-process training on the global batch up to float rounding (for a model without dropout).
  The model's own randomness (dropout) is seeded per rank and step, so masks differ across
  ranks and a resumed run draws the same ones. Only rank 0 writes files.

Images have more in :mod:`ddim_edu.image.training` (sample sheets, a UNet's config in the checkpoint).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .forward import q_sample
from .schedules import Schedule
from .utils.checks import check_int
from .utils.files import atomic_write, load_weights_only
from .utils.seeds import derive_seed
from .utils.signals import catch_interrupts
from .utils.threads import SMALL_WORK_PARAMETERS, choose_threads, intra_op_threads

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainConfig",
    "TrainResult",
    "data_range",
    "load_checkpoint",
    "save_checkpoint",
    "shard_loss",
    "simple_loss",
    "train_eps_model",
    "warmup_cosine",
]

CHECKPOINT_FORMAT = "ddim_edu.image_training/1"
# Under DDP, torch's generators (dropout) are seeded per (rank, step) from this stream: shared
# generators would give every rank the same masks, and states carried from step to step would differ
# per rank and would all have to be checkpointed.
_STREAM_DROPOUT = 2
_CHECKPOINT_KEYS = ("format", "step", "model", "ema", "ema_n_averaged", "optimizer", "scheduler", "rng", "losses", "config")
# Entries that checkpoints written before they existed lack: a resume from such a file checks nothing there.
_OPTIONAL_KEYS = ("schedule_betas", "data_range")
# A resume must see data whose minimum and maximum are within this fraction of the stored range's width
# of the stored ones: a new draw of the same data passes, another scale ([0, 1] for [-1, 1]) does not.
_DATA_RANGE_TOLERANCE = 0.25
# On CUDA (any device but the CPU) the losses and gradient norms stay on the device and are checked for NaN
# and inf this often (one host synchronisation per check), and before every checkpoint; on a CPU at every step.
_FINITE_CHECK_EVERY_DEVICE = 25


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe, stored in every checkpoint; a resumed run must match it in all but ``steps``.

    The defaults are DDPM's CIFAR-10 recipe (Adam is AdamW with ``weight_decay = 0``); :meth:`toy` is the
    one for the 2-D toy sets. Change fields with ``TrainConfig(steps=...)``, ``TrainConfig.toy(steps=...)``
    or ``dataclasses.replace``.
    """

    steps: int = 800_000  # optimiser steps from the start of training (DDPM's CIFAR-10 run)
    batch_size: int = 128  # examples per step (the global batch under DDP)
    lr: float = 2e-4  # the peak learning rate
    warmup: int = 5000  # steps of linear warm-up, from lr / warmup to lr
    final_lr_fraction: float = 1.0  # lr at the last step / lr: 1 is constant after warm-up (DDPM), < 1 a cosine decay
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: Adam)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's β_1, β_2
    grad_clip: float | None = 1.0  # the gradients' total norm is clipped to this (None: no clipping)
    ema_decay: float = 0.9999  # after every step θ_ema ← decay θ_ema + (1 − decay) θ
    hflip: bool = True  # flip each image left-right with probability 1/2 (data [N, C, H, W] only)
    seed: int = 0  # the generator of minibatch indices, flips, t and ε

    def __post_init__(self):
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup", 0)):
            check_int(name, getattr(self, name), minimum)
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay!r}")

    @classmethod
    def toy(cls, **changes) -> TrainConfig:
        """The recipe for the 2-D toy sets of :mod:`ddim_edu.toy.datasets`, with ``changes`` to its fields.

        Adam at lr 2e-3, 100 warm-up steps, then a cosine down to 5 % of lr; batch 256, EMA decay 0.999,
        8000 steps, no clipping, no flips. With :class:`~ddim_edu.toy.nets.MLPEps` (hidden 128, 3 blocks)
        8000 steps take about 55 s on a CPU (≈145 steps/s, 6–7 ms per step) and give DDIM samples of
        ``swiss_roll`` and ``eight_gaussians`` as close to held-out data as a second data sample is;
        half as many leave visibly diffuse points. Fine, tightly wound structure (``spirals``,
        ``checkerboard`` edges) needs several times longer.
        """
        recipe = dict(steps=8000, batch_size=256, lr=2e-3, warmup=100, final_lr_fraction=0.05, grad_clip=None,
                      ema_decay=0.999, hflip=False)
        return cls(**{**recipe, **changes})


@dataclass
class TrainResult:
    """What :func:`train_eps_model` returns.

    ``model`` is the trained network (the object passed in), ``ema`` its EMA copy in eval mode (the
    one to sample with), ``losses`` the (global-batch) L_1 loss of every step since step 0 (float64
    [step], earlier runs' steps read from the checkpoint), ``step`` the number of steps done, and
    ``seconds``, ``steps_per_second`` and ``examples_per_second`` the wall time and throughput of this call's steps.
    """

    model: nn.Module
    ema: nn.Module
    losses: Tensor
    step: int
    seconds: float
    steps_per_second: float
    examples_per_second: float


def simple_loss(model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule: Schedule,
                generator: torch.Generator | None = None) -> Tensor:
    """DDPM's L_1 on one batch: mean over the batch of ``‖ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, t) − ε‖²``.

    ``t ~ U{0, …, T-1}`` (timestep indices, ᾱ_t = ``schedule.alphas_cumprod[t]``) and ``ε ~ N(0, I)``
    are drawn per example from ``generator`` (on the CPU, then moved to x0's device). The squared
    norm sums over all non-batch dimensions, as in Eq 5, so an untrained ε = 0 scores d.
    """
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch [B, ...] with B >= 1, got shape {tuple(x0.shape)}")
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, schedule.alphas_cumprod[t], eps)  # Eq 4
    pred = model(x_t, t.to(device=x0.device, dtype=x0.dtype))
    return (pred - eps).pow(2).flatten(1).sum(1).mean()


def shard_loss(model, x0: Tensor, schedule: Schedule, generator: torch.Generator, batch_size: int, lo: int) -> Tensor:
    """L_1 on rows ``lo : lo + len(x0)`` of a global batch of ``batch_size`` examples.

    Draws t and ε for the *whole* global batch, in :func:`simple_loss`'s order (t [B] first, then
    ε [B, …]), and uses this shard's rows, so the generator advances alike on every rank. With
    ``lo = 0`` and ``len(x0) = batch_size`` this is ``simple_loss`` exactly.
    """
    n = x0.shape[0]
    t = torch.randint(0, schedule.T, (batch_size,), generator=generator)[lo:lo + n]
    eps = torch.randn((batch_size, *x0.shape[1:]), generator=generator, dtype=x0.dtype)[lo:lo + n].to(x0.device)
    x_t = q_sample(x0, schedule.alphas_cumprod[t], eps)  # Eq 4
    pred = model(x_t, t.to(device=x0.device, dtype=x0.dtype))
    return (pred - eps).pow(2).flatten(1).sum(1).mean()


def warmup_cosine(step: int, steps: int, warmup: int, final_fraction: float) -> float:
    """The lr multiplier at ``step``: linear warm-up from 1/warmup to 1, then cosine decay to ``final_fraction``.

    With ``final_fraction = 1`` it is DDPM's schedule: ``(step + 1) / warmup`` during warm-up, then exactly 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


# --- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(path, checkpoint: dict) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`ddim_edu.utils.files.atomic_write`): if anything fails
    (or Ctrl-C arrives) before the rename, the previous file at ``path`` is untouched."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(checkpoint, f)
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint of :func:`train_eps_model` with ``weights_only=True`` (no arbitrary unpickling).

    Raises FileNotFoundError if it is missing and ValueError if it is truncated, corrupt, or not
    such a checkpoint. ``checkpoint["ema"]`` is a ``state_dict`` for the bare model and
    ``checkpoint["config"]`` the :class:`TrainConfig` as a dict, with the schedule's ``T``;
    ``checkpoint["schedule_betas"]`` holds the schedule's β (float64 [T]) and ``checkpoint["data_range"]``
    the data's ``{"dtype", "min", "max"}`` as the network saw them (:func:`data_range`). Checkpoints
    written before these two entries existed lack them; they load and resume, unchecked in those respects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = load_weights_only(path)
    except ValueError as err:
        raise ValueError(f"checkpoint {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (written by ddim_edu.training.train_eps_model)")
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}; it is damaged or from another version")
    return checkpoint


def _stored_config(config: TrainConfig, schedule: Schedule) -> dict:
    """The recipe as a checkpoint stores it: ``asdict(config)`` in plain Python values, and the schedule's T."""
    stored = {k: float(v) if isinstance(v, float) else v for k, v in asdict(config).items()}
    return {**stored, "betas": [float(b) for b in config.betas], "T": schedule.T}


def data_range(data: Tensor) -> tuple[float, float]:
    """The smallest and largest value of ``data`` as the network sees them (uint8 pixels k as ``k/127.5 - 1``).

    One pass over the data; raises ValueError, naming the first example affected, if any value is NaN or inf.
    """
    lo, hi = torch.aminmax(data.reshape(-1))
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = ~torch.isfinite(data.reshape(data.shape[0], -1)).all(1)
        raise ValueError(f"data hold NaN or inf values in {int(bad.sum())} of {data.shape[0]} examples, the first at "
                         f"index {int(bad.nonzero()[0, 0])}: remove or repair them before training")
    if data.dtype == torch.uint8:
        lo, hi = lo / 127.5 - 1.0, hi / 127.5 - 1.0
    return lo, hi


def _settings_changed(resume: dict, stored_config: dict, schedule: Schedule, data_info: dict) -> list[str]:
    """What differs between a checkpoint and this run: recipe fields (but ``steps``), the schedule's β, the data range."""
    stored = {"final_lr_fraction": 1.0, **resume["config"]}  # a checkpoint without it had a constant lr
    changes = [f"{k}: stored {stored.get(k)!r}, given {v!r}" for k, v in stored_config.items()
               if k != "steps" and stored.get(k) != v]
    betas = resume.get("schedule_betas")
    if betas is not None:
        betas = betas.to(torch.float64)
        if betas.shape != schedule.betas.shape:
            changes.append(f"noise schedule: stored T = {len(betas)}, given {schedule}")
        elif not torch.allclose(betas, schedule.betas, rtol=1e-9, atol=0.0):
            i = int((betas - schedule.betas).abs().argmax())
            changes.append(f"noise schedule: stored β_1 = {betas[0].item():.4g}, β_T = {betas[-1].item():.4g}, "
                           f"given {schedule} (β differs most at timestep {i}: {betas[i].item():.4g} vs "
                           f"{schedule.betas[i].item():.4g})")
    old = resume.get("data_range")
    if old is not None:
        width = max(old["max"] - old["min"], 1e-12)
        if max(abs(old["min"] - data_info["min"]), abs(old["max"] - data_info["max"])) > _DATA_RANGE_TOLERANCE * width:
            changes.append(f"data range (as the network sees it): stored [{old['min']:.4g}, {old['max']:.4g}] "
                           f"({old.get('dtype')}), given [{data_info['min']:.4g}, {data_info['max']:.4g}] "
                           f"({data_info['dtype']})")
    return changes


def _grad_norm(params: list[Tensor]) -> Tensor:
    """The total 2-norm of the gradients (what ``clip_grad_norm_`` measures), on their device, without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(grads)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _optimizer_count(optimizer: torch.optim.Optimizer, param: Tensor | None) -> int:
    """How many updates AdamW has made to ``param`` (its state's ``step``, a CPU tensor), 0 before the first."""
    state = optimizer.state.get(param) if param is not None else None
    return int(state["step"]) if state and "step" in state else 0


def _finite_check_every(device: torch.device) -> int:
    """How often the losses and gradient norms are checked for NaN and inf: every step where reading them costs
    nothing (the CPU), else every ``_FINITE_CHECK_EVERY_DEVICE`` steps (one host synchronisation each)."""
    return 1 if device.type == "cpu" else _FINITE_CHECK_EVERY_DEVICE


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


def train_eps_model(
    model: nn.Module,
    data: Tensor,
    schedule: Schedule,
    config: TrainConfig,
    *,
    checkpoint=None,
    checkpoint_every: int = 5000,
    checkpoint_extra: dict | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    compile: bool | dict = False,
    progress: bool = True,
    callback: Callable[[int, Tensor, nn.Module, nn.Module], None] | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Minimise L_1 (:func:`simple_loss`) with AdamW on random minibatches of ``data``, as ``config`` says.

    ``data``: training examples [N, ...] (points [N, d], images [N, C, H, W], …), floats, or uint8
    pixels mapped to [-1, 1] per batch (DDPM's ``x / 127.5 − 1``); batches are moved to the model's
    device. Data with NaN or inf are refused before training. Each step draws ``batch_size`` indices
    (with replacement), then a flip bit per image (if ``hflip``, which needs images [N, C, H, W]), then
    t and ε per example (:func:`shard_loss`), all from one generator seeded with ``seed``. The lr rises
    linearly over ``warmup`` steps, then stays at ``lr`` or follows a cosine down to
    ``final_lr_fraction * lr`` at the last step (:func:`warmup_cosine`); gradients are clipped to total
    norm ``grad_clip`` (None: no clipping); the EMA is torch's ``AveragedModel`` with
    ``get_ema_multi_avg_fn(ema_decay)``: the first update copies the weights, later ones set
    ``θ_ema ← decay θ_ema + (1 − decay) θ`` (parameters and buffers alike).

    ``checkpoint``: a file path. If it exists, training resumes from it and continues to ``steps`` in
    total. ``config`` must match the one stored, but ``steps`` may grow, not shrink (with a cosine decay
    the decay then stretches to the new end); the schedule's β must be the stored ones, and the data's
    smallest and largest values (as the network sees them) within a quarter of the stored range's width
    of the stored ones (:func:`data_range`); a mismatch is refused, naming what differs. A checkpoint
    from before schedule and data range were stored resumes without those two checks. The checkpoint is
    rewritten every ``checkpoint_every`` steps, at the end, and on Ctrl-C or SIGTERM wherever it lands
    (the last finished step: a step interrupted before its update is dropped, a signal during the
    update waits for the step to finish), with the plain values of ``checkpoint_extra`` added (e.g. a
    UNet's config). Files are written by rank 0 only; under DDP every rank reads the checkpoint, so it
    must be on a shared file system.

    A non-finite loss or gradient norm raises FloatingPointError naming the first such step; no
    checkpoint is written from then on, nor one whose weights are not finite, so the last one on disk
    is the last good state. On a CPU every step is checked before its update is applied: two numbers
    read, plus the gradient norm where ``grad_clip`` is None (clipping computes it anyway); about
    0.1 ms, 2–3 % of a toy MLP step of 5.5 ms. On CUDA the values stay on the device and are checked
    every 25 steps and before each checkpoint (one synchronisation each), so the error may come a
    few steps after the step it names.

    On CUDA, ``bf16`` runs forward and loss under bfloat16 autocast and ``channels_last`` stores image
    batches and activations NHWC; on a CPU both are ignored. ``compile`` wraps the forward in
    ``torch.compile`` (a dict is passed to it as keyword arguments, e.g. ``{"mode": "max-autotune"}``);
    checkpoints hold the bare model's weights either way. ``threads``: torch's intra-op threads
    during training on a CPU; None runs a model of fewer than 5M parameters on one thread unless
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` chose a number (:mod:`ddim_edu.utils.threads`).
    ``callback(step, loss, model, ema)`` runs after every step (0-based ``step``, global-batch loss).
    Under DDP, torch's generators (which dropout draws from) are seeded at every step from
    (``seed``, rank, step) by :func:`~ddim_edu.utils.seeds.derive_seed`: each rank draws its own masks, and resuming
    needs no per-rank state. The one-process equality holds for models without randomness in ``forward``.
    The model is trained in place and returned together with its EMA copy (in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (it is optimised), got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(data, Tensor) or data.ndim < 2 or data.shape[0] < 1 or not (data.is_floating_point() or data.dtype == torch.uint8):
        desc = (tuple(data.shape), data.dtype) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a tensor [N, ...] of examples (floats or uint8 pixels) with N >= 1, got {desc}")
    if config.hflip and data.ndim != 4:
        raise ValueError(f"hflip flips images [N, C, H, W], but data have shape {tuple(data.shape)}: "
                         "use hflip=False (TrainConfig.toy has it)")
    check_int("checkpoint_every", checkpoint_every)
    if checkpoint_extra is not None and set(checkpoint_extra) & {*_CHECKPOINT_KEYS, *_OPTIONAL_KEYS}:
        raise ValueError(f"checkpoint_extra must not replace the trainer's entries {_CHECKPOINT_KEYS + _OPTIONAL_KEYS}, "
                         f"got {sorted(checkpoint_extra)}")
    rank, world = _world()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes {world}")
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to train")
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint {checkpoint} is a folder; pass a file path such as {Path(checkpoint) / 'checkpoint.pt'}")
    device = params[0].device
    on_cuda = device.type == "cuda"
    small = sum(p.numel() for p in params) < SMALL_WORK_PARAMETERS
    n_threads = choose_threads(threads, small) if device.type == "cpu" else None
    use_bf16 = bf16 and on_cuda and torch.cuda.is_bf16_supported()
    memory_format = torch.channels_last if (channels_last and on_cuda and data.ndim == 4) else torch.contiguous_format
    stored_config = _stored_config(config, schedule)
    data_min, data_max = data_range(data)
    data_info = {"dtype": str(data.dtype).removeprefix("torch."), "min": data_min, "max": data_max}

    # --- state: optimiser, scheduler, EMA, generators; restored from the checkpoint if there is one
    generator = torch.Generator().manual_seed(config.seed)
    resume = load_checkpoint(checkpoint) if checkpoint is not None and Path(checkpoint).is_file() else None
    if resume is not None:
        changed = _settings_changed(resume, stored_config, schedule, data_info)
        if changed:
            raise ValueError(f"checkpoint {checkpoint} was made with other settings: " + "; ".join(changed)
                             + "; pass the stored values or use a new checkpoint path")
        if int(resume["step"]) > config.steps:
            raise ValueError(f"checkpoint {checkpoint} is at step {int(resume['step'])}, past steps={config.steps} (steps "
                             "counts from the start of training): pass a larger steps, or a new checkpoint path to start over")
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as err:
            details = [line.strip()[:300] for line in str(err).splitlines()[1:] if line.strip()]
            raise ValueError(f"checkpoint {checkpoint} was trained with another architecture than this model's: "
                             + "; ".join(details[:4])) from err
    if memory_format == torch.channels_last:
        model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.steps, config.warmup, config.final_lr_fraction)
    )
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
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
    batch_size, steps = config.batch_size, config.steps
    share = batch_size // world
    lo = rank * share
    writes = rank == 0 and checkpoint is not None
    check_every = _finite_check_every(device)
    has_buffers = any(True for _ in model.buffers())

    losses = torch.zeros(max(0, steps - start_step), dtype=torch.float64, device=device)
    grad_norms = torch.zeros_like(losses)
    checked = 0  # losses[:checked] and grad_norms[:checked] are known to be finite

    def all_losses() -> Tensor:
        return torch.cat([losses_before, losses[:step - start_step].cpu()])

    def check_finite(end: int) -> None:
        """Raise FloatingPointError if a loss or gradient norm of steps start_step + [checked, end) is NaN or inf."""
        nonlocal checked
        if end <= checked:
            return
        window = slice(checked, end)
        if bool(torch.isfinite(losses[window]).all() & torch.isfinite(grad_norms[window]).all()):
            checked = end
            return
        bad = ~(torch.isfinite(losses[window]) & torch.isfinite(grad_norms[window]))
        i = checked + int(bad.nonzero()[0, 0])
        values = {"loss": losses[i].item(), "gradient norm": grad_norms[i].item()}
        what = " and ".join(f"the {name} is {v}" for name, v in values.items() if not math.isfinite(v))
        what += "".join(f" (the {name} is {v:.6g})" for name, v in values.items() if math.isfinite(v))
        raise FloatingPointError(
            f"training stopped: at step {start_step + i} (0-based) {what}; {kept_checkpoint()}. Lower lr (now "
            f"{config.lr:g}), clip gradients (grad_clip), or look for an overflow in the model"
            + (" (bf16 autocast is on)" if use_bf16 else ""))

    def kept_checkpoint() -> str:
        if not (writes and Path(checkpoint).is_file()):
            return "no checkpoint was written"
        return f"the checkpoint {checkpoint}, written after {saved_step} step{'s' * (saved_step != 1)}, is left as it was"

    def check_weights() -> None:
        for name, module in (("weights", model), ("EMA weights", averaged.module)):
            finite = torch.stack([torch.isfinite(p).all() for p in module.parameters()]).all()
            if not bool(finite):
                raise FloatingPointError(
                    f"training stopped: the {name} after step {step - 1} (0-based) are not finite, although its loss and "
                    f"gradient norm were; {kept_checkpoint()}. Lower lr (now {config.lr:g})")

    def save(rng: dict | None = None, buffers: dict | None = None) -> None:
        """Write the checkpoint of the state after ``step`` steps (with the random states and buffers given, if any)."""
        nonlocal saved_step
        check_finite(step - start_step)
        check_weights()
        model_state = model.state_dict()
        if buffers:
            model_state.update({k: v for k, v in buffers.items() if k in model_state})
        save_checkpoint(checkpoint, {
            "format": CHECKPOINT_FORMAT, "step": step, "model": model_state, "ema": averaged.module.state_dict(),
            "ema_n_averaged": averaged.n_averaged.detach().cpu(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng if rng is not None else _rng_state(generator),
            "losses": all_losses(), "config": stored_config, "schedule_betas": schedule.betas.clone(),
            "data_range": data_info, **(checkpoint_extra or {})})
        saved_step = step

    # Where a KeyboardInterrupt can land in a step, and what the checkpoint of the last finished step needs:
    # "draw" (batch, forward, backward, finite check): nothing persistent has changed but the random states
    #   and (say, batch norm's) buffers, so the ones from the step's start are saved;
    # "update" (optimiser, lr scheduler, EMA, step count): signals wait for its end (``interrupts.held``); an
    #   exception raised by code inside it is rolled forward if the optimiser had updated, back if not;
    # "done" (callback, periodic checkpoint, progress bar): the step is finished.
    phase = "done"
    start_rng, start_buffers, probe, count_before = None, None, None, 0
    saved_step = step
    bar = tqdm(total=steps, initial=step, disable=not progress or rank != 0, desc="training", leave=False)
    model.train()
    start = time.perf_counter()
    with intra_op_threads(n_threads), catch_interrupts() as interrupts:
        try:
            while step < steps:
                i = step - start_step
                if writes:
                    start_rng = _rng_state(generator)
                    start_buffers = {k: b.detach().clone() for k, b in model.named_buffers()} if has_buffers else None
                phase = "draw"
                # one global batch: indices, flips, then (in shard_loss) t and ε, all from `generator`
                idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)[lo:lo + share]
                flip = (torch.rand(batch_size, generator=generator) < 0.5)[lo:lo + share] if config.hflip else None
                x0 = data[idx.to(data.device)].to(device, non_blocking=True)
                if x0.dtype == torch.uint8:
                    x0 = x0.to(torch.float32) / 127.5 - 1.0  # pixels {0, …, 255} to [-1, 1]
                if flip is not None:
                    x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
                x0 = x0.contiguous(memory_format=memory_format)
                if world > 1:
                    torch.manual_seed(derive_seed(config.seed, _STREAM_DROPOUT, rank, step))  # this rank's dropout masks
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    if world == 1:
                        loss = simple_loss(forward, x0, schedule, generator)
                    else:
                        loss = shard_loss(forward, x0, schedule, generator, batch_size, lo)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP: gradients averaged over ranks here
                if config.grad_clip is not None:
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                else:
                    grad_norm = _grad_norm(params)
                loss = _global_mean(loss, world)
                losses[i] = loss
                grad_norms[i] = grad_norm
                if check_every == 1 and math.isfinite(loss.item()) and math.isfinite(grad_norm.item()):
                    checked = i + 1  # on a CPU, two numbers read at every step: a bad step never makes its update
                if i + 1 - checked >= check_every:
                    check_finite(i + 1)
                if writes:
                    probe = next((p for p in params if p.grad is not None), None)
                    count_before = _optimizer_count(optimizer, probe)
                with interrupts.held():
                    phase = "update"
                    optimizer.step()
                    scheduler.step()
                    averaged.update_parameters(model)
                    step += 1
                    phase = "done"

                if callback is not None:
                    callback(step - 1, loss, model, averaged.module)
                if writes and (step % checkpoint_every == 0 or step == steps):
                    save()
                bar.update(1)
                if progress and rank == 0 and (step % 25 == 0 or step == steps):
                    done = step - start_step
                    recent = losses[max(0, done - 50):done].mean().item()  # single minibatch losses are noisy
                    rate = done * batch_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{recent:.4f}", ex_s=f"{rate:.0f}")
            check_finite(step - start_step)
        except KeyboardInterrupt:
            if writes:
                with interrupts.held(raise_at_end=False):  # a second Ctrl-C or SIGTERM does not cut this short
                    rng, buffers = None, None  # "done": the current state is the last finished step's
                    if phase == "draw":
                        rng, buffers = start_rng, start_buffers
                    elif phase == "update":
                        if _optimizer_count(optimizer, probe) == count_before:  # no update made: drop the step
                            rng, buffers = start_rng, start_buffers
                        else:  # the optimiser has updated: finish the step
                            if scheduler.last_epoch == step:
                                scheduler.step()
                            if int(averaged.n_averaged) == step:
                                averaged.update_parameters(model)
                            step += 1
                    if step > saved_step:
                        save(rng, buffers)
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    if world > 1:
        dist.barrier()  # rank 0's files are complete when any rank returns

    ema = averaged.module
    ema.eval()
    done = step - start_step
    per_second = done / seconds if seconds > 0 else math.inf
    return TrainResult(model=model, ema=ema, losses=all_losses(), step=step, seconds=seconds,
                       steps_per_second=per_second, examples_per_second=per_second * batch_size)
