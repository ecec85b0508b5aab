"""Writing files atomically, so that a crash or Ctrl-C never leaves a torn checkpoint or sample shard; locking a
folder against a second writer; and reading torch files without unpickling anything but tensors."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["FolderInUse", "atomic_write", "folder_lock", "load_weights_only", "remove_stale_temporaries",
           "save_json_atomic", "save_npz_atomic"]


@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file object; on success its bytes replace ``path`` in one step.

    The data goes to a temporary file in ``path``'s folder, is flushed and fsync'ed, and is renamed
    over ``path`` with ``os.replace``; the folder is then fsync'ed so the rename itself is durable
    (POSIX). If anything fails before the rename, ``path`` keeps its previous content and the
    temporary file is removed. An OS error of the write (a full disk, a read-only folder) is raised
    naming ``path``, not the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) if e.errno is not None else e
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            raise _naming(e, path)
        raise
    with contextlib.suppress(OSError):  # not possible on every platform (e.g. Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` (a system error, with an errno) with ``path`` as the file it names (a write to a file descriptor
    names none, a failed mkstemp or rename names the temporary file)."""
    error.filename, error.filename2 = str(path), None
    return error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` when its process was killed
    (SIGKILL, power loss) between creating and renaming them; returns them. Call it only while holding
    :func:`folder_lock`, so that no other writer's file in progress is taken for a stale one."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        with os.scandir(folder) as entries:
            for entry in entries:
                if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


# --- one writer per folder ----------------------------------------------------------------------------


class FolderInUse(RuntimeError):
    """Another process holds the lock of a folder (see :func:`folder_lock`)."""


@contextlib.contextmanager
def folder_lock(folder, name: str = ".lock"):
    """Hold an exclusive lock on ``folder`` for the block: ``fcntl.flock`` on the file ``folder/name``, never waiting.

    While one process holds it, any other that asks for it (even the same process through a second
    ``folder_lock``) gets :class:`FolderInUse` at once, naming the holder's process id. The
    operating system drops a flock lock when its process ends in any way (Ctrl-C, SIGTERM, SIGKILL,
    a crash), so a lock left by a dead run never blocks the next one. The lock file is removed on
    leaving the block; after SIGKILL it stays behind and the next run reuses it. Where ``fcntl``
    does not exist (Windows), or the file system refuses flock (some network file systems), no lock
    is taken and a warning says so: two runs into one folder must then be avoided by hand.
    """
    path = Path(folder) / name
    try:
        import fcntl
    except ImportError:
        warnings.warn(f"{folder} is not locked against a second writer: this platform has no fcntl.flock", stacklevel=3)
        yield None
        return
    fd = None
    for _ in range(100):  # retried only while a holder that is finishing removes the file under us
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise FolderInUse(f"{folder} is in use: {who} is writing into it (it holds {path}); wait for it to "
                                  "finish, or choose another folder") from None
            warnings.warn(f"{folder} is not locked against a second writer: the file system refuses flock "
                          f"({os.strerror(e.errno) if e.errno else e})", stacklevel=3)
            fd = None
            break
        try:  # a holder removes the file while it still holds the lock: a lock on a removed file locks nothing
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            break
        os.close(fd)
        fd = None
    else:
        raise FolderInUse(f"{folder} is in use: its lock file {path} keeps being replaced by other processes")
    try:
        yield path if fd is not None else None
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # before the lock is released: see the samestat check above
            os.close(fd)


# --- reading torch files -------------------------------------------------------------------------------

_PLAIN_MODULES = ("torch", "collections", "_codecs", "builtins")  # what weights_only unpickling allows (roughly)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_imports(data: bytes) -> list[str]:
    """The ``module.name`` globals a pickle stream would import, read with pickletools (nothing is unpickled)."""
    imports, strings, memo, last = [], [], {}, None
    with contextlib.suppress(Exception):  # a damaged stream: what was read so far
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                imports.append(".".join(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                imports.append(f"{strings[-2]}.{strings[-1]}")
            if op.name in _STRING_OPS:
                last = arg.decode("latin1") if isinstance(arg, bytes) else arg
                strings.append(last)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = last
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                last = memo.get(arg)
                if isinstance(last, str):
                    strings.append(last)
            else:
                last = None
    return imports


def _foreign_import(path: Path) -> str | None:
    """The first import of ``path``'s pickle (a torch zip's data.pkl, or the file itself) outside torch and plain containers."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    return next((name for name in _pickle_imports(data) if name.split(".")[0] not in _PLAIN_MODULES), None)


_UNREADABLE = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def load_weights_only(path):
    """``torch.load(path, map_location="cpu", weights_only=True)``, or ValueError with the reason in plain words.

    torch's own message for a refused file advises ``weights_only=False``, which would run whatever
    the file pickles; here the reason is given instead: a file that cannot be read (and the
    system's reason, e.g. permission denied), the import its pickle would make (refused before it
    is made), or a damaged file or one that is not a torch file.
    """
    path = Path(path)
    corrupt = f"{path} cannot be read: it is truncated or corrupt, or not a torch file"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or an older torch's pickle
            raise ValueError(f"{corrupt} (it starts with {head!r}, not a zip archive or a pickle)")
        with warnings.catch_warnings():  # torch warns of pickle protocols it may not read, then says why it did not
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.findall(r"GLOBAL ([\w.]+)", str(e)) or [name for name in [_foreign_import(path)] if name]
        if refused:
            raise ValueError(f"{path} was refused because unpickling it would import {refused[0]}: it pickles {refused[0]}, "
                             "not only tensors and plain containers, and unpickling can run code. Save state_dict()s instead") from None
        raise ValueError(corrupt) from None
    except OSError as e:
        if isinstance(e, _UNREADABLE) or e.errno == errno.EIO:  # the system's refusal, not damaged bytes
            raise ValueError(f"{path} cannot be read: {e.strerror or e} ({type(e).__name__})") from None
        raise ValueError(f"{path} cannot be read: it is truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None
    except ValueError as e:
        if str(e).startswith(corrupt):  # the check of the first bytes above
            raise ValueError(str(e)) from None
        raise ValueError(f"{path} cannot be read: it is truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None
    except (RuntimeError, EOFError, IndexError, KeyError) as e:  # what damaged bytes raise in torch.load
        raise ValueError(f"{path} cannot be read: it is truncated or corrupt ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error).splitlines()[0]) if str(error) else "it ends early"


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
