"""What every optimizer here shares with torch.optim's conventions.

- ``lr`` may be a float or a 0-d / 1-element tensor (LR schedulers fill a tensor lr in place); the math reads
  it as a float each step (:func:`lr_value`).
- ``maximize=True`` descends ``-grad`` (:func:`step_grad`), so it equals minimizing the negated loss.
- Step counters are 0-d CPU tensors in the parameter's dtype (:func:`new_counter`); a counter saved as a plain
  number (older torch, some tools) becomes one again on loading.
- Buffers that are not state (workspaces, caches, flags) are built in :meth:`BaseOptimizer._init_buffers`, which
  runs after construction and after every ``__setstate__``: ``copy.deepcopy``, ``pickle`` and
  ``load_state_dict`` (torch copies only ``defaults``, ``state`` and ``param_groups``).
- A param group missing a hyperparameter (saved before it existed) takes the constructor's default.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BaseOptimizer", "STEP", "lr_value", "new_counter", "step_grad", "block_grads"]

STEP = "step"


def new_counter(p: Tensor) -> Tensor:
    """A step counter at 0: a 0-d tensor of ``p``'s dtype on the CPU, read without a device sync."""
    return torch.tensor(0.0, dtype=p.dtype)


def lr_value(group: dict[str, Any]) -> float:
    """The group's learning rate as a float (a tensor lr holds one element: the group was validated)."""
    lr = group["lr"]
    return lr.item() if isinstance(lr, Tensor) else float(lr)


def step_grad(p: Tensor, group: dict[str, Any]) -> Tensor:
    """The gradient a step descends: ``p.grad``, or ``-p.grad`` when the group maximizes."""
    return -p.grad if group["maximize"] else p.grad


def block_grads(optimizer: str, group: dict[str, Any], builder: str) -> list[Tensor] | None:
    """The step gradients of a group whose tensors form one block (a layer's weight and bias), or None if
    none of them has a gradient; a block with some gradients missing cannot be stepped and is a ValueError."""
    have = [p.grad is not None for p in group["params"]]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(
            f"Invalid gradients: {optimizer} steps a layer's weight and bias as one block, and only some of them "
            f"have a gradient; freeze the whole layer, or build the groups with {builder}(model) after freezing"
        )
    return [step_grad(p, group) for p in group["params"]]


class BaseOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with the conventions above; subclasses validate groups in ``_prepare_group``
    and name their counter state keys in ``counters``."""

    counters: tuple[str, ...] = (STEP,)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._init_buffers()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._prepare_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Validate (and complete) a group after torch has filled in the defaults and split off any names."""
        raise NotImplementedError

    def _init_buffers(self) -> None:
        """Build the buffers that are not optimizer state (none here)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":  # torch's __setstate__ adds it to the defaults, not a setting of ours
                    group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p)
                for key in self.counters if p_state else ():
                    if key in p_state:
                        p_state[key] = torch.tensor(float(p_state[key]), dtype=p.dtype)
        self._init_buffers()
