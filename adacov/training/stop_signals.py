"""SIGTERM / SIGINT as a request to stop at the next step boundary, so the loop can checkpoint first.

A Slurm preemption or a ``kill`` is a SIGTERM, Ctrl-C a SIGINT. The handler only records the signal;
the loop checks it after each logged step, writes a checkpoint, flushes its files and stops. A second
signal gets Python's default behaviour back, so a stuck run can still be killed.

Under torchrun the second signal is ignored instead. Its agent forwards the SIGTERM or SIGINT that it
gets to its workers (each in a session of its own), so a signal sent to every process of the job, as
Slurm sends it on preemption or scancel, reaches each worker twice, and the repeat would kill it
before its checkpoint. The agent's SIGKILL after its shutdown timeout (30 s) stays the hard stop.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def under_torchrun() -> bool:
    """True in a worker that a torchrun (elastic) agent started: the agent sets TORCHELASTIC_RUN_ID."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopSignals:
    """Context manager that records SIGTERM / SIGINT in ``received`` instead of dying at once.

    Args:
        repeat_kills: whether a second signal kills the process (default: yes, unless under torchrun).

    Handlers can only be installed from the main thread; elsewhere (a launcher's worker thread) the
    process keeps its own handlers and ``received`` stays ``None``.
    """

    def __init__(self, repeat_kills: bool | None = None) -> None:
        self.received: int | None = None
        self.repeat_kills = not under_torchrun() if repeat_kills is None else repeat_kills
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.repeat_kills:
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
