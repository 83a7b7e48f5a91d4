"""What a training process sets up around the trainer: the allocator and the stop signals."""

from __future__ import annotations

import contextlib
import ctypes
import signal
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any, ClassVar

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the kernel after every step.

    Training frees and reallocates the same large activation buffers every step; by default glibc
    serves them with mmap and unmaps them on free, so each step pays page faults again. The setting is
    process-wide and irreversible, so the command line makes it, not the library. Returns whether it
    took (False off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM that stopped the work at once: outside a step (``between_steps``: the state is
    whole, during validation or the test), or a second signal within a step."""

    def __init__(self, signum: int, between_steps: bool = True) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.between_steps = between_steps


class StopSignals:
    """SIGINT and SIGTERM within ``with``: the first within a step (``in_step``) is kept in ``pending``,
    for the step's end to act on; one outside a step, or a second, raises :class:`Interrupted`. The
    previous handlers come back on leaving."""

    active: ClassVar[StopSignals | None] = None  # the one whose handlers are installed

    def __init__(self) -> None:
        self.pending: int | None = None
        self.in_step = False
        self._previous: dict[int, Any] = {}
        self._outer: StopSignals | None = None

    def __enter__(self) -> StopSignals:
        self.pending, self.in_step = None, False
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._outer, StopSignals.active = StopSignals.active, self
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.in_step = False
        StopSignals.active = self._outer  # a trainer's inside the command's: the command's again
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None or not self.in_step:
            raise Interrupted(signum, between_steps=not self.in_step)
        self.pending = signum


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold a first stop signal until the ``with`` ends (one evaluation episode), then stop the work
    with :class:`Interrupted`. An exception raised from a signal handler inside a ``torch.func`` transform
    can leave functorch's interpreter stack corrupt (an internal assert instead of a clean stop). Within
    a training step, whose end acts on the signal, or with no :class:`StopSignals` active, it does
    nothing."""
    stop = StopSignals.active
    if stop is None or stop.in_step:
        yield
        return
    held, stop.pending, stop.in_step = stop.pending, None, True  # a step's signal, already acted on
    try:
        yield
    finally:
        stop.in_step = False
        signum, stop.pending = stop.pending, stop.pending or held
    if signum is not None:
        raise Interrupted(signum)
