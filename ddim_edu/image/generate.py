"""Resumable image generation: ``generate(model, out, method=..., steps=..., ...)`` writes a folder of samples.

Images are drawn from a :class:`~ddim_edu.image.unet.UNet` with any method of
:func:`ddim_edu.solvers.sample`, on DDPM's linear schedule (T = 1000, the schedule of the published
CIFAR-10 model). ``python -m ddim_edu sample`` is this function behind argument parsing. It writes
into ``out``:

- ``samples.npz``: the images as uint8 ``[N, H, W, C]`` under the key ``"images"`` (C = 3 for RGB,
  1 for grey models such as ``load_unet("digits")``), the layout FID tools read;
- ``grid.png``: the first images side by side;
- ``manifest.json``: the arguments that define the samples (and a SHA-256 of the weights); once
  ``samples.npz`` is written, its SHA-256 too;
- ``shards/batch_00012.npz``: each finished batch, written atomically (temporary file, then
  ``os.replace``), with the index of its first image and a checksum (:func:`shard_digest`: SHA-256
  of the run's arguments, the batch and its images) written in the same file, so no crash can
  separate a shard from its checksum. A rerun with the same arguments skips the shards that exist
  (found with one listing of the folder), so Ctrl-C, SIGTERM or SIGKILL lose at most the batch in
  progress, and the resumed ``samples.npz`` is bit for bit the uninterrupted one; each shard is
  checked against the run when ``samples.npz`` is assembled, and a changed or foreign one is named.

A run holds an exclusive lock on ``out`` (:func:`ddim_edu.utils.files.folder_lock`, a ``.lock``
file removed at the end) from before it reads the folder until it returns: a second run into the
same folder, with any arguments, is refused at once with :class:`~ddim_edu.utils.files.FolderInUse`.
The operating system drops the lock when the process dies, however it dies; a run killed in the
middle of a write leaves temporary files that the next run deletes. Where ``fcntl`` is missing
(Windows) no lock is taken and a warning says so. Refused too, before any image is written: a
rerun with other arguments (unless the earlier run made no shard and no ``samples.npz``), a
folder with outputs (``samples.npz``, ``grid.png``, ``shards``) but no manifest, a
``manifest.json`` this command did not write, and a run whose shards and ``samples.npz`` would
not fit on the disk (or ``samples.npz`` in memory).

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
import os
import re
import shutil
import zipfile
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
from ..utils.files import folder_lock, remove_stale_temporaries, save_json_atomic, save_npz_atomic
from ..utils.seeds import derive_seed
from ..utils.threads import SMALL_WORK_PARAMETERS, choose_threads, intra_op_threads
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

FRACTIONAL_SPACINGS = ("linear", "karras", "logsnr", "blend")  # the spacings that take t_min
MANIFEST_FORMAT = "ddim_edu.cli.sample/1"
_INFO_KEYS = ("source", "torch", "device")  # recorded in the manifest, not compared on resume
_RESULT_KEYS = ("samples_sha256",)  # what a finished run adds to its manifest
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


# --- the output folder ---------------------------------------------------------------------------

_SHARD = re.compile(r"^batch_(\d{5,})\.npz$")
_OUTPUTS = ("samples.npz", "grid.png", "shards")  # what a run writes besides its manifest


def shard_path(out, batch: int) -> Path:
    return Path(out) / "shards" / f"batch_{batch:05d}.npz"


def existing_shards(out) -> set[int]:
    """The batch indices of the shards in ``out/shards``, from one listing of the folder (no file is opened)."""
    try:
        with os.scandir(Path(out) / "shards") as entries:
            return {int(m[1]) for entry in entries if (m := _SHARD.match(entry.name))}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def run_digest(manifest: dict) -> str:
    """SHA-256 of what defines a run's images (the manifest without its informational entries)."""
    defining = {k: v for k, v in manifest.items() if k not in _INFO_KEYS + _RESULT_KEYS}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


def shard_digest(run: str, batch: int, first_index: int, images: np.ndarray) -> str:
    """The checksum a shard carries: SHA-256 of the run's digest, the batch's index and first image, and its images' bytes.

    Written with the images in the same atomic write, so a shard and its checksum never disagree
    after a crash; a shard replaced by other bytes (zeros, another run's or another batch's images)
    no longer matches it.
    """
    header = f"{run}|{batch}|{first_index}|{images.dtype.str}|{tuple(images.shape)}|".encode()
    return hashlib.sha256(header + np.ascontiguousarray(images).tobytes()).hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def check_owned(out: Path) -> None:
    """Refuse a folder that holds outputs of this command (samples.npz, grid.png, shards) but no manifest.json:
    nothing says which arguments made them, so they are neither adopted as a result nor overwritten."""
    if (out / "manifest.json").exists():
        return
    found = [name for name in _OUTPUTS if (out / name).exists()]
    if found:
        raise ValueError(f"{out} holds {', '.join(found)} but no manifest.json, so nothing says which arguments made "
                         "them; they are left alone: use another --out folder (or delete them)")


