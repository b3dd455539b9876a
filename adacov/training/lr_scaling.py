"""The learning rate as a function of the batch size (Granziol, Zohren & Roberts 2022).

From a reference ``(lr0, B0)``, the lr that the same run should use at batch ``B``:

- ``linear``: ``lr = lr0 * B / B0``, SGD's rule (its noise scale is ``lr / B``);
- ``sqrt``: ``lr = lr0 * sqrt(B / B0)``, the rule the paper derives for adaptive methods whose step is
  divided by the square root of a second-moment estimate. AdaCov is one of them: its step is Adam's with
  the diagonal ``sqrt(v_hat)`` replaced, inside each kernel, by ``C_hat^(1/2)`` of the same gradients'
  second moments, normalized the same way (both are invariant to rescaling the gradient);
- ``auto``: ``linear`` for SGD and ``sqrt`` for the Adam family (``AUTO_RULES``); every other optimizer
  is refused, since the paper gives no rule for second-order methods (only that their damping should
  grow as ``lr / B``);
- ``none``: the configured lr, unchanged.

Every param group's lr is multiplied by the same factor, so ratios between groups stay as configured.
"""

from __future__ import annotations

import math

import torch

from adacov.errors import UserError
from adacov.optim import AdaCov, EAdam

LR_SCALINGS = ("none", "linear", "sqrt", "auto")
# (optimizer class, rule) for lr_scaling=auto; subclasses follow their base (torch's AdamW and SOAP are Adams).
AUTO_RULES: tuple[tuple[type, str], ...] = (
    (torch.optim.SGD, "linear"),
    (torch.optim.Adam, "sqrt"),
    (AdaCov, "sqrt"),
    (EAdam, "sqrt"),
)


def resolve_rule(name: str, optimizer: torch.optim.Optimizer, optimizer_name: str) -> str:
    """``name``, with ``auto`` replaced by the rule of ``optimizer``'s family; a UserError where it has none."""
    if name != "auto":
        return name
    rule = next((r for cls, r in AUTO_RULES if isinstance(optimizer, cls)), None)
    if rule is None:
        raise UserError(
            f"lr_scaling=auto has no rule for optimizer={optimizer_name} ({type(optimizer).__name__}): it knows SGD "
            "(linear) and the Adam family (sqrt); set lr_scaling=linear, sqrt or none"
        )
    return rule


def lr_factor(rule: str, batch_size: int, reference_batch: int) -> float:
    """``B / B0`` (linear), ``sqrt(B / B0)`` (sqrt) or 1 (none)."""
    ratio = batch_size / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every param group's lr by ``factor`` (before the first step)."""
    if factor == 1.0:
        return
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
