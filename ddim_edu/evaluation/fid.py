"""The Fréchet Inception Distance (Heusel et al. 2017) of generated images against CIFAR-10's training set.

The pieces: :func:`feature_statistics` (mean and covariance of features, or :class:`FeatureMoments`
streamed), :func:`frechet_distance` (the closed form between two Gaussians), and reference statistics
computed once from a CIFAR-10 archive (:mod:`ddim_edu.image.data`) and cached. The features come from
torch-fidelity's port of the TensorFlow Inception-v3 of the original FID code (pool3, 2048
dimensions), an optional dependency; the extractor is a plain argument (:class:`Features`), so the
rest is tested with any stand-in and serves other feature spaces too. ``python -m ddim_edu fid`` is
:func:`fid` behind argument parsing.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..image.data import load_cifar10
from ..utils.checks import resolve_device
from ..utils.files import load_weights_only, save_npz_atomic

__all__ = [
    "FIDBackendMissing",
    "FeatureMoments",
    "Features",
    "INCEPTION_FEATURES_NAME",
    "INCEPTION_WEIGHTS_URL",
    "NEED_CIFAR10",
    "cifar10_statistics",
    "default_inception_weights",
    "default_stats_path",
    "feature_statistics",
    "fid",
    "fid_install_hint",
    "frechet_distance",
    "image_statistics",
    "inception_features",
    "paired_torchvision",
]


class FIDBackendMissing(ImportError):
    """The Inception feature extractor (torch-fidelity or its weights) is not available; the message says what to install."""


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

    ``cifar10`` is an official archive or its folder (:func:`ddim_edu.image.data.load_cifar10`; None reads
    ``$DDIM_EDU_CIFAR10``). The cache stores the extractor's name and is refused for another extractor.
    """
    stats = Path(stats) if stats is not None else default_stats_path(features.name)
    if stats.is_file():
        try:
            with np.load(stats, allow_pickle=False) as npz:
                name, mu, sigma = str(npz["features"]), npz["mu"], npz["sigma"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{stats} is not a statistics file of this tool ({e}); delete it to recompute") from None
        if name != features.name:
            raise ValueError(f"{stats} holds statistics of the features {name!r}, not {features.name!r}; "
                               "pass another --stats path or delete it to recompute")
        return mu, sigma
    try:
        images, _ = load_cifar10(cifar10, "train", records_per_file=records_per_file)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{NEED_CIFAR10}: {e}") from None
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
        raise ValueError(f"{e}; download it again from {INCEPTION_WEIGHTS_URL}") from None
    device = resolve_device(device)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    net = net.to(device).eval()

    def fn(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # uint8 [B, 3, H, W]
        with torch.no_grad():
            (pool3,) = net(x)
        return pool3.double().cpu().numpy()

    return Features(INCEPTION_FEATURES_NAME, fn)


