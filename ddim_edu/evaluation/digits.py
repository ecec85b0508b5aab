"""Distances between sets of 8×8 handwritten digits, measured in the features of a small digits classifier.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018, "Demystifying MMD GANs") compare two sets
of images through the pool3 features of an ImageNet Inception-v3. That network sees nothing useful
in an 8×8 grey digit, so here the features are those of :class:`DigitsClassifier`, a small CNN
trained on the train split of :func:`ddim_edu.image.data.load_digits` (its weights ship as
``toy_data/digits_classifier.safetensors``, made by ``toy_data/make_digits_classifier.py``). The two
distances keep their definitions and change only the feature space, so their values are not FID or
KID values and cannot be compared with published ones:

- :func:`frechet_digits_distance`: the Fréchet distance² between the Gaussians fitted to the two
  sets' features (:func:`ddim_edu.evaluation.fid.feature_statistics` and
  :func:`~ddim_edu.evaluation.fid.frechet_distance`, as FID does with Inception features);
- :func:`kernel_distance`: KID's unbiased MMD² estimate with the cubic polynomial kernel, averaged
  over random subsets, with its standard error; it takes any features [N, D];
- :func:`frechet_bootstrap`: the Fréchet distance between bootstrap resamples of both sets, whose
  spread is its standard error (and, paired across generators, that of their differences);
- :func:`digits_distances` computes both for two sets of images, and :func:`digits_floor` for two
  disjoint sets of real digits (:func:`disjoint_digits`): the value a perfect generator would get
  at that set size.

Images are float [N, 1, 8, 8] in [-1, 1] (the data's and the model's range), or uint8 pixels
[N, 8, 8, 1] (what :mod:`ddim_edu.image.generate` writes to ``samples.npz``), [N, 1, 8, 8] or [N, 8, 8].
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..image.data import load_digits, pixels_to_float
from ..utils.checks import check_int
from ..utils.files import atomic_write
from ..utils.package_data import package_file
from .fid import feature_statistics, frechet_distance

__all__ = [
    "CLASSIFIER_FILE",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "DigitsDistances",
    "KernelDistance",
    "digits_accuracy",
    "digits_distances",
    "digits_features",
    "digits_floor",
    "disjoint_digits",
    "frechet_bootstrap",
    "paired_difference",
    "frechet_digits_distance",
    "kernel_distance",
    "load_digits_classifier",
    "save_digits_classifier",
    "train_digits_classifier",
]

#: The shipped weights, a file of the data package ``ddim_edu.toy_data`` (the repository's ``toy_data/``).
CLASSIFIER_FILE = "digits_classifier.safetensors"
_REBUILD = "python toy_data/make_digits_classifier.py"
_HEADER_KEY = "ddim_edu.digits_classifier"


# --- the classifier ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """The classifier's shape; stored in the weights file's metadata."""

    channels: tuple[int, int] = (16, 32)  # the two 3×3 convolutions (8×8 maps, then 2×2 average pooling to 4×4)
    groups: int = 4  # GroupNorm groups after each convolution
    features: int = 64  # the penultimate layer: the feature space of the distances
    classes: int = 10


class DigitsClassifier(nn.Module):
    """conv3×3 → GroupNorm → ReLU → conv3×3 → GroupNorm → ReLU → 2×2 average pool → FC → SiLU (features) → FC (logits).

    Input: digits [N, 1, 8, 8] in [-1, 1]. :meth:`features` returns the penultimate activations
    [N, D], what the last layer reads (as FID's pool3 features are what Inception's classifier
    reads); :meth:`forward` returns the class logits [N, 10]. The feature layer's activation is
    SiLU rather than ReLU because trained with ReLU a third to a half of the 64 features were 0 on
    every digit, which leaves the features' covariance singular and those dimensions unused.
    """

    def __init__(self, config: DigitsClassifierConfig = DigitsClassifierConfig()):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.norm1 = nn.GroupNorm(config.groups, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.norm2 = nn.GroupNorm(config.groups, c2)
        self.fc = nn.Linear(c2 * 4 * 4, config.features)
        self.head = nn.Linear(config.features, config.classes)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate features [N, D] of digits x [N, 1, 8, 8] in [-1, 1]."""
        h = F.relu(self.norm1(self.conv1(x)))  # [N, c1, 8, 8]
        h = F.relu(self.norm2(self.conv2(h)))  # [N, c2, 8, 8]
        h = F.avg_pool2d(h, 2).flatten(1)  # [N, c2·16]
        return F.silu(self.fc(h))  # [N, D]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # [N, classes]


