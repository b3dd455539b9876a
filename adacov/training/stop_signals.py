"""SIGTERM / SIGINT as a request to stop at the next step boundary, so the loop can checkpoint first.

A Slurm preemption or a ``kill`` is a SIGTERM, Ctrl-C a SIGINT. The handler only records the signal;
the loop checks it after each logged step, writes a checkpoint, flushes its files and stops. A second
signal gets Python's default behaviour back, so a stuck run can still be killed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that records SIGTERM / SIGINT in ``received`` instead of dying at once.

    Handlers can only be installed from the main thread; elsewhere (a launcher's worker thread) the
    process keeps its own handlers and ``received`` stays ``None``.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
