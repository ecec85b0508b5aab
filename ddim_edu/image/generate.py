"""Resumable image generation: ``generate(model, out, method=..., steps=..., ...)`` writes a folder of samples.

Images are drawn from a :class:`~ddim_edu.image.unet.UNet` with any method of
:func:`ddim_edu.solvers.sample`, on DDPM's linear schedule (T = 1000, the schedule of the published
CIFAR-10 model). ``python -m ddim_edu sample`` is this function behind argument parsing. It writes
into ``out``:

- ``samples.npz``: the images as uint8 ``[N, H, W, C]`` under the key ``"images"`` (C = 3 for RGB,
  1 for grey models such as ``load_unet("digits")``), the layout FID tools read;
- ``grid.png``: the first images side by side;
- ``manifest.json``: the arguments that define the samples (and a SHA-256 of the weights);
- ``shards/batch_00012.npz``: each finished batch, written atomically (temporary file, then
  ``os.replace``). A rerun with the same arguments skips the shards that exist, so Ctrl-C loses
  at most the batch in progress; a rerun with other arguments is refused.

Randomness: image i starts from x_T drawn from its own generator, seeded from (seed, i), so x_T
depends neither on the batch size nor on interruptions. The deterministic methods (``ddim``
with η = 0 and the fixed-step ODE methods) therefore give the same images for any batch size.
The stochastic ones (η > 0, ``sigma_hat``) draw their per-step noise for batch k from a
generator seeded from (seed, k): reproducible, but tied to the batch size, which is why the
manifest records it. torchdiffeq's adaptive solvers pick one step size for a whole batch, so
their images depend (slightly) on the batch too.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..schedules import SPACINGS, linear_schedule
from ..solvers import ADAPTIVE, ADAPTIVE_ATOL, ADAPTIVE_RTOL, METHODS, check_options, sample
from ..utils.checks import check_int, resolve_device
from ..utils.files import save_json_atomic, save_npz_atomic
from ..utils.seeds import derive_seed
from .data import float_to_pixels
from .grids import save_png, tile
from .unet import UNet

__all__ = [
    "FRACTIONAL_SPACINGS",
    "MANIFEST_FORMAT",
    "generate",
    "initial_noise",
    "load_images",
    "step_generator",
    "tolerances",
    "weights_sha256",
]

FRACTIONAL_SPACINGS = ("linear", "karras", "logsnr")  # the spacings that take t_min
MANIFEST_FORMAT = "ddim_edu.cli.sample/1"
_INFO_KEYS = ("source", "torch", "device")  # recorded in the manifest, not compared on resume
_STREAM_X_T, _STREAM_STEPS = 0, 1  # seed streams: per-image x_T, per-batch sampler noise


def tolerances(method: str, rtol: float | None, atol: float | None) -> dict:
    """The tolerances an adaptive solver runs with (the solver's defaults where None); empty for other methods."""
    if method not in ADAPTIVE:
        return {}
    return {"rtol": float(ADAPTIVE_RTOL if rtol is None else rtol), "atol": float(ADAPTIVE_ATOL if atol is None else atol)}


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes): which weights made the samples."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype (bfloat16 too)
    return digest.hexdigest()


# --- randomness -----------------------------------------------------------------------------------


def initial_noise(seed: int, start: int, stop: int, shape: Sequence[int]) -> Tensor:
    """x_T ~ N(0, I) for images ``start..stop-1`` [stop-start, *shape] (float32, CPU); image i's noise depends on (seed, i) only."""
    return torch.stack([
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(derive_seed(seed, _STREAM_X_T, i)))
        for i in range(start, stop)
    ])


