"""Image data: CIFAR-10 from its official archives, and a small photo that ships with the repository.

DDIM's image experiments (Section 5) train on CIFAR-10, 32×32 RGB, with pixels mapped to
[-1, 1] as in DDPM. :func:`load_cifar10` reads either official version:

- the *binary* version (preferred), https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz: each
  ``.bin`` file is a sequence of records of 1 label byte followed by 3072 pixel bytes (the red,
  then green, then blue 32×32 plane, each row-major), i.e. CHW order; numpy reads it directly;
- the *python* version (what torchvision downloads), cifar-10-python.tar.gz: each batch is a
  pickled dict whose ``data`` is a uint8 array [10000, 3072] in the same pixel order and whose
  ``labels`` is a list. Unpickling a downloaded file can run arbitrary code, so the batches are read
  by an unpickler that knows only the three numpy names a batch uses (a uint8 array and its
  dtype) and refuses every other import before it happens.

Nothing here downloads. For work on a CPU, tests and CI, :func:`load_offline_images` cuts patches
from a photo frozen in ``toy_data/grace_hopper_half.npz`` (made by :func:`make_offline_photo`
from matplotlib's bundled sample ``grace_hopper.jpg``; see ``toy_data/README.md``), which ships
inside the package as data of ``ddim_edu.toy_data``.
"""
from __future__ import annotations

import io
import numbers
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from ..utils.package_data import package_file

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_ENV",
    "CIFAR10_FILES",
    "CIFAR10_FOLDER",
    "CIFAR10_PYTHON_FOLDER",
    "CIFAR10_PYTHON_URL",
    "CIFAR10_URL",
    "DIGITS_HELDOUT_EVERY",
    "DIGITS_SPLITS",
    "OFFLINE_PHOTO_FILE",
    "extract_cifar10",
    "float_to_pixels",
    "load_cifar10",
    "load_digits",
    "load_offline_images",
    "load_offline_photo",
    "locate_cifar10",
    "make_offline_photo",
    "pixels_to_float",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_PYTHON_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ENV = "DDIM_EDU_CIFAR10"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_PYTHON_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes

#: The frozen photo's file name in the package data (``toy_data/`` in the repository).
OFFLINE_PHOTO_FILE = "grace_hopper_half.npz"


# --- pixels <-> model range ----------------------------------------------------------------------


def pixels_to_float(images: Tensor) -> Tensor:
    """uint8 pixels {0, …, 255} to float32 in [-1, 1] (DDPM's ``x / 127.5 - 1``); shape unchanged."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 tensor, got {getattr(images, 'dtype', type(images).__name__)}")
    return images.to(torch.float32) / 127.5 - 1.0


def float_to_pixels(x: Tensor) -> Tensor:
    """Float images in [-1, 1] back to uint8 pixels (clamped, rounded to nearest); the inverse of :func:`pixels_to_float`."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --- CIFAR-10, binary version --------------------------------------------------------------------


def _missing(where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"CIFAR-10 not found: {where}. Nothing is downloaded automatically; fetch the binary version "
        f"(about 163 MB) once with\n    curl -O {CIFAR10_URL}\nthen pass its path (the .tar.gz itself, "
        f"or the extracted '{CIFAR10_FOLDER}' folder) as `path` (--cifar10 on the command line), or set the environment variable "
        f"{CIFAR10_ENV}=/path/to/cifar-10-binary.tar.gz. The python version ({CIFAR10_PYTHON_URL}, "
        f"or torchvision's '{CIFAR10_PYTHON_FOLDER}' folder) is read too."
    )


