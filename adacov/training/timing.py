"""Per-step wall time: perf_counter on CPU, CUDA events on GPU (no host sync inside the loop)."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Brackets each training step; ``collect()`` returns the seconds of the steps since the last call.

    On CUDA each step records two events and ``collect()`` synchronizes once on the last of them,
    so the training loop itself never waits for the GPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self._pending.append(time.perf_counter() - self._start)

    def collect(self) -> list[float]:
        pending, self._pending = self._pending, []
        if self.cuda and pending:
            pending[-1][1].synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in pending]
        return pending
