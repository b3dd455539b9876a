"""EAdam: Adam with epsilon added to the second-moment average at every step (Yuan & Gao, 2020)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from adacov.optim.base import STEP, BaseOptimizer, lr_value, new_counter
from adacov.optim.validation import check_betas, check_bool, check_lr, check_nonnegative, check_positive

__all__ = ["EAdam"]

EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"


class EAdam(BaseOptimizer):
    r"""EAdam (Yuan & Gao, "EAdam Optimizer: How epsilon Impact Adam", 2020; code:
    yuanwei2019/EAdam-optimizer). With ``t`` the step count (from 1) and ``g`` the gradient:

    .. math::
        g &\leftarrow g + \lambda \theta \quad \text{(L2 weight decay, as the authors' code)} \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad \hat m = m / (1 - \beta_1^t) \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 + \epsilon, \qquad \hat v = v / (1 - \beta_2^t) \\
        \theta &\leftarrow \theta - \alpha \hat m / \sqrt{\hat v}

    Adam adds ``epsilon`` once, outside the root; EAdam adds it to ``v`` inside the average at every
    step, so it accumulates to about ``epsilon / (1 - beta2)`` (1000 ``epsilon`` for ``beta2 = 0.999``)
    and no ``epsilon`` remains outside the root. The authors' AMSGrad switch is left out: it is not
    part of the method. ``maximize`` steps along ``-g`` (the same steps as minimizing the negated loss).

    Args:
        params: tensors or param groups.
        lr: learning rate ``alpha``, a float or a 1-element tensor (default 1e-3).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999)).
        eps: ``epsilon`` added to ``v`` every step (default 1e-8, the paper's).
        weight_decay: L2 penalty ``lambda`` added to the gradient (default 0).
        maximize: maximize the objective instead of minimizing it (default False).

    State per tensor: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v, the accumulated epsilon included).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        _validate(defaults)
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        _validate(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One EAdam step for every tensor with a gradient; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("EAdam does not support sparse gradients; use dense gradients")
            for p in params:
                if not self.state[p]:
                    self.state[p].update({STEP: new_counter(p), EXP_AVG: torch.zeros_like(p), EXP_AVG_SQ: torch.zeros_like(p)})
                self.state[p][STEP] += 1
            _eadam_step(group, params, [self.state[p] for p in params])
        return loss


def _eadam_step(group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]]) -> None:
    """The update for one group's tensors, with torch's multi-tensor (``_foreach``) kernels."""
    lr, (beta1, beta2), eps, wd = lr_value(group), group["betas"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    if group["maximize"]:
        grads = torch._foreach_neg(grads)
    if wd != 0:
        grads = torch._foreach_add(grads, params, alpha=wd)
    exp_avgs = [s[EXP_AVG] for s in states]
    exp_avg_sqs = [s[EXP_AVG_SQ] for s in states]
    steps = [int(s[STEP].item()) for s in states]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    torch._foreach_add_(exp_avg_sqs, eps)
    denom = torch._foreach_div(exp_avg_sqs, [1.0 - beta2**t for t in steps])
    torch._foreach_sqrt_(denom)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])


def _validate(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"])
    check_positive("eps", h["eps"])
    check_nonnegative("weight_decay", h["weight_decay"])
    check_bool("maximize", h["maximize"])
