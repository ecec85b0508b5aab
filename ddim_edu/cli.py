"""Command line: ``python -m ddim_edu sample ...`` and ``python -m ddim_edu fid ...``.

``sample`` draws images from a pretrained UNet (a diffusers-layout folder read by
:func:`ddim_edu.pretrained.load_unet`) or from the EMA weights of a checkpoint of
:func:`ddim_edu.image_training.train_image_model`, with any method of
:func:`ddim_edu.solvers.sample`, on DDPM's linear schedule (T = 1000, the schedule of the
published CIFAR-10 model). It writes into ``--out``:

- ``samples.npz``: the images as uint8 ``[N, H, W, C]`` under the key ``"images"``, the layout
  FID tools read;
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

``fid`` computes the Fréchet Inception Distance (Heusel et al. 2017) of an ``.npz`` of uint8
images against CIFAR-10's training set. The glue is here: :func:`feature_statistics` (mean and
covariance of features), :func:`frechet_distance` (the closed form between two Gaussians), and
reference statistics computed once from a CIFAR-10 archive (:mod:`ddim_edu.data`) and
cached. The features come from torch-fidelity's port of the TensorFlow Inception-v3 used by the
original FID code (pool3, 2048 dimensions), an optional dependency; the extractor is a plain
argument (:class:`Features`), so the glue is tested with any stand-in.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checks import check_int
from .data import CIFAR10_URL, float_to_pixels, load_cifar10, locate_cifar10
from .files import atomic_write, load_weights_only
from .image_training import load_checkpoint
from .interrupts import sigterm_as_keyboard_interrupt
from .pretrained import config_from_diffusers, load_unet, unet_from_state_dict
from .schedules import SPACINGS, linear_schedule
from .solvers import ADAPTIVE, ADAPTIVE_ATOL, ADAPTIVE_RTOL, FINAL_STEPS, METHODS, SAMPLERS, noise_levels, sample
from .unet import UNet, UNetConfig

METHOD_GROUPS = {
    "Eq 12 samplers": tuple(SAMPLERS),
    "ODE methods (Eq 14)": tuple(METHODS),
    "adaptive ODE solvers (torchdiffeq)": tuple(ADAPTIVE),
}
ALL_METHODS = tuple(name for names in METHOD_GROUPS.values() for name in names)
FRACTIONAL_SPACINGS = ("linear", "karras", "logsnr")  # the spacings that take t_min
MANIFEST_FORMAT = "ddim_edu.cli.sample/1"
_INFO_KEYS = ("source", "torch", "device")  # recorded in the manifest, not compared on resume
_STREAM_X_T, _STREAM_STEPS = 0, 1  # seed streams: per-image x_T, per-batch sampler noise


class CommandError(Exception):
    """An error to report on one line and exit with status 1 (no traceback)."""


class FIDBackendMissing(CommandError):
    """The Inception feature extractor (torch-fidelity or its weights) is not available; the message says what to install."""


# --- method names ---------------------------------------------------------------------------------


def method_listing() -> str:
    """The valid ``--method`` names, by family."""
    return "; ".join(f"{group}: {', '.join(names)}" for group, names in METHOD_GROUPS.items())


def check_method(method: str, eta: float, final_step: str = "euler", rtol: float | None = None,
                 atol: float | None = None) -> None:
    """Refuse unknown methods (listing the valid names), η with a method other than ``ddim``, a
    ``final_step`` other than Euler's with a method that is not one of ``METHODS``, and tolerances
    (``rtol``, ``atol``; None: the solver's default) that are not positive or not for an adaptive solver."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}. Valid methods are {method_listing()}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (0 is DDIM, 1 is DDPM), got {eta!r}")
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta (Eq 16) applies to method 'ddim' only; method {method!r} got eta={eta!r}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    if final_step != "euler" and method not in METHODS:
        raise ValueError(f"final step {final_step!r} applies to the ODE methods ({', '.join(METHODS)}), "
                         f"not to method {method!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is None:
            continue
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {tol!r}")
        if method not in ADAPTIVE:
            raise ValueError(f"{name} applies to the adaptive solvers ({', '.join(ADAPTIVE)}), not to method {method!r}")


def tolerances(method: str, rtol: float | None, atol: float | None) -> dict:
    """The tolerances an adaptive solver runs with (the solver's defaults where None); empty for other methods."""
    if method not in ADAPTIVE:
        return {}
    return {"rtol": float(ADAPTIVE_RTOL if rtol is None else rtol), "atol": float(ADAPTIVE_ATOL if atol is None else atol)}


# --- models ---------------------------------------------------------------------------------------


def read_unet_config(path) -> UNetConfig:
    """A :class:`UNetConfig` from a JSON file: a diffusers ``config.json`` or the fields of UNetConfig."""
    path = Path(path)
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read the model config {path}: {e}") from None
    if not isinstance(fields, dict):
        raise CommandError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    if "block_out_channels" in fields:  # diffusers' UNet2DModel config
        return config_from_diffusers(fields)
    try:
        return UNetConfig(**fields)
    except TypeError as e:
        raise CommandError(f"{path} is neither a diffusers config.json nor UNetConfig fields: {e}") from None


CHECKPOINT_WEIGHTS = ("ema", "model")


def load_checkpoint_unet(path, config: UNetConfig | None = None, weights: str = "ema") -> UNet:
    """A :func:`ddim_edu.image_training.train_image_model` checkpoint's EMA weights (or, with
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
        raise CommandError(f"{e}; for a plain state dict or a diffusers folder use --model") from None
    stored = checkpoint.get("unet_config")
    if config is None and stored is not None:
        try:
            config = UNetConfig(**stored)
        except (TypeError, ValueError) as e:
            raise CommandError(f"{path} stores a UNet config that cannot be used ({e}); pass --config") from None
    return unet_from_state_dict(checkpoint[weights], config, source=f"{path} ({weights} weights)")


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes): which weights made the samples."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype (bfloat16 too)
    return digest.hexdigest()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device=None) -> torch.device:
    """``device`` (default: cuda if available, else cpu) as a torch.device that this torch can use, or CommandError."""
    name = device or default_device()
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # unknown name, or a backend this build or machine lacks
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CommandError(f"--device {name!r} cannot be used here ({reason}); "
                           f"this torch has CUDA: {torch.cuda.is_available()}; try --device cpu") from None
    return device


# --- randomness -----------------------------------------------------------------------------------


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A 64-bit seed for item ``index`` of ``stream``, from numpy's SeedSequence (stable across versions)."""
    return int(np.random.SeedSequence(seed, spawn_key=(stream, index)).generate_state(1, np.uint64)[0])


def initial_noise(seed: int, start: int, stop: int, shape: Sequence[int]) -> Tensor:
    """x_T ~ N(0, I) for images ``start..stop-1`` [stop-start, *shape] (float32, CPU); image i's noise depends on (seed, i) only."""
    return torch.stack([
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(derive_seed(seed, _STREAM_X_T, i)))
        for i in range(start, stop)
    ])


def step_generator(seed: int, batch: int, device) -> torch.Generator:
    """The generator of the stochastic samplers' per-step noise in batch ``batch`` (on ``device``)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, _STREAM_STEPS, batch))


# --- files ----------------------------------------------------------------------------------------


def save_npz_atomic(path, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) to ``path`` atomically: a crash or Ctrl-C never leaves a torn file."""
    path = Path(path)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def _save_json_atomic(path: Path, obj: dict) -> None:
    """A JSON object with one key per line (long lists such as the timesteps stay on their line)."""
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"
    with atomic_write(path) as f:
        f.write(text.encode())


def load_images(path) -> np.ndarray:
    """uint8 images [N, H, W, 3] from an ``.npz`` (key ``"images"``, or its only array, e.g. ``arr_0``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    layout = "an .npz of uint8 images [N, H, W, 3] under the key 'images' (numpy.savez(path, images=...))"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise CommandError(f"{path} is a single .npy array; expected {layout}")
        with loaded as npz:
            keys = list(npz.keys())
            key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
                raise CommandError(f"{path} holds the arrays {shown}; expected {layout}")
            images = npz[key]
    except (OSError, ValueError) as e:  # numpy's own advice (allow_pickle) does not apply here
        raise CommandError(f"{path} is not an .npz file ({type(e).__name__}); expected {layout}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise CommandError(f"{path}: expected at least 2 uint8 RGB images [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def save_grid(images: np.ndarray, path, n: int = 64, padding: int = 2) -> Path:
    """The first ``n`` uint8 images [N, H, W, C] tiled in a square-ish grid with white borders, as a PNG."""
    import matplotlib.image

    images = images[:n]
    B, H, W, C = images.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    grid = np.full((rows * (H + padding) + padding, cols * (W + padding) + padding, C), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top:top + H, left:left + W] = image
    path = Path(path)
    with atomic_write(path) as f:
        matplotlib.image.imsave(f, grid[..., 0] if C == 1 else grid, cmap="gray", vmin=0, vmax=255, format="png")
    return path


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
            raise CommandError(f"{out / 'shards'} holds shards but {path} is missing, so they cannot be checked; "
                               "use another --out folder or delete this one")
        _save_json_atomic(path, manifest)
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"{path} cannot be read ({e}); use another --out folder or delete this one") from None
    keys = sorted((set(stored) | set(manifest)) - set(_INFO_KEYS))
    changed = [k for k in keys if stored.get(k) != manifest.get(k)]
    if changed and not any((out / "shards").glob("batch_*.npz")) and not (out / "samples.npz").exists():
        _save_json_atomic(path, manifest)  # an earlier run stopped before its first batch: nothing to protect
        return
    if changed:
        def show(v):
            text = json.dumps(v)
            return text if len(text) <= 60 else text[:57] + "..."

        lines = [f"  {k}: stored {show(stored.get(k))}, given {show(manifest.get(k))}" for k in changed]
        raise CommandError(
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

    The sub-sequence is ``linear_schedule().timesteps(steps, spacing, t_min=t_min)``. With
    ``keep_shards=False`` the shards are deleted once ``samples.npz`` is written; a later call with
    the same arguments then finds ``samples.npz`` and no shards and returns at once. ``rtol``,
    ``atol``: the tolerances of an adaptive solver (None: its defaults; recorded in the manifest).
    """
    check_method(method, eta, final_step, rtol, atol)
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
    if method not in SAMPLERS:
        noise_levels(schedule, timesteps, method)  # refuses τ too short for a multistep method, before any file is written
    manifest = sample_manifest(model, method=method, final_step=final_step, steps=steps, eta=eta, spacing=spacing, t_min=t_min,
                               num_images=num_images, batch_size=batch_size, seed=seed, timesteps=timesteps,
                               source=source, device=device, tols=tols)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out, manifest)
    samples = out / "samples.npz"
    num_batches = math.ceil(num_images / batch_size)
    if samples.is_file() and not (out / "shards").is_dir():  # finished earlier, shards removed
        if grid:
            save_grid(load_images(samples), out / "grid.png", grid)
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
        save_grid(images, out / "grid.png", grid)
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
            raise CommandError(f"shard {path} cannot be read ({e}); delete it and rerun to sample that batch again") from None
    images = np.concatenate(parts)
    if len(images) != num_images:
        raise CommandError(f"the shards in {Path(out) / 'shards'} hold {len(images)} images, expected {num_images}; "
                           "delete the folder and rerun")
    return images


