"""Intra-op threads for small work: one thread, unless the user has chosen a number.

torch parallelises each operation over all cores by default. For small tensors (a toy MLP, a UNet of a
million parameters on a CPU) that buys little on idle cores and costs a great deal on busy ones: with
one of two cores taken by another process, two threads ran the demo's MLP at 8–9 steps/s instead of
120–180 with one, and a 1M-parameter UNet at 0.1–0.4 steps/s instead of 3–4 (each thread waits for
the slowest at every operation). So the trainer and the demo use one thread for such work, for the
duration of the call, unless the user has said otherwise: with ``OMP_NUM_THREADS`` (or
``MKL_NUM_THREADS``) in the environment, or with ``torch.set_num_threads``. A call of
``torch.set_num_threads`` is recognised when it changed the count from torch's default (the count
when this module was first imported, with :mod:`ddim_edu.training` or the demo, and on Linux the
number of physical cores); to run with torch's default count itself, pass it explicitly (``threads=``
of the trainer, ``--threads`` of the demo).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["SMALL_WORK_PARAMETERS", "choose_threads", "intra_op_threads", "threads_chosen_by_user"]

# Models with fewer parameters than this train on one thread on a CPU unless the user chose a number.
# The measurements in the module docstring (MLP 0.17M, UNets of 1.0M and 4.4M parameters) all ran
# faster on one thread with a core busy; larger models are left to torch's default.
SMALL_WORK_PARAMETERS = 5_000_000

_THREADS_AT_IMPORT = torch.get_num_threads()


def _physical_cores() -> int | None:
    """The number of physical cores among the online CPUs (torch's default thread count), or None if unknown."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        try:
            if (cpu / "online").is_file() and (cpu / "online").read_text().strip() == "0":
                continue
            topology = cpu / "topology"
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def threads_chosen_by_user() -> bool:
    """Whether the user has set the intra-op thread count (environment variable or ``torch.set_num_threads``)."""
    if any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return True
    now = torch.get_num_threads()
    cores = _physical_cores()
    return now != _THREADS_AT_IMPORT or (cores is not None and now != cores)


def choose_threads(threads: int | None, small: bool) -> int | None:
    """The thread count to run with: ``threads`` if given; else 1 for ``small`` work unless the user chose a
    count; None (leave torch's setting alone) otherwise."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        return threads
    if small and not threads_chosen_by_user():
        return 1
    return None


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, the previous count restored on exit; None changes nothing."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
