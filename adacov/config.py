"""The OmegaConf resolvers the configs use, registered before Hydra composes a config."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def item(container: DictConfig | ListConfig, key: Any) -> Any:
    """``${item:${a.list},${i}}`` is ``a.list[i]``; ``${item:${a.map},${k}}`` is ``a.map[k]``, integer keys included.

    Hand-written because OmegaConf's nested interpolation must produce a string key
    (``${a.list.${i}}`` fails for an integer ``i``), and the experiments pick by a trial index
    (``experiment=tune``) and by ``model.kernel_size`` (the tuned learning rates).
    """
    if isinstance(container, ListConfig):
        if not 0 <= int(key) < len(container):
            raise KeyError(f"index {key} is outside the {len(container)} values {list(container)}")
        return container[int(key)]
    if key not in container:
        raise KeyError(f"{key} is not among {', '.join(str(k) for k in container)}")
    return container[key]


def half_decades(base: float, steps: int) -> float:
    """The point ``steps`` half-decades from ``base`` on the tuning grids' ladder ..., 1e-4, 3e-4, 1e-3, 3e-3, ...

    ``${half_decades:3.0e-3,-1}`` is 1e-3 and ``${half_decades:3.0e-3,1}`` is 1e-2: the Fashion-MNIST sweep's
    grid around each optimizer's digits-tuned lr.
    """
    if float(base) <= 0:
        raise ValueError(f"half_decades needs a positive learning rate, got {base}")
    exponent = round(2 * math.log10(float(base))) + int(steps)
    return float(f"{1 if exponent % 2 == 0 else 3}e{exponent // 2}")


def tuned_lr(table: str, optimizer: str, kernel_size: int) -> float:
    """The best lr for ``optimizer`` at ``kernel_size`` in ``table``, the best_lr.csv that tune_report.py writes.

    Hand-written so that a comparison reads its learning rates from the sweep's report instead of from
    numbers copied into configs.
    """
    path = Path(table)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run the tuning sweep first (make tune DATA=fashion_mnist)")
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["optimizer"] == optimizer and int(row["k"]) == int(kernel_size):
                if not math.isfinite(float(row["best_lr"])):
                    raise ValueError(f"{path}: every lr of {optimizer} at {kernel_size}x{kernel_size} diverged")
                return float(row["best_lr"])
    raise ValueError(f"{path} has no tuned lr for {optimizer} at {kernel_size}x{kernel_size}: add it to the tuning sweep")


RESOLVERS = {"item": item, "half_decades": half_decades, "tuned_lr": tuned_lr}


def register_resolvers() -> None:
    """Register the resolvers above once per process."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