def step_generator(seed: int, batch: int, device) -> torch.Generator:
    """The generator of the stochastic samplers' per-step noise in batch ``batch`` (on ``device``)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, _STREAM_STEPS, batch))


def load_images(path, *, channels: Sequence[int] = (3,), min_images: int = 2) -> np.ndarray:
    """uint8 images [N, H, W, C] from an ``.npz`` (key ``"images"``, or its only array, e.g. ``arr_0``).

    By default RGB (C = 3) and at least 2 images, what FID needs; :func:`generate` reads back its own
    samples with ``channels=(C,)`` of its model (1 for grey digits) and ``min_images=1``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    shape = f"[N, H, W, {' or '.join(str(c) for c in channels)}]"
    layout = f"an .npz of uint8 images {shape} under the key 'images' (numpy.savez(path, images=...))"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:  # numpy's own advice (allow_pickle) does not apply here
        raise ValueError(f"{path} is not an .npz file ({type(e).__name__}); expected {layout}") from None
    if isinstance(loaded, np.ndarray):
        raise ValueError(f"{path} is a single .npy array; expected {layout}")
    with loaded as npz:
        keys = list(npz.keys())
        key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
        if key is None:
            shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
            raise ValueError(f"{path} holds the arrays {shown}; expected {layout}")
        try:
            images = npz[key]
        except (OSError, ValueError) as e:  # e.g. an object array, which would need unpickling
            raise ValueError(f"{path} is not an .npz file of plain arrays ({type(e).__name__}); expected {layout}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in channels or len(images) < min_images:
        kind = {(3,): "RGB ", (1,): "grey "}.get(tuple(channels), "")
        raise ValueError(f"{path}: expected at least {min_images} uint8 {kind}images {shape}, got {images.dtype} {images.shape}")
    return images


# --- sampling -------------------------------------------------------------------------------------


def shard_path(out, batch: int) -> Path:
    return Path(out) / "shards" / f"batch_{batch:05d}.npz"


def sample_manifest(model: UNet, *, method: str, final_step: str, steps: int, eta: float, spacing: str, t_min: float | None,
                    num_images: int, batch_size: int, seed: int, timesteps: Tensor, source: str, device,
                    tols: dict | None = None) -> dict:
    """What defines a run's images (compared on resume), plus a few informational entries (``_INFO_KEYS``)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "method": method, "final_step": final_step, **(tols or {}), "steps": steps, "eta": float(eta), "spacing": spacing,
        "t_min": None if t_min is None else float(t_min),
        "num_images": num_images, "batch_size": batch_size, "seed": seed,
        "schedule": "linear, T=1000, beta 1e-4..0.02",
        "timesteps": [float(t) for t in timesteps.tolist()],
        "unet_config": asdict(model.config),
        "weights_sha256": weights_sha256(model),
        "source": source, "torch": torch.__version__, "device": str(device),
    }
    return json.loads(json.dumps(manifest))  # as it reads back from disk (tuples become lists)


def check_manifest(out: Path, manifest: dict) -> None:
    """Write ``out/manifest.json``, or refuse if the one there (or shards without one) is for other arguments.

    A stored manifest for other arguments is replaced when no shard and no ``samples.npz`` were made
    under it (a run that failed before its first batch), so a corrected rerun is not refused.
    """
    path = out / "manifest.json"
    if not path.is_file():
        if any((out / "shards").glob("batch_*.npz")):
            raise ValueError(f"{out / 'shards'} holds shards but {path} is missing, so they cannot be checked; "
                               "use another --out folder or delete this one")
        save_json_atomic(path, manifest)
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); use another --out folder or delete this one") from None
    keys = sorted((set(stored) | set(manifest)) - set(_INFO_KEYS))
    changed = [k for k in keys if stored.get(k) != manifest.get(k)]
    if changed and not any((out / "shards").glob("batch_*.npz")) and not (out / "samples.npz").exists():
        save_json_atomic(path, manifest)  # an earlier run stopped before its first batch: nothing to protect
        return
    if changed:
        def show(v):
            text = json.dumps(v)
            return text if len(text) <= 60 else text[:57] + "..."

        lines = [f"  {k}: stored {show(stored.get(k))}, given {show(manifest.get(k))}" for k in changed]
        raise ValueError(
            f"{out} holds samples made with other arguments (see {path}):\n" + "\n".join(lines)
            + "\nRerun with the stored arguments to resume, or choose another --out folder (or delete this one)."
        )


def sample_batch(model, x_T: Tensor, schedule, timesteps, *, method: str, eta: float, generator,
                 final_step: str = "euler", tols: dict | None = None) -> np.ndarray:
    """One batch: x_T [B, C, H, W] → uint8 images [B, H, W, C]; ``tols``: an adaptive solver's rtol and atol."""
    options = {"final_step": final_step} if method in METHODS else dict(tols or {})
    with torch.no_grad():
        x0 = sample(model, x_T, schedule, timesteps, method=method, eta=eta, generator=generator, **options)
    return float_to_pixels(x0).permute(0, 2, 3, 1).cpu().numpy()


def generate(
    model: UNet,
    out,
    *,
    method: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    final_step: str = "euler",
    rtol: float | None = None,
    atol: float | None = None,
    spacing: str = "uniform",
    t_min: float | None = None,
    num_images: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
    grid: int = 64,
    keep_shards: bool = True,
    progress: bool = True,
    source: str = "",
) -> Path:
    """Sample ``num_images`` images into ``out`` (resumable, see the module docstring); returns ``out/samples.npz``.

    The sub-sequence is ``linear_schedule().timesteps(steps, spacing, t_min=t_min)``; the manifest records
    it. With ``spacing="uniform"`` (the paper's ``range(0, T, T // steps)``) it has more than ``steps``
    entries when ``steps`` does not divide T = 1000; ``"leading"`` keeps exactly ``steps``. With
    ``keep_shards=False`` the shards are deleted once ``samples.npz`` is written; a later call with
    the same arguments then finds ``samples.npz`` and no shards and returns at once. ``rtol``,
    ``atol``: the tolerances of an adaptive solver (None: its defaults; recorded in the manifest).
    """
    check_options(method, eta=eta, final_step=final_step, rtol=rtol, atol=atol)
    tols = tolerances(method, rtol, atol)
    for name, value, minimum in (("steps", steps, 1), ("num_images", num_images, 1), ("batch_size", batch_size, 1),
                                 ("seed", seed, 0), ("grid", grid, 0)):
        check_int(name, value, minimum)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if t_min is not None and spacing not in FRACTIONAL_SPACINGS:
        raise ValueError(f"t_min applies to the spacings {FRACTIONAL_SPACINGS} only, got spacing {spacing!r}")
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a ddim_edu UNet (its config defines the image shape), got {type(model).__name__}")
    out = Path(out)
    device = resolve_device(device)
    schedule = linear_schedule()
    timesteps = schedule.timesteps(steps, spacing, **({} if t_min is None else {"t_min": t_min}))
    check_options(method, len(timesteps), final_step=final_step)  # τ long enough, before any file is written
    manifest = sample_manifest(model, method=method, final_step=final_step, steps=steps, eta=eta, spacing=spacing, t_min=t_min,
                               num_images=num_images, batch_size=batch_size, seed=seed, timesteps=timesteps,
                               source=source, device=device, tols=tols)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out, manifest)
    samples = out / "samples.npz"
    num_batches = math.ceil(num_images / batch_size)
    if samples.is_file() and not (out / "shards").is_dir():  # finished earlier, shards removed
        if grid:
            images = load_images(samples, channels=(model.config.in_channels,), min_images=1)
            save_png(tile(images[:grid]), out / "grid.png")
        return samples

    config = model.config
    shape = (config.in_channels, config.image_size, config.image_size)
    model = model.to(device).eval()
    todo = [k for k in range(num_batches) if not shard_path(out, k).is_file()]
    bar = tqdm(total=num_batches, initial=num_batches - len(todo), desc=f"sampling {method}", unit="batch",
               disable=not progress)
    with bar:
        for k in todo:
            start, stop = k * batch_size, min((k + 1) * batch_size, num_images)
            x_T = initial_noise(seed, start, stop, shape).to(device)
            images = sample_batch(model, x_T, schedule, timesteps, method=method, eta=eta,
                                  generator=step_generator(seed, k, device), final_step=final_step, tols=tols)
            save_npz_atomic(shard_path(out, k), images=images, first_index=np.int64(start))
            bar.update()

    images = assemble(out, num_batches, num_images)
    save_npz_atomic(samples, images=images)
    if grid:
        save_png(tile(images[:grid]), out / "grid.png")
    if not keep_shards:
        for k in range(num_batches):
            shard_path(out, k).unlink()
        (out / "shards").rmdir()
    return samples


def assemble(out, num_batches: int, num_images: int) -> np.ndarray:
    """The images of all shards in order, [num_images, H, W, C]; a damaged shard is named in the error."""
    parts = []
    for k in range(num_batches):
        path = shard_path(out, k)
        try:
            with np.load(path, allow_pickle=False) as npz:
                parts.append(npz["images"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"shard {path} cannot be read ({e}); delete it and rerun to sample that batch again") from None
    images = np.concatenate(parts)
    if len(images) != num_images:
        raise ValueError(f"the shards in {Path(out) / 'shards'} hold {len(images)} images, expected {num_images}; "
                           "delete the folder and rerun")
    return images