def train_digits_classifier(*, seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 1e-3,
                            weight_decay: float = 1e-4,
                            config: DigitsClassifierConfig = DigitsClassifierConfig()) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` from scratch on the train split of :func:`~ddim_edu.image.data.load_digits`.

    AdamW with a cosine-decayed learning rate and cross-entropy, no augmentation (the held-out
    accuracy is about 99 % without it). The initial weights and the batches come from generators
    seeded with ``seed``, so a run is repeatable on one machine (another CPU or thread count may
    change the last digits). Returns the model in eval mode.
    """
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    images, labels = load_digits("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(config)
    g = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def digits_accuracy(model: DigitsClassifier | None = None, split: str = "heldout") -> float:
    """The fraction of the ``split`` of :func:`~ddim_edu.image.data.load_digits` that ``model`` (default: the shipped one) labels right."""
    model = load_digits_classifier() if model is None else model
    images, labels = load_digits(split)
    return float((model(images).argmax(1) == labels).double().mean())


def save_digits_classifier(model: DigitsClassifier, path, **metadata) -> Path:
    """Write ``model``'s weights as safetensors to ``path`` atomically, with its config and ``metadata`` in the header.

    The header holds one entry, ``_HEADER_KEY``: a JSON object with sorted keys (safetensors may
    write several entries in any order), so the same weights always give the same bytes.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {_HEADER_KEY: json.dumps({**metadata, "config": asdict(model.config)}, sort_keys=True)}
    path = Path(path)
    with atomic_write(path) as f:
        f.write(save(tensors, metadata=header))
    return path


def load_digits_classifier(path=None) -> DigitsClassifier:
    """The classifier in eval mode, from the shipped ``toy_data/digits_classifier.safetensors`` (or ``path``).

    The file is safetensors (tensors and a text header, nothing unpickled); its header holds the
    :class:`DigitsClassifierConfig`. A missing file raises FileNotFoundError saying how to rebuild it.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(package_file(CLASSIFIER_FILE) if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"the digits classifier's weights are not at {path}; in a checkout of the repository "
                                f"rebuild them (some seconds on a CPU) from the repository root with\n    {_REBUILD}\n"
                                "(a wheel ships the file: reinstall ddim-edu)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        raw = json.loads(header[_HEADER_KEY])["config"]
        config = DigitsClassifierConfig(**{**raw, "channels": tuple(raw["channels"])})
        model = DigitsClassifier(config)
        model.load_state_dict(state)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a digits classifier's weights file ({type(e).__name__}: {reason}); "
                         f"rebuild it with {_REBUILD}") from None
    return model.eval()


# --- features and the Fréchet distance ---------------------------------------------------------


_LAYOUTS = ("float images [N, 1, 8, 8] in [-1, 1], or uint8 pixels [N, 8, 8, 1] (as samples.npz holds them), "
            "[N, 1, 8, 8] or [N, 8, 8]")


def _as_digits(images, name: str) -> Tensor:
    """Images as float32 [N, 1, 8, 8] in [-1, 1] on the CPU; uint8 pixels are converted with ``pixels_to_float``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor: {_LAYOUTS}; got {type(images).__name__}")
    shape, dtype = tuple(images.shape), images.dtype
    if dtype == torch.uint8 and len(shape) == 3:
        x = images[:, None]
    elif dtype == torch.uint8 and len(shape) == 4 and shape[1:] == (8, 8, 1):
        x = images.permute(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    elif dtype == torch.uint8 or images.is_floating_point():
        x = images
    else:
        raise ValueError(f"{name} must be {_LAYOUTS}; got dtype {dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8) or x.shape[0] < 1:
        raise ValueError(f"{name} must be {_LAYOUTS}, with N >= 1; got shape {shape} ({dtype})")
    if dtype == torch.uint8:
        return pixels_to_float(x.detach().cpu().contiguous())
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")
    if float(x.abs().max()) > 2:
        raise ValueError(f"float {name} must lie in [-1, 1] (the data's range); got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}] (pass pixels 0..255 as uint8)")
    return x.clamp(-1, 1)  # as float_to_pixels does with samples that overshoot a little


@torch.no_grad()
def _features(images, model: DigitsClassifier, name: str, batch_size: int = 1024) -> np.ndarray:
    x = _as_digits(images, name)
    return torch.cat([model.features(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]).double().numpy()


def digits_features(images, model: DigitsClassifier | None = None) -> np.ndarray:
    """The classifier's penultimate features, float64 [N, D], of digits ``images``.

    ``images``: float [N, 1, 8, 8] in [-1, 1] (values beyond ±1 are clamped, as
    :func:`~ddim_edu.image.data.float_to_pixels` does; beyond ±2 they raise), or uint8 pixels
    [N, 8, 8, 1] (``samples.npz`` of :mod:`ddim_edu.image.generate`), [N, 1, 8, 8] or [N, 8, 8],
    mapped by :func:`~ddim_edu.image.data.pixels_to_float`. ``model`` defaults to :func:`load_digits_classifier`.
    """
    return _features(images, load_digits_classifier() if model is None else model, "images")


def _two_sets(x, y, model: DigitsClassifier | None) -> tuple[np.ndarray, np.ndarray]:
    model = load_digits_classifier() if model is None else model
    fx, fy = _features(x, model, "x"), _features(y, model, "y")
    for name, f in (("x", fx), ("y", fy)):
        if len(f) < 2:
            raise ValueError(f"{name} needs at least 2 images, got {len(f)}")
    return fx, fy


def frechet_digits_distance(x, y, model: DigitsClassifier | None = None) -> float:
    """The Fréchet distance² between the Gaussians fitted to the classifier's features of digits ``x`` and ``y``.

    FID's formula (Heusel et al. 2017), ``‖μx - μy‖² + tr(Σx + Σy - 2 (Σx Σy)^{1/2})``, with μ the mean
    and Σ the unbiased covariance (:func:`~ddim_edu.evaluation.fid.feature_statistics`) of the
    features of :func:`digits_features` instead of Inception's; the layouts of ``x`` and ``y`` are
    those of :func:`digits_features`. The plug-in estimate is biased upward by O(D/N), so compare
    values at equal set sizes, and against :func:`digits_floor`. Each set needs at least 2 images;
    with fewer than D + 1 the covariances are singular (see :func:`~ddim_edu.evaluation.fid.frechet_distance`).
    """
    fx, fy = _two_sets(x, y, model)
    return frechet_distance(*feature_statistics(fx), *feature_statistics(fy))


def frechet_bootstrap(features_x, features_y, *, replicates: int = 200,
                      generator: torch.Generator | None = None) -> np.ndarray:
    """The Fréchet distance² between bootstrap resamples of features x [N, D] and y [M, D]: an array [replicates].

    Each replicate draws N rows of x and M rows of y with replacement (Efron's bootstrap of both
    sets) and computes the distance of :func:`frechet_digits_distance` between them. The replicates'
    std (ddof 1) is the bootstrap standard error of the full-set distance: unlike KID's standard
    error, it covers the draw of both sets. Their mean lies above the full-set distance (a resample
    holds about 63 % distinct rows, so the plug-in bias is larger); report the full-set distance
    with the std, not the replicates' mean.

    Paired comparisons: the indices come from ``generator`` (default: seeded with 0) and depend only
    on N, M and its state, so calls with identically seeded generators and equal set sizes resample
    the same rows. For generators run from the same x_T (row i of every sample set comes from the
    same x_T[i]) against one reference set, the std of the difference of two such arrays is the
    standard error of the difference of the two distances, far below either one's own when the
    reference set's share of the spread is common to both.
    """
    x, y = _as_features(features_x, "features_x"), _as_features(features_y, "features_y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features_x and features_y must have the same dimension D, got {tuple(x.shape)} and {tuple(y.shape)}")
    check_int("replicates", replicates, minimum=2)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    g = torch.Generator().manual_seed(0) if generator is None else generator
    fx, fy = x.numpy(), y.numpy()
    out = np.empty(replicates)
    for b in range(replicates):
        i = torch.randint(len(fx), (len(fx),), generator=g).numpy()
        j = torch.randint(len(fy), (len(fy),), generator=g).numpy()
        out[b] = frechet_distance(*feature_statistics(fx[i]), *feature_statistics(fy[j]))
    return out


def paired_difference(distance_a: float, replicates_a, distance_b: float, replicates_b) -> tuple[float, float]:
    """distance_a − distance_b and its paired bootstrap standard error, the std (ddof 1) of the replicates'
    differences (:func:`frechet_bootstrap` arrays drawn with identically seeded generators, as its docstring says)."""
    a, b = np.asarray(replicates_a, dtype=float), np.asarray(replicates_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"replicates_a and replicates_b must be paired arrays [R], R >= 2, got {a.shape} and {b.shape}")
    return float(distance_a - distance_b), float((a - b).std(ddof=1))


# --- the kernel distance (KID) -------------------------------------------------------------------


class KernelDistance(NamedTuple):
    """The mean of the subset estimates of MMD² and its standard error (the std of the estimates / sqrt(subsets))."""

    value: float
    standard_error: float


def _cubic_kernel(a: Tensor, b: Tensor) -> Tensor:
    """k(a, b) = (aᵀb / d + 1)³ for every pair: a [..., m, d], b [..., n, d] -> [..., m, n]."""
    return (a @ b.transpose(-1, -2) / a.shape[-1] + 1) ** 3


def _as_features(features, name: str) -> Tensor:
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"{name} must be features [N, D] with N >= 2, got shape {tuple(f.shape)}")
    f = f.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"{name} must be finite")
    return f


def kernel_distance(features_x, features_y, *, subsets: int = 100, subset_size: int = 100,
                    generator: torch.Generator | None = None) -> KernelDistance:
    """KID's estimate of MMD² between the distributions of features x [N, D] and y [M, D] (Bińkowski et al. 2018).

    The kernel is KID's cubic polynomial k(a, b) = (aᵀb / D + 1)³. Each of ``subsets`` rounds draws
    ``subset_size`` = m rows of x and, independently, m rows of y, each without replacement, and
    computes the unbiased estimate (the U-statistic, Gretton et al. 2012, Eq 3)

        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / m²,

    whose expectation is the population MMD², 0 when the two distributions agree; an estimate can
    be negative. The result is the mean of the round estimates and its standard error, their std
    (ddof 1) / sqrt(subsets); NaN for ``subsets=1``. Given the two sets the rounds are independent,
    so the standard error is that of the Monte-Carlo average around the full-set U-statistic (which
    the average estimates without bias); the variation from drawing the sets themselves is not in
    it. With ``subset_size`` equal to both set sizes every round is the full-set U-statistic.
    Computed in float64; subsets come from ``generator`` (default: seeded with 0, so repeatable).
    Bińkowski et al. use subsets of 1000; the default 100 fits sets of a few hundred digits.
    """
    x, y = _as_features(features_x, "features_x"), _as_features(features_y, "features_y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features_x and features_y must have the same dimension D, got {tuple(x.shape)} and {tuple(y.shape)}")
    check_int("subsets", subsets)
    check_int("subset_size", subset_size, minimum=2)
    if subset_size > min(len(x), len(y)):
        raise ValueError(f"subset_size must be at most the size of each set ({len(x)} and {len(y)}), got {subset_size}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    g = torch.Generator().manual_seed(0) if generator is None else generator
    m = subset_size
    estimates = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        k_xx, k_yy, k_xy = _cubic_kernel(a, a), _cubic_kernel(b, b), _cubic_kernel(a, b)
        # U-statistic: the diagonals k(x_i, x_i), k(y_i, y_i) are left out of the within-set means
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        estimates.append(within - 2 * k_xy.mean())
    t = torch.stack(estimates)
    se = float(t.std() / math.sqrt(subsets)) if subsets > 1 else math.nan
    return KernelDistance(float(t.mean()), se)


# --- both distances, and their floor ------------------------------------------------------------


@dataclass(frozen=True)
class DigitsDistances:
    """:func:`frechet_digits_distance` and :func:`kernel_distance` (with its standard error) between two sets of
    digits; ``frechet_standard_error`` is the bootstrap one of :func:`frechet_bootstrap` (NaN when not computed)."""

    frechet: float
    kernel: float
    kernel_standard_error: float
    n_x: int
    n_y: int
    frechet_standard_error: float = math.nan


def digits_distances(x, y, *, model: DigitsClassifier | None = None, subsets: int = 100, subset_size: int | None = None,
                     generator: torch.Generator | None = None, bootstrap: int = 0) -> DigitsDistances:
    """Both distances between digits ``x`` and ``y`` in the classifier's features (the features are computed once).

    ``subset_size`` defaults to min(100, N, M); the other KID arguments are those of :func:`kernel_distance`.
    ``bootstrap`` > 0: that many replicates of :func:`frechet_bootstrap`, drawn from ``generator`` after
    KID's subsets, give ``frechet_standard_error``.
    """
    fx, fy = _two_sets(x, y, model)
    size = min(100, len(fx), len(fy)) if subset_size is None else subset_size
    check_int("bootstrap", bootstrap, minimum=0)
    if bootstrap == 1:
        raise ValueError("bootstrap must be 0 (no standard error) or at least 2 replicates, got 1")
    g = torch.Generator().manual_seed(0) if generator is None else generator
    kid = kernel_distance(fx, fy, subsets=subsets, subset_size=size, generator=g)
    fd = frechet_distance(*feature_statistics(fx), *feature_statistics(fy))
    se = float(frechet_bootstrap(fx, fy, replicates=bootstrap, generator=g).std(ddof=1)) if bootstrap else math.nan
    return DigitsDistances(fd, kid.value, kid.standard_error, len(fx), len(fy), se)


def disjoint_digits(n: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two disjoint random sets of ``n`` real digits [n, 1, 8, 8]: the first n and the next n images of a
    random permutation (``seed``) of the "all" split (1,797 images, so n <= 898).

    The first set is the reference a generator's n samples are compared with, the second what
    :func:`digits_floor` compares it with; the first set for a smaller n is the start of the one for
    a larger n (same seed).
    """
    check_int("n", n, minimum=2)
    images, _ = load_digits("all")
    if 2 * n > len(images):
        raise ValueError(f"n must be at most {len(images) // 2} (two disjoint sets of {len(images)} digits), got {n}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:n]], images[order[n:2 * n]]


def digits_floor(n: int, *, seed: int = 0, model: DigitsClassifier | None = None, subsets: int = 100,
                 subset_size: int | None = None, bootstrap: int = 0) -> DigitsDistances:
    """Both distances between two disjoint random sets of ``n`` real digits each: what a perfect generator scores.

    The two sets are those of :func:`disjoint_digits` (``n``, ``seed``); KID's subsets (and the
    ``bootstrap`` replicates of :func:`digits_distances`) come from a generator seeded with
    ``seed + 1``. Each set is a random draw, as a generator's n samples are, so the floor holds
    only what the finite set size does: the Fréchet distance's upward bias of O(d/n) and KID's
    spread around 0. Held-out against train images would not do: the held-out split is stratified
    (exactly every 5th image of each class), so its class counts match the train split's more
    closely than two random draws' do, and its distances to train images are lower than a generator
    whose class counts vary by chance can reach (at n = 355 the Fréchet distance is about 2 against
    about 4 here, and KID is negative on average); it would also cap n at 355.

    Compare a generator's n samples against n real digits with the floor at the same n. KID's
    standard error covers the subset sampling only; drawing other sets (another ``seed``) moves
    both distances by more, so call it with a few seeds to see the floor's spread.
    """
    reference, other = disjoint_digits(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return digits_distances(reference, other, model=model, subsets=subsets, subset_size=subset_size, generator=g,
                            bootstrap=bootstrap)