def read_manifest(out: Path) -> dict | None:
    """The stored ``out/manifest.json`` (None if there is none); ValueError if it is not one this command wrote."""
    path = out / "manifest.json"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); use another --out folder or delete this one") from None
    if not isinstance(stored, dict) or stored.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} was not written by this command (its format is not {MANIFEST_FORMAT!r}); "
                         "use another --out folder")
    return stored


def check_manifest(out: Path, manifest: dict, shards: set[int] | None = None) -> dict:
    """Write ``out/manifest.json``, or refuse if the one there is for other arguments; returns the manifest in force.

    A stored manifest for other arguments is replaced when no shard and no ``samples.npz`` were made
    under it (a run that failed before its first batch), so a corrected rerun is not refused.
    ``shards``: the batch indices in ``out/shards`` (default: listed here).
    """
    path = out / "manifest.json"
    check_owned(out)
    stored = read_manifest(out)
    shards = existing_shards(out) if shards is None else shards
    if stored is None:
        save_json_atomic(path, manifest)
        return manifest
    keys = sorted((set(stored) | set(manifest)) - set(_INFO_KEYS) - set(_RESULT_KEYS))
    changed = [k for k in keys if stored.get(k) != manifest.get(k)]
    if not changed:
        return stored
    if not shards and not (out / "samples.npz").exists():
        save_json_atomic(path, manifest)  # an earlier run stopped before its first batch: nothing to protect
        return manifest

    def show(v):
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    lines = [f"  {k}: stored {show(stored.get(k))}, given {show(manifest.get(k))}" for k in changed]
    raise ValueError(
        f"{out} holds samples made with other arguments (see {path}):\n" + "\n".join(lines)
        + "\nRerun with the stored arguments to resume, or choose another --out folder (or delete this one)."
    )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on every platform (e.g. Windows)
        return None


def check_room(folder: Path, num_images: int, image_shape: Sequence[int], pending: int, out: Path | None = None) -> None:
    """Refuse up front a run whose images cannot fit: the ``pending`` images' shards and ``samples.npz``
    (``num_images`` images of ``image_shape`` uint8 bytes) on the disk of ``folder`` (``out`` or, before
    ``out`` exists, its nearest existing parent), and ``samples.npz`` in memory, where it is assembled."""
    out = folder if out is None else out
    per_image = math.prod(image_shape)
    total = num_images * per_image
    need = pending * per_image + total
    free = shutil.disk_usage(folder).free
    what = f"{num_images:,} images of {'×'.join(map(str, image_shape))} bytes"
    if need > free:
        raise ValueError(f"{what} need {_size(need)} in {out} (the shards still to sample, then samples.npz), but "
                         f"{_size(free)} are free there; sample fewer images (--num-images) or into a larger disk")
    memory = _physical_memory()
    if memory is not None and total > memory:
        raise ValueError(f"{what} make a samples.npz of {_size(total)}, which is assembled in memory, but this machine "
                         f"has {_size(memory)}; sample fewer images per --out folder (--num-images)")


def clear_temporaries(out: Path) -> None:
    """Remove what a killed run left half-written (temporary files of atomic writes); under the folder's lock only."""
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / "shards")


