"""Adam's update for the tensors a curvature method leaves to Adam (biases, normalization, anything unpaired)."""

from __future__ import annotations

from torch import Tensor


def adam_update_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    t: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One Adam step on ``p`` in place from the gradient ``grad`` (``-p.grad`` when maximizing), with eps outside
    the root and decoupled weight decay:

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``p <- p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``,

    with ``t`` the 1-based step count of the bias corrections. MBF's and the K-FAC family's ``adam`` groups use it.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq / (1.0 - beta2**t)).sqrt_().add_(eps)
    if weight_decay != 0:
        p.mul_(1.0 - lr * weight_decay)
    p.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**t))