# --- FID ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """A feature extractor for FID: ``fn(uint8 images [B, H, W, 3]) -> float array [B, D]``.

    ``name`` tags cached reference statistics, so statistics of one extractor are never used with another.
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """The mean [D] and the unbiased covariance [D, D] of features [N, D] (float64): the Gaussian FID fits."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be an array [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class FeatureMoments:
    """Mean and covariance of features streamed in batches, without keeping them (float64).

    Sums are taken around a shift K (the first batch's mean), so that ``Σ(x-K)(x-K)ᵀ - n m mᵀ``
    with m = mean(x-K) does not cancel catastrophically; the result equals :func:`feature_statistics`
    of all the features up to rounding.
    """

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def update(self, features) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or (self.shift is not None and f.shape[1] != len(self.shift)):
            raise ValueError(f"features must be [B, D] with a fixed D, got shape {f.shape}")
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.sum, self.outer = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        c = f - self.shift
        self.n += len(f)
        self.sum += c.sum(axis=0)
        self.outer += c.T @ c

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        m = self.sum / self.n
        return self.shift + m, (self.outer - self.n * np.outer(m, m)) / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet (2-Wasserstein) distance² between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, FID):

        d² = ‖μ1 - μ2‖² + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^{1/2}).

    (Σ1 Σ2)^{1/2} is computed with ``scipy.linalg.sqrtm``. Σ1 Σ2 is similar to the positive
    semi-definite Σ1^{1/2} Σ2 Σ1^{1/2}, so its square root has a real spectrum; rounding can still
    make sqrtm fail on near-singular covariances (fewer samples than dimensions) or return tiny
    imaginary parts. In the first case ``eps`` is added to both diagonals and the root recomputed;
    imaginary parts are dropped if they are small against the trace, and raise ValueError otherwise.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"need means [D] and covariances [D, D] of one D, got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("means and covariances must be finite")

    diff = mu1 - mu2
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # sqrtm warns that a singular product "might not have a square root"; Σ1 Σ2 always has one,
        # and the result is checked below (on rank-deficient test cases it agrees with the
        # symmetric form to ~1e-8, closer than the regularised retry would)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():  # singular product: regularise both covariances
        offset = eps * np.eye(d)
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        imag = np.abs(root.imag).max()
        scale = max(1.0, abs(np.trace(root.real)))
        if imag > 1e-3 * scale:
            raise ValueError(f"sqrtm(Σ1 Σ2) has an imaginary component of {imag:.3g}: the covariances are not valid")
        root = root.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def image_statistics(images: np.ndarray, features: Features, batch_size: int = 250,
                     progress: bool = False, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of ``features.fn`` over uint8 images [N, H, W, 3], in batches."""
    moments = FeatureMoments()
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        moments.update(features.fn(images[start:start + batch_size]))
    return moments.statistics()


NEED_CIFAR10 = "the CIFAR-10 training set is needed once to compute the reference statistics"


def default_stats_path(features_name: str) -> Path:
    """Where CIFAR-10 train statistics are cached: ``$XDG_CACHE_HOME/ddim_edu`` (default ``~/.cache/ddim_edu``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ddim_edu" / f"fid_stats_cifar10_train_{features_name}.npz"


def cifar10_statistics(features: Features, stats=None, *, cifar10=None, records_per_file: int | None = 10000,
                       batch_size: int = 250, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of the CIFAR-10 training images (all 50000), read from the cache ``stats`` or computed and cached there.

    ``cifar10`` is an official archive or its folder (:func:`ddim_edu.data.load_cifar10`; None reads
    ``$DDIM_EDU_CIFAR10``). The cache stores the extractor's name and is refused for another extractor.
    """
    stats = Path(stats) if stats is not None else default_stats_path(features.name)
    if stats.is_file():
        try:
            with np.load(stats, allow_pickle=False) as npz:
                name, mu, sigma = str(npz["features"]), npz["mu"], npz["sigma"]
        except (OSError, ValueError, KeyError) as e:
            raise CommandError(f"{stats} is not a statistics file of this tool ({e}); delete it to recompute") from None
        if name != features.name:
            raise CommandError(f"{stats} holds statistics of the features {name!r}, not {features.name!r}; "
                               "pass another --stats path or delete it to recompute")
        return mu, sigma
    try:
        images, _ = load_cifar10(cifar10, "train", records_per_file=records_per_file)
    except FileNotFoundError as e:
        raise CommandError(f"{NEED_CIFAR10}: {e}") from None
    images = images.permute(0, 2, 3, 1).numpy()  # [N, 32, 32, 3]
    mu, sigma = image_statistics(images, features, batch_size, progress, desc="CIFAR-10 train features")
    save_npz_atomic(stats, mu=mu, sigma=sigma, n=np.int64(len(images)), features=np.array(features.name))
    return mu, sigma


def fid(images: np.ndarray, reference: tuple[np.ndarray, np.ndarray], features: Features, *,
        batch_size: int = 250, progress: bool = True) -> float:
    """FID of uint8 images [N, H, W, 3] against reference statistics (μ, Σ) of the same ``features``."""
    mu, sigma = image_statistics(images, features, batch_size, progress, desc="sample features")
    return frechet_distance(mu, sigma, *reference)


# --- the Inception features (torch-fidelity) ------------------------------------------------------

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES_NAME = "torch-fidelity-inception-v3-2015-12-05-pool3"
def paired_torchvision(torch_version: str = torch.__version__) -> str:
    """The torchvision release made for a torch 2.x release: 0.(minor + 15), e.g. torch 2.13 → torchvision 0.28."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    return f"0.{minor + 15}" if major == 2 else "the release listed for your torch at https://pytorch.org/get-started/previous-versions/"


def fid_install_hint() -> str:
    """How to install the FID backend without pip replacing the installed torch."""
    tv = paired_torchvision()
    pin = f'"torchvision=={tv}.*"' if tv[0].isdigit() else "torchvision"
    return (f"Install torch-fidelity with the torchvision made for your torch {torch.__version__}, so that pip keeps "
            f"your torch: pip install torch-fidelity {pin} (a bare `pip install torch-fidelity` may replace torch with "
            f"the newest, CUDA build). With a CPU-only build of torch (+cpu), take that torchvision from the same "
            f"index: pip install {pin} --index-url https://download.pytorch.org/whl/cpu, then pip install "
            f"torch-fidelity (PyPI's torchvision fails beside it: 'operator torchvision::nms does not exist').")


def default_inception_weights() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


def inception_features(weights=None, device=None) -> Features:
    """torch-fidelity's Inception-v3 (the TensorFlow FID network, TF1-compatible bilinear resize to 299) pool3 features.

    Nothing is downloaded: the weights file must exist at ``weights`` (default
    :func:`default_inception_weights`); otherwise :class:`FIDBackendMissing` says what to fetch and where.
    """
    try:
        import torchvision  # noqa: F401  (torch-fidelity imports it; a build for another torch fails here)
    except (ImportError, RuntimeError, OSError) as e:
        what = "is not installed" if isinstance(e, ImportError) else f"does not fit torch {torch.__version__}"
        raise FIDBackendMissing(f"the FID features need torch-fidelity, which needs torchvision; torchvision {what} "
                                f"({type(e).__name__}: {e}). {fid_install_hint()}") from None
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )
    except (ImportError, RuntimeError, OSError) as e:
        raise FIDBackendMissing(f"the FID features need torch-fidelity, which cannot be imported here "
                                f"({type(e).__name__}: {e}). {fid_install_hint()}") from None
    weights = Path(weights) if weights is not None else default_inception_weights()
    if not weights.is_file():
        raise FIDBackendMissing(
            f"the Inception-v3 weights are not at {weights}. Nothing is downloaded automatically: fetch "
            f"{INCEPTION_WEIGHTS_URL} and save it there (mkdir -p {weights.parent} && curl -L -o {weights} "
            f"{INCEPTION_WEIGHTS_URL}), or pass --inception-weights PATH."
        )
    try:  # torch-fidelity reads the file with weights_only=False: refuse anything but tensors first
        load_weights_only(weights)
    except ValueError as e:
        raise CommandError(f"{e}; download it again from {INCEPTION_WEIGHTS_URL}") from None
    device = resolve_device(device)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    net = net.to(device).eval()

    def fn(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # uint8 [B, 3, H, W]
        with torch.no_grad():
            (pool3,) = net(x)
        return pool3.double().cpu().numpy()

    return Features(INCEPTION_FEATURES_NAME, fn)


# --- command line ---------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, so that a bad count is refused under its flag's name."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddim_edu", description="ddim_edu: sample images and score them with FID.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("sample", help="sample images from a pretrained or trained UNet (resumable)",
                       description="Sample images into --out: samples.npz (uint8 [N, H, W, 3], key 'images'), grid.png, "
                                   "and per-batch shards so that a rerun with the same arguments resumes.")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a diffusers-layout folder, a state-dict file, or a Hugging Face name "
                                       "(e.g. google/ddpm-cifar10-32: a local folder of that name, else the Hugging Face cache)")
    which.add_argument("--checkpoint", help="a checkpoint of ddim_edu.image_training (its EMA weights, see --weights)")
    s.add_argument("--weights", default="ema", choices=CHECKPOINT_WEIGHTS,
                   help="which weights of a --checkpoint: ema (default; what to sample after a long run) or model "
                        "(the trained weights; for a short run, whose EMA is still near the initial weights)")
    s.add_argument("--config", help="JSON UNet config (diffusers config.json or UNetConfig fields) for --checkpoint "
                                    "or a single state-dict file (default: the config a training checkpoint stores, "
                                    "else the CIFAR-10 UNet)")
    s.add_argument("--download", action="store_true", help="let --model NAME download from the Hugging Face Hub "
                                                            "(needs huggingface_hub: the hub extra)")
    s.add_argument("--method", default="ddim", help=f"sampling method (default ddim). {method_listing()}")
    s.add_argument("--steps", type=int_at_least(1), default=50, help="S, the length of the sub-sequence τ (default 50); an adaptive solver "
                                                            "uses τ_S and τ_1 only and chooses its own steps")
    s.add_argument("--eta", type=float, default=0.0, help="η of Eq 16 for --method ddim: 0 DDIM, 1 DDPM (default 0)")
    s.add_argument("--final-step", default="euler", choices=FINAL_STEPS,
                   help="last step to σ = 0 of an ODE method: euler (= DDIM's) or extrapolate (the x_0 predictions "
                        "extrapolated in σ²; default euler)")
    default_tols = tolerances(ADAPTIVE[0], None, None)
    s.add_argument("--rtol", type=float, default=None,
                   help=f"relative tolerance of an adaptive solver ({', '.join(ADAPTIVE)}; default {default_tols['rtol']:g})")
    s.add_argument("--atol", type=float, default=None,
                   help=f"absolute tolerance of an adaptive solver (default {default_tols['atol']:g})")
    s.add_argument("--spacing", default="uniform", choices=SPACINGS, help="how τ is chosen (default uniform)")
    s.add_argument("--t-min", type=float, default=None, help=f"smallest timestep for the spacings {', '.join(FRACTIONAL_SPACINGS)}")
    s.add_argument("--num-images", type=int_at_least(1), default=64, help="number of images (default 64)")
    s.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per batch and per shard (default 64)")
    s.add_argument("--seed", type=int_at_least(0), default=0, help="seed of all randomness (default 0)")
    s.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--grid", type=int_at_least(0), default=64, help="images in grid.png (default 64; 0: no grid)")
    s.add_argument("--remove-shards", action="store_true", help="delete the shards once samples.npz is written")
    s.add_argument("--out", required=True, type=Path, help="output folder")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=_cmd_sample, parser=s)

    f = sub.add_parser("fid", help="FID of an .npz of uint8 images against CIFAR-10 train statistics",
                       description="FID of uint8 images [N, H, W, 3] (key 'images') against the CIFAR-10 training set, "
                                   "with torch-fidelity's Inception-v3 pool3 features (the error says what to install if it is missing).")
    f.add_argument("samples", type=Path, help=".npz of uint8 images [N, H, W, 3]")
    f.add_argument("--stats", type=Path, default=None, help="cache of the CIFAR-10 statistics (default ~/.cache/ddim_edu/...)")
    f.add_argument("--cifar10", default=None, help=f"CIFAR-10 archive (binary or python version) or its folder, needed once to compute the "
                                                   f"statistics (default $DDIM_EDU_CIFAR10; download {CIFAR10_URL})")
    f.add_argument("--inception-weights", type=Path, default=None, help=f"Inception weights file (default {default_inception_weights()})")
    f.add_argument("--batch-size", type=int_at_least(1), default=250, help="images per forward pass (default 250)")
    f.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(run=_cmd_fid, parser=f)
    return parser


def load_model_from_args(model: str | None, checkpoint: str | None, config: str | None, download: bool = False,
                         weights: str = "ema") -> tuple[UNet, str]:
    """The UNet that ``--model`` or ``--checkpoint`` (with ``--weights``) name, and a description of its source."""
    unet_config = read_unet_config(config) if config else None
    if checkpoint is not None:
        return load_checkpoint_unet(checkpoint, unet_config, weights), f"checkpoint {checkpoint} ({weights})"
    return load_unet(model, config=unet_config, download=download), f"model {model}"


def _cmd_sample(args, parser) -> int:
    try:
        check_method(args.method, args.eta, args.final_step, args.rtol, args.atol)
    except ValueError as e:
        parser.error(str(e))
    if args.weights != "ema" and args.checkpoint is None:
        parser.error("--weights applies to --checkpoint only")
    model, source = load_model_from_args(args.model, args.checkpoint, args.config, args.download, args.weights)
    path = generate(model, args.out, method=args.method, steps=args.steps, eta=args.eta, final_step=args.final_step,
                    rtol=args.rtol, atol=args.atol,
                    spacing=args.spacing,
                    t_min=args.t_min, num_images=args.num_images, batch_size=args.batch_size, seed=args.seed,
                    device=args.device, grid=args.grid, keep_shards=not args.remove_shards,
                    progress=not args.quiet, source=source)
    print(f"wrote {path}" + (f" and {args.out / 'grid.png'}" if args.grid else ""))
    return 0


def _cmd_fid(args, parser) -> int:
    images = load_images(args.samples)
    if images.shape[1:3] != (32, 32):
        print(f"warning: {args.samples} holds {images.shape[1]}×{images.shape[2]} images; CIFAR-10's are 32×32, so the "
              "FID (computed after resizing both to the Inception input) is not comparable to published ones", file=sys.stderr)
    missing = []  # everything that is missing, said at once rather than one run at a time
    try:
        features = inception_features(args.inception_weights, args.device)
    except FIDBackendMissing as e:
        missing.append(str(e))
    stats = args.stats if args.stats is not None else default_stats_path(INCEPTION_FEATURES_NAME)
    if not Path(stats).is_file():
        try:
            locate_cifar10(args.cifar10)
        except FileNotFoundError as e:
            missing.append(f"{NEED_CIFAR10}: {e}")
    if missing:
        raise CommandError("\n".join(f"({i}) {m}" for i, m in enumerate(missing, 1)) if len(missing) > 1 else missing[0])
    reference = cifar10_statistics(features, args.stats, cifar10=args.cifar10, batch_size=args.batch_size,
                                   progress=not args.quiet)
    score = fid(images, reference, features, batch_size=args.batch_size, progress=not args.quiet)
    print(f"FID {score:.4f} ({len(images)} images vs CIFAR-10 train, {features.name})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 bad arguments, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    command = args.parser  # the subcommand's parser: its usage and name head the errors
    try:
        with sigterm_as_keyboard_interrupt():
            return args.run(args, command)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a job scheduler
        where = f"; the finished batches are in {args.out / 'shards'}, rerun the same command to resume" if args.command == "sample" else ""
        print(f"\ninterrupted{where}", file=sys.stderr)
        return 130
    except (CommandError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"{command.prog}: error: {e}", file=sys.stderr)
        return 1