def _checked_batch(images: np.ndarray, labels: np.ndarray, where: str, records_per_file: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The checks both versions share: the number of records and the label range; images [n, 3, 32, 32]."""
    if records_per_file is not None and len(labels) != records_per_file:
        raise ValueError(f"{where} holds {len(labels)} records, expected {records_per_file}: the file is truncated or not CIFAR-10")
    if int(labels.max()) >= len(CIFAR10_CLASSES):
        raise ValueError(f"{where} has labels up to {int(labels.max())}, but CIFAR-10 labels lie in 0..9: not CIFAR-10 data")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.uint8)


def _parse_records(raw: bytes, where: str, records_per_file: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Split one ``.bin`` file's bytes into images [n, 3, 32, 32] and labels [n] (both uint8)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size == 0 or buf.size % RECORD_BYTES:
        raise ValueError(
            f"{where} has {buf.size} bytes, not a positive multiple of the record size {RECORD_BYTES} "
            "(1 label byte + 3072 pixel bytes): the file is truncated or not CIFAR-10 binary data "
            "(CIFAR-100's records have 2 label bytes)"
        )
    records = buf.reshape(-1, RECORD_BYTES)
    return _checked_batch(records[:, 1:], records[:, 0], where, records_per_file)


# --- CIFAR-10, python version: a restricted unpickler -----------------------------------------------

class _Refused(pickle.UnpicklingError):
    """The stream asks for something a CIFAR-10 batch never holds."""


_NDARRAY = object()  # stands for numpy.ndarray: usable only as _reconstruct's first argument, never called


def _reconstruct_empty(subtype, shape, typecode):
    """numpy's array-pickling entry point, allowed only as a batch uses it: an empty ndarray the stream then fills."""
    if subtype is not _NDARRAY or tuple(shape) != (0,) or typecode not in ("b", b"b"):
        raise _Refused(f"an array reconstruction with unexpected arguments {shape!r}, {typecode!r}")
    return np.empty(0, dtype=np.uint8).view(np.ndarray)


def _uint8_dtype(spec, align=0, copy=1):
    """numpy's dtype constructor, allowed for uint8 only (a copy, as numpy makes it: the stream then sets its state)."""
    if spec not in ("u1", b"u1"):
        raise _Refused(f"an array of dtype {spec!r}; CIFAR-10 batches hold uint8 ('u1') only")
    return np.dtype("u1", bool(align), bool(copy))


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 python batch and nothing else: any import but numpy's array reconstruction, ndarray and
    dtype (below, each replaced by a function that accepts only what a batch passes) is refused before it is made."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,  # written by numpy < 2
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,  # the same, by numpy >= 2
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _uint8_dtype,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"it asks to import {module}.{name}, which a CIFAR-10 batch never does") from None


