"""Training steps whose losses and times wait on the device until they are logged together."""

from __future__ import annotations

import torch
from tqdm import tqdm

from adacov.training.distributed import Replicas
from adacov.training.run_logger import RunLogger
from adacov.training.timing import StepTimer


class StepBuffer:
    """Steps whose losses and times are still on the device, moved to the host together.

    On GPU that is one host sync per ``log_every`` steps; under DDP one all-reduce turns each rank's
    loss into the global batch's mean and tells every rank whether any of them received a signal.
    """

    def __init__(
        self, replicas: Replicas, device: torch.device, logger: RunLogger | None, bar: tqdm, steps_per_epoch: int
    ) -> None:
        self.replicas, self.device, self.logger, self.bar = replicas, device, logger, bar
        self.timer = StepTimer(device)
        self.steps_per_epoch = steps_per_epoch
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def reduce(self, stop_requested: bool) -> tuple[list[float], bool]:
        """The buffered steps' global-batch losses, and whether any rank asked to stop."""
        flag = torch.tensor([float(stop_requested)], dtype=torch.float64, device=self.device)
        values = self.replicas.sum(torch.cat([*(loss.double().reshape(1) for loss in self.losses), flag])).tolist()
        return [v / self.replicas.world_size for v in values[:-1]], values[-1] > 0

    def log(self, losses: list[float]) -> None:
        """Log the first ``len(losses)`` buffered steps and drop the whole buffer."""
        rows = [
            {"step": s, "epoch": round(s / self.steps_per_epoch, 6), "loss": loss, "step_time_s": t}
            for s, loss, t in zip(self.steps, losses, self.timer.collect())
        ]
        if self.logger is not None and rows:
            self.logger.log_steps(rows)
        self.bar.update(len(self.steps))
        if losses:
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.steps.clear()
        self.losses.clear()