# --- sampling -------------------------------------------------------------------------------------


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
    threads: int | None = None,
) -> Path:
    """Sample ``num_images`` images into ``out`` (resumable, see the module docstring); returns ``out/samples.npz``.

    The sub-sequence is ``linear_schedule().timesteps(steps, spacing, t_min=t_min)``; the manifest records
    it. With ``spacing="uniform"`` (the paper's ``range(0, T, T // steps)``) it has more than ``steps``
    entries when ``steps`` does not divide T = 1000; ``"leading"`` keeps exactly ``steps``. With
    ``keep_shards=False`` the shards are deleted once ``samples.npz`` is written; a later call with
    the same arguments then finds ``samples.npz`` and no shards, checks it against the SHA-256 the
    manifest recorded, and returns at once. ``rtol``, ``atol``: the tolerances of an adaptive solver
    (None: its defaults; recorded in the manifest). ``threads``: torch's intra-op threads while sampling;
    by default one for a model under 5M parameters on a CPU, unless ``OMP_NUM_THREADS`` or
    ``torch.set_num_threads`` chose a number (:mod:`ddim_edu.utils.threads`: on a busy machine more threads
    can be many times slower). Raises :class:`~ddim_edu.utils.files.FolderInUse` if another process is
    writing into ``out``.
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
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ValueError(f"out (--out) must name a folder, got {out!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out (--out) {out} exists and is not a folder")
    device = resolve_device(device)
    small = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_WORK_PARAMETERS
    n_threads = choose_threads(threads, small)
    schedule = linear_schedule()
    timesteps = schedule.timesteps(steps, spacing, **({} if t_min is None else {"t_min": t_min}))
    check_options(method, len(timesteps), final_step=final_step)  # τ long enough, before any file is written
    manifest = sample_manifest(model, method=method, final_step=final_step, steps=steps, eta=eta, spacing=spacing, t_min=t_min,
                               num_images=num_images, batch_size=batch_size, seed=seed, timesteps=timesteps,
                               source=source, device=device, tols=tols)
    if not out.exists():  # the space for a new folder, before it is made
        image_shape = (model.config.image_size, model.config.image_size, model.config.in_channels)
        check_room(next(p for p in out.absolute().parents if p.is_dir()), num_images, image_shape, num_images, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a dangling symbolic link, or a file made since the check above
        raise ValueError(f"out (--out) {out} exists and is not a folder") from None
    with folder_lock(out), intra_op_threads(n_threads):
        return _generate_locked(model, out, manifest, schedule, timesteps, method=method, eta=eta, final_step=final_step,
                                tols=tols, num_images=num_images, batch_size=batch_size, seed=seed, device=device,
                                grid=grid, keep_shards=keep_shards, progress=progress)


def _generate_locked(model: UNet, out: Path, manifest: dict, schedule, timesteps, *, method, eta, final_step, tols,
                     num_images, batch_size, seed, device, grid, keep_shards, progress) -> Path:
    """:func:`generate`'s work once it holds the lock of ``out``."""
    config = model.config
    shape = (config.in_channels, config.image_size, config.image_size)
    num_batches = math.ceil(num_images / batch_size)
    samples = out / "samples.npz"
    clear_temporaries(out)
    check_owned(out)
    read_manifest(out)  # a foreign manifest is refused before anything else is said
    done = {k for k in existing_shards(out) if k < num_batches}  # one listing, however many batches
    pending = num_images - sum(min((k + 1) * batch_size, num_images) - k * batch_size for k in done)
    finished = samples.is_file() and not (out / "shards").is_dir()
    check_room(out, num_images, (*shape[1:], shape[0]), 0 if finished else pending)
    stored = check_manifest(out, manifest, done)
    run = run_digest(manifest)

    if finished:  # finished earlier, shards removed
        recorded = stored.get("samples_sha256")
        if recorded is not None and file_sha256(samples) != recorded:
            raise ValueError(f"{samples} is not the file this run wrote (its SHA-256 differs from the one in "
                             f"{out / 'manifest.json'}); delete it and rerun to sample the images again")
        if grid:
            images = load_images(samples, channels=(config.in_channels,), min_images=1)
            save_png(tile(images[:grid]), out / "grid.png")
        return samples

    model = model.to(device).eval()
    bar = tqdm(total=num_batches, initial=len(done), desc=f"sampling {method}", unit="batch", disable=not progress)
    with bar:
        for k in range(num_batches):
            if k in done:
                continue
            start, stop = k * batch_size, min((k + 1) * batch_size, num_images)
            x_T = initial_noise(seed, start, stop, shape).to(device)
            images = sample_batch(model, x_T, schedule, timesteps, method=method, eta=eta,
                                  generator=step_generator(seed, k, device), final_step=final_step, tols=tols)
            save_npz_atomic(shard_path(out, k), images=images, first_index=np.int64(start),
                            sha256=np.array(shard_digest(run, k, start, images)))
            bar.update()

    images = assemble(out, num_batches, num_images, batch_size=batch_size, image_shape=(*shape[1:], shape[0]), run=run)
    save_npz_atomic(samples, images=images)
    save_json_atomic(out / "manifest.json", {**stored, "samples_sha256": file_sha256(samples)})
    if grid:
        save_png(tile(images[:grid]), out / "grid.png")
    if not keep_shards:
        for k in range(num_batches):
            shard_path(out, k).unlink()
        (out / "shards").rmdir()
    return samples


def assemble(out, num_batches: int, num_images: int, *, batch_size: int, image_shape: Sequence[int], run: str) -> np.ndarray:
    """The images of all shards in order, [num_images, H, W, C], each shard checked against the run: its
    first image's index, dtype and shape, and the checksum it was written with (:func:`shard_digest`).
    A shard that fails is named in the error, with what to do."""
    images = np.empty((num_images, *image_shape), dtype=np.uint8)
    for k in range(num_batches):
        path = shard_path(out, k)
        start, stop = k * batch_size, min((k + 1) * batch_size, num_images)
        redo = "delete it and rerun to sample that batch again"
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [key for key in ("images", "first_index", "sha256") if key not in npz.files]
                if missing:
                    raise ValueError(f"shard {path} lacks {', '.join(missing)}: it was not written by this command "
                                     f"(or by an older version, without checksums); {redo}")
                part, first, digest = npz["images"], npz["first_index"], npz["sha256"]
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"shard {path} cannot be read ({type(e).__name__}: {e}); {redo}") from None
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(f"shard {path}") else f"shard {path} cannot be read ({e}); {redo}") from None
        want = (stop - start, *image_shape)
        if part.dtype != np.uint8 or part.shape != want or first.shape != () or first.dtype.kind not in "iu" \
                or int(first) != start:
            raise ValueError(f"shard {path} holds {part.dtype} images {part.shape} from index {first}, but this run's "
                             f"batch {k} is uint8 {want} from index {start}; {redo}")
        if digest.shape != () or str(digest) != shard_digest(run, k, start, part):
            raise ValueError(f"shard {path} does not match the checksum it was written with: it was changed or replaced "
                             f"since, or was made for other arguments; {redo}")
        images[start:stop] = part
    return images
