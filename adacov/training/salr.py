"""SALR, sharpness-aware learning rates (Yue, Nouiehed & Kontar), around any optimizer.

Every ``every``-th step, before the step's own forward and backward, the loop measures the sharpness
``S_k`` of the loss on the step's batch (``sharpness.salr_sharpness``) and sets every param group's lr to

    lr_k = lr0 * clip(S_k / median(S_1, ..., S_k), 0, cap)

where ``lr0`` is the group's lr when SALR started and the median is the usual one (the mean of the two
middle values for an even count). The lr then stays until the next measurement, so the first step runs
at ``lr0``. Two guards the paper does not need: a negative ratio (the probes found no sharpness on a
noisy batch) gives lr 0 rather than an ascent, and while the median is not positive the lr stays
``lr0``; an estimate that is not finite is not recorded. SALR only writes ``param_groups[i]["lr"]``, as
torch's lr schedulers do, and never reads or writes an optimizer's state.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from adacov.errors import UserError
from adacov.training.sharpness import DIRECTIONS

SALR_LOG = "salr.csv"
# The float settings: (key, what is allowed, test). cap >= 1 lets the first measurement keep lr0.
NUMBER_BOUNDS = (
    ("step_size", "> 0", lambda v: v > 0),
    ("clamp", "> 0", lambda v: v > 0),
    ("cap", ">= 1", lambda v: v >= 1),
)


@dataclass(frozen=True)
class SALRSettings:
    """The ``salr`` config block: measure every ``every`` steps with ``steps_descent`` / ``steps_ascent``
    probe steps of ``step_size`` along the ``direction`` (``clamped`` at ``clamp``, or ``per_sample``);
    the lr is at most ``cap * lr0``. Defaults: the authors' code (every 2nd step, 5 + 5 steps of 1e-3)."""

    every: int = 2
    steps_descent: int = 5
    steps_ascent: int = 5
    step_size: float = 1e-3
    direction: str = "clamped"
    clamp: float = 1.0
    cap: float = 5.0

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> SALRSettings:
        """The settings of the config block ``node`` (its ``enabled`` key aside); a UserError names a bad one."""
        for key in ("every", "steps_descent", "steps_ascent"):
            value = node[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"salr.{key}={value!r} is not allowed: use an integer >= 1")
        for key, bound, holds in NUMBER_BOUNDS:
            value = node[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not holds(value):
                raise UserError(f"salr.{key}={value!r} is not allowed: use a finite number {bound}")
        if node["direction"] not in DIRECTIONS:
            raise UserError(f"salr.direction={node['direction']!r} is not allowed: use one of {', '.join(DIRECTIONS)}")
        return cls(**{key: node[key] for key in cls.__dataclass_fields__})


def salr_factor(history: list[float], cap: float) -> float:
    """``clip(S_k / median(S_1..S_k), 0, cap)`` for ``history = [S_1, ..., S_k]``; 1 while the median is not positive."""
    median = statistics.median(history)
    if median <= 0:
        return 1.0
    return min(max(history[-1] / median, 0.0), cap)


class SALR:
    """The sharpness history of a run and the lr it sets; ``state_dict`` goes into the run's checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, settings: SALRSettings) -> None:
        self.optimizer, self.settings = optimizer, settings
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps: list[int] = []
        self.sharpness: list[float] = []
        self.factors: list[float] = []

    def due(self, step: int) -> bool:
        """Whether the 1-based ``step`` measures: steps 1, 1 + every, 1 + 2 every, ..."""
        return (step - 1) % self.settings.every == 0

    def observe(self, step: int, sharpness: float) -> None:
        """Record ``S_k`` measured at ``step`` and set every group's lr from it."""
        if not math.isfinite(sharpness):
            return
        self.sharpness.append(sharpness)
        factor = salr_factor(self.sharpness, self.settings.cap)
        self.steps.append(step)
        self.factors.append(factor)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, list]:
        return {"step": list(self.steps), "sharpness": list(self.sharpness), "factor": list(self.factors)}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        self.steps, self.sharpness, self.factors = list(state["step"]), list(state["sharpness"]), list(state["factor"])

    def write_log(self, path: Path) -> None:
        """Write ``step,sharpness,lr_factor`` (one row per measurement) to ``path``, replacing it whole."""
        table = pd.DataFrame({"step": self.steps, "sharpness": self.sharpness, "lr_factor": self.factors})
        tmp = path.with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
