"""SIGTERM handled as Ctrl-C, so that long work stopped by a job scheduler or torchrun saves what it has; and
interrupts held back while a training step commits its update, so that a save never sees half a step."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupts", "catch_interrupts", "sigterm_as_keyboard_interrupt"]


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt (the path that saves and says how to resume); the
    previous handler is restored on exit. Outside the main thread, where handlers cannot be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupts:
    """What :func:`catch_interrupts` yields: ``with interrupts.held():`` delays SIGINT and SIGTERM to the block's end.

    A signal that arrives inside the block is remembered and raised as KeyboardInterrupt when the
    block has run to its end (``raise_at_end=False``: dropped, for work done while an interrupt is
    already being handled); one that arrives outside it raises at once, as usual. ``pending`` is
    the signal number waiting to be raised, if any.
    """

    def __init__(self):
        self.holding = False
        self.pending: int | None = None

    def _handler(self, signum, frame):
        if self.holding:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def held(self, raise_at_end: bool = True) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if not raise_at_end:
                self.pending = None
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(f"signal {signum}, raised once the block had finished")


@contextlib.contextmanager
def catch_interrupts() -> Iterator[Interrupts]:
    """SIGTERM and SIGINT raise KeyboardInterrupt inside the block, except inside the yielded object's ``held()``.

    SIGINT is taken over only while it has Python's default handler (a handler of the caller's, or an
    ignored SIGINT, is left alone); the previous handlers come back on exit. Outside the main thread,
    where handlers cannot be set, ``held()`` holds nothing back.
    """
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupts._handler)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupts._handler)
    try:
        yield interrupts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
