"""Writing files atomically, so that a crash or Ctrl-C never leaves a torn checkpoint or sample shard, and reading
torch files without unpickling anything but tensors."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_write", "load_weights_only", "save_json_atomic", "save_npz_atomic"]


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file object; on success its bytes replace ``path`` in one step.

    The data goes to a temporary file in ``path``'s folder, is flushed and fsync'ed, and is renamed
    over ``path`` with ``os.replace``; the folder is then fsync'ed so the rename itself is durable
    (POSIX). If anything fails before the rename, ``path`` keeps its previous content and the
    temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not possible on every platform (e.g. Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_weights_only(path):
    """``torch.load(path, map_location="cpu", weights_only=True)``, or ValueError with the reason in plain words.

    torch's own message for a refused file advises ``weights_only=False``, which would run whatever
    the file pickles; here the reason is given instead: the class it pickles, or a damaged file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.findall(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise ValueError(f"{path} pickles {refused[0]}, not only tensors and plain containers; it is not "
                             "unpickled here, since unpickling can run code. Save state_dict()s instead") from None
        raise ValueError(f"{path} cannot be read: it is truncated or corrupt, or not a torch file") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as e:  # what damaged bytes raise in torch.load
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0]) if str(e) else "it ends early"
        raise ValueError(f"{path} cannot be read: it is truncated or corrupt ({type(e).__name__}: {reason})") from None


def save_npz_atomic(path, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) to ``path`` atomically: a crash or Ctrl-C never leaves a torn file."""
    path = Path(path)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def save_json_atomic(path, obj: dict) -> Path:
    """A JSON object written atomically, one key per line (long lists such as the timesteps stay on their line)."""
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"
    path = Path(path)
    with atomic_write(path) as f:
        f.write(text.encode())
    return path