def _parse_pickle_batch(raw: bytes, where: str, records_per_file: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch (a pickled dict with ``data`` uint8 [n, 3072] and ``labels``) as images [n, 3, 32, 32] and labels [n]."""
    try:
        # latin1 decodes Python 2's byte strings to str, as numpy requires for its arrays' data
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as err:
        raise ValueError(f"{where} was refused: {err}. It is not a CIFAR-10 python batch; download "
                         f"{CIFAR10_URL} (the binary version) instead") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise ValueError(f"{where} is a truncated or corrupt CIFAR-10 python batch ({type(err).__name__}: {err}); "
                         f"download it again") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) == 0:
        raise ValueError(f"{where} has no 'data' array of uint8 [N, 3072]: not a CIFAR-10 python batch")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(v) is int and 0 <= v < 2**31 for v in labels):
        raise ValueError(f"{where} has no 'labels' list of {len(data)} non-negative ints: not a CIFAR-10 python batch")
    return _checked_batch(data, np.asarray(labels, dtype=np.int64), where, records_per_file)


@dataclass(frozen=True)
class _Version:
    """One official version of the data set: its folder, the file of each split, and the parser of a file."""

    folder: str
    suffix: str  # of the batch files
    meta: str  # the class-names file, extracted along with the batches
    parse: Callable[[bytes, str, int | None], tuple[np.ndarray, np.ndarray]]

    def names(self, split: str) -> tuple[str, ...]:
        return tuple(n.removesuffix(".bin") + self.suffix for n in CIFAR10_FILES[split])

    def holds_batches(self, folder: Path) -> bool:
        return any((folder / n).is_file() for split in CIFAR10_FILES for n in self.names(split))


_VERSIONS = (
    _Version(CIFAR10_FOLDER, ".bin", "batches.meta.txt", _parse_records),
    _Version(CIFAR10_PYTHON_FOLDER, "", "batches.meta", _parse_pickle_batch),
)
_ARCHIVES = ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz")


def locate_cifar10(path=None) -> Path:
    """The folder of batches (either version) or the archive that ``path`` (or ``$DDIM_EDU_CIFAR10``) points to;
    FileNotFoundError with the download command if there is none. Nothing is read."""
    if path is None:
        env = os.environ.get(CIFAR10_ENV)
        if not env:
            raise _missing(f"no path was given and the environment variable {CIFAR10_ENV} is not set")
        path = env
    p = Path(path).expanduser()
    if p.is_dir():
        if any(v.holds_batches(p) for v in _VERSIONS):
            return p
        for candidate in [p / v.folder for v in _VERSIONS] + [p / a for a in _ARCHIVES]:
            if candidate.exists():
                return candidate
        raise _missing(f"{p} holds no CIFAR-10 batches, no '{CIFAR10_FOLDER}' or '{CIFAR10_PYTHON_FOLDER}' folder "
                       f"and no {' or '.join(_ARCHIVES)}")
    if p.is_file():
        return p
    raise _missing(f"{p} does not exist")


def _checked_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's name as a safe relative path, or ValueError (absolute, '..', links, devices)."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or "\\" in member.name or not member.name.strip("./"):
        raise ValueError(f"unsafe member name {member.name!r} in {tar.name}: refusing to extract outside the destination")
    if not member.isreg():
        raise ValueError(f"member {member.name!r} in {tar.name} is not a regular file (link or device): refusing it")
    return name


def _open_archive(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:  # EOFError: a gzip stream cut in its header
        raise ValueError(f"{archive} is not a readable tar archive, or is truncated ({err}); expected {CIFAR10_URL}") from err


def _read_chunk(src, archive: Path, size: int = 1 << 20) -> bytes:
    """The next bytes of an archive member; ValueError if the archive ends early or is damaged there."""
    try:
        return src.read(size)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{archive} is a truncated or corrupt archive ({err}); download it again from {CIFAR10_URL}") from err


def _read_archive(archive: Path, split: str, records_per_file: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read one split's batches of either version from the archive into memory, in one pass (nothing is written to disk)."""
    tar = _open_archive(archive)
    wanted = {f"{v.folder}/{name}" for v in _VERSIONS for name in v.names(split)}
    raw: dict[str, bytes] = {}
    with tar:
        try:
            for member in tar:
                key = member.name.removeprefix("./")
                if key in wanted:
                    _checked_member(tar, member)
                    raw[key] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{archive} is a truncated or corrupt archive ({err}); download it again from {CIFAR10_URL}") from err
    for version in _VERSIONS:  # the version whose folder the archive has
        keys = [f"{version.folder}/{name}" for name in version.names(split)]
        if any(k in raw for k in keys):
            missing = [k for k in keys if k not in raw]
            if missing:
                raise ValueError(f"{archive} has no member {missing[0]!r}: not a complete CIFAR-10 archive ({CIFAR10_URL})")
            return [version.parse(raw[k], f"{archive}:{k}", records_per_file) for k in keys]
    raise ValueError(f"{archive} has no member {CIFAR10_FOLDER}/{CIFAR10_FILES[split][0]} (nor its python-version "
                     f"counterpart): not a CIFAR-10 archive ({CIFAR10_URL})")


def load_cifar10(path=None, split: str = "train", *, records_per_file: int | None = 10000) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from an official archive: (images uint8 [N, 3, 32, 32], labels int64 [N]).

    ``path`` is ``cifar-10-binary.tar.gz`` (read in memory, nothing extracted to disk; see
    :func:`extract_cifar10` to unpack once for faster loading), the extracted
    ``cifar-10-batches-bin`` folder, or a folder holding either; ``None`` reads the environment
    variable ``DDIM_EDU_CIFAR10``. The python version (``cifar-10-python.tar.gz`` or its
    ``cifar-10-batches-py`` folder, which torchvision downloads) is read as well, through a
    restricted unpickler (see the module's docstring). ``split`` is ``"train"``
    (``data_batch_1..5[.bin]``, N = 50000) or ``"test"`` (``test_batch[.bin]``, N = 10000). Pixels
    keep the files' CHW order; map them to [-1, 1] with :func:`pixels_to_float`. Each file must
    hold ``records_per_file`` records (10000 in the real data; ``None`` accepts any positive
    number, for small test archives).

    Raises FileNotFoundError (with the download command) if the data is missing, ValueError if
    it is corrupt, truncated, or a pickle that asks for anything a CIFAR-10 batch does not hold.
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be one of {sorted(CIFAR10_FILES)}, got {split!r}")
    if records_per_file is not None and (not isinstance(records_per_file, numbers.Integral) or records_per_file < 1):
        raise ValueError(f"records_per_file must be a positive int or None, got {records_per_file!r}")
    source = locate_cifar10(path)
    if source.is_dir():
        version = next(v for v in _VERSIONS if v.holds_batches(source))
        names = version.names(split)
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise _missing(f"{source} lacks {', '.join(missing)} (an incomplete extraction?)")
        parts = [version.parse((source / n).read_bytes(), str(source / n), records_per_file) for n in names]
    else:
        parts = _read_archive(source, split, records_per_file)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    return images, labels


def extract_cifar10(archive, dest) -> Path:
    """Unpack the batches and the class-names file of an archive into ``dest``; returns the folder written.

    For the binary archive that is ``dest/cifar-10-batches-bin`` (the ``.bin`` files and
    ``batches.meta.txt``), for the python archive ``dest/cifar-10-batches-py``. Only regular-file
    members of that folder are written; a member with an
    absolute name, a ``..`` component or a link raises ValueError before anything is written, so
    a malicious archive cannot write outside ``dest``. Files are written to a temporary name and
    renamed, so an interrupted extraction leaves no truncated ``.bin`` file behind.
    """
    archive, dest = Path(archive).expanduser(), Path(dest).expanduser()
    if not archive.is_file():
        raise _missing(f"{archive} does not exist")
    tar = _open_archive(archive)
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{archive} is a truncated or corrupt archive ({err}); download it again from {CIFAR10_URL}") from err
        files = [m for m in members if not m.isdir()]
        names = [_checked_member(tar, m) for m in files]  # check every member first
        for version in _VERSIONS:
            keep = {*version.names("train"), *version.names("test"), version.meta}
            wanted = [(m, n) for m, n in zip(files, names) if len(n.parts) == 2 and n.parts[0] == version.folder and n.name in keep]
            if wanted:
                break
        else:
            raise ValueError(f"{archive} has no '{CIFAR10_FOLDER}/*.bin' (or '{CIFAR10_PYTHON_FOLDER}/*') members: "
                             f"not a CIFAR-10 archive ({CIFAR10_URL})")
        out_dir = dest / version.folder
        out_dir.mkdir(parents=True, exist_ok=True)
        for member, name in wanted:
            target = out_dir / name.name
            tmp = target.with_name(f".{name.name}.part")
            try:
                with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                    while chunk := _read_chunk(src, archive):
                        dst.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return out_dir


# --- handwritten digits: real images that ship with scikit-learn ----------------------------------------

DIGITS_SPLITS = ("train", "heldout", "all")
DIGITS_HELDOUT_EVERY = 5  # of each class, in the data set's order, every 5th image is held out (20 %)


def load_digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits as (images float32 [N, 1, 8, 8] in [-1, 1], labels int64 [N]).

    The data are the 1,797 8×8 grayscale scans of the UCI ML repository's optical recognition
    data set (Alpaydin & Kaynak, 1998), bundled inside the scikit-learn wheel, so nothing is
    downloaded. Their intensities are the integers 0..16 (a 4×4-pixel count of each block of the
    original 32×32 bitmaps); they map linearly to [-1, 1] as ``x / 8 - 1`` at the native 8×8: no
    resizing, which would invent pixels that a metric could then reward.

    ``split``: ``"train"`` (1,442 images), ``"heldout"`` (355) or ``"all"``. The split is fixed and
    uses no random numbers: of each class, in the data set's order, every
    ``DIGITS_HELDOUT_EVERY``-th image is held out, so both parts have the classes' proportions.
    Needs scikit-learn (``pip install scikit-learn``, or the ``digits`` extra).
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}, got {split!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError('the digits need scikit-learn, which ships them: pip install scikit-learn '
                          '(or pip install -e ".[digits]")') from err
    bunch = sklearn_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    if images.shape != (1797, 1, 8, 8) or float(images.min()) < 0 or float(images.max()) > 16:
        raise ValueError(f"scikit-learn's digits are not the expected 1,797 images of 8×8 intensities 0..16, got "
                         f"{tuple(images.shape)} in [{float(images.min())}, {float(images.max())}]")
    rank = torch.zeros_like(labels)  # the position of each image among those of its class
    for k in range(10):
        members = torch.nonzero(labels == k).flatten()
        rank[members] = torch.arange(len(members))
    heldout = rank % DIGITS_HELDOUT_EVERY == DIGITS_HELDOUT_EVERY - 1
    keep = {"train": ~heldout, "heldout": heldout, "all": torch.ones_like(heldout)}[split]
    return images[keep] / 8 - 1, labels[keep]


# --- a small set of real images that works offline -------------------------------------------------


def make_offline_photo(path=None) -> np.ndarray:
    """Rebuild the frozen photo from matplotlib's bundled ``grace_hopper.jpg`` (600×512 RGB).

    The photo is halved by averaging 2×2 blocks (rounding to nearest) to uint8 [3, 300, 256].
    With ``path`` it is also written there as a compressed ``.npz`` (key ``photo``), which is how
    ``toy_data/grace_hopper_half.npz`` was made. Reading the JPEG needs Pillow, a dependency of
    matplotlib; a different JPEG decoder may change a few pixel values by one or two levels.
    """
    import matplotlib.cbook
    import matplotlib.pyplot as plt

    rgb = np.asarray(plt.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    if rgb.dtype != np.uint8 or rgb.shape != (600, 512, 3):
        raise ValueError(f"unexpected grace_hopper.jpg: {rgb.shape} {rgb.dtype}, expected (600, 512, 3) uint8")
    half = rgb.reshape(300, 2, 256, 2, 3).astype(np.float64).mean(axis=(1, 3))
    photo = np.floor(half + 0.5).astype(np.uint8).transpose(2, 0, 1).copy()  # [3, 300, 256]
    if path is not None:
        np.savez_compressed(path, photo=photo)
    return photo


def load_offline_photo() -> Tensor:
    """The frozen photo ``toy_data/grace_hopper_half.npz`` as a uint8 tensor [3, 300, 256].

    The file ships inside the package and is found with :func:`~ddim_edu.utils.package_data.package_file`.
    """
    path = package_file(OFFLINE_PHOTO_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; in a checkout of the repository rebuild it (from matplotlib's bundled sample photo, "
            f"offline) from the repository root with\n"
            f"    python -c \"from ddim_edu.image.data import make_offline_photo; make_offline_photo('toy_data/{OFFLINE_PHOTO_FILE}')\"\n"
            "(a wheel ships the file: reinstall ddim-edu)"
        )
    with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
        photo = npz["photo"]
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[0] != 3:
        raise ValueError(f"{path} must hold a uint8 array [3, H, W] named 'photo', got {photo.shape} {photo.dtype}")
    return torch.from_numpy(photo)


def load_offline_images(size: int = 16, n: int = 512, seed: int = 0) -> Tensor:
    """``n`` random ``size``×``size`` RGB patches of the frozen photo, float32 [n, 3, size, size] in [-1, 1].

    Patch corners are drawn uniformly (with replacement) from a ``torch.Generator`` seeded with
    ``seed``, so the set is the same on every machine. The photo (300×256, see
    :func:`load_offline_photo`) has a flag, a dark uniform, a face and a plain background, so small
    patches hold edges, textures and flat regions: real-image statistics for a CPU-sized model.
    """
    for name, value in (("size", size), ("n", n)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    photo = load_offline_photo()
    _, H, W = photo.shape
    if size > min(H, W):
        raise ValueError(f"size must be at most {min(H, W)} (the photo is {H}×{W}), got {size}")
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, H - size + 1, (n,), generator=g)
    left = torch.randint(0, W - size + 1, (n,), generator=g)
    rows = top[:, None] + torch.arange(size)  # [n, size]
    cols = left[:, None] + torch.arange(size)
    patches = photo[:, rows[:, :, None], cols[:, None, :]]  # [3, n, size, size]
    return pixels_to_float(patches.permute(1, 0, 2, 3).contiguous())
