"""Sharpness of a model's loss on one batch: SALR's probe estimate and the Hessian's top eigenvalue.

Both evaluate the model through ``torch.func.functional_call`` on copies of its parameters and
buffers, so they never write to the model: its parameters, ``.grad``, BatchNorm running statistics and
whatever its forward hooks keep under its own weights (the K-FAC family's recorded batches) stay as
they were. The loss is the batch's mean ``f_B(theta) = mean_j f_j(theta)`` (cross-entropy unless
``loss`` says otherwise), in the model's current mode (training mode: BatchNorm normalizes with the
batch's statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

DIRECTIONS = ("clamped", "per_sample")
Average = Callable[[Tensor], Tensor]
# A torch-style loss: loss(outputs, targets) is the batch mean, loss(outputs, targets, reduction="none") per sample.
Loss = Callable[..., Tensor]


def salr_sharpness(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    steps_descent: int = 5,
    steps_ascent: int = 5,
    step_size: float = 1e-3,
    direction: str = "clamped",
    clamp: float = 1.0,
    average: Average | None = None,
    loss: Loss = F.cross_entropy,
) -> float:
    r"""SALR's local sharpness (Yue, Nouiehed & Kontar): ``S = f_B(theta+) - f_B(theta-)``.

    From ``theta- = theta+ = theta``, ``steps_descent`` steps ``theta- <- theta- - step_size * d(theta-)``
    and ``steps_ascent`` steps ``theta+ <- theta+ + step_size * d(theta+)``, where ``d`` is

    - ``clamped`` (the authors' code): the batch gradient clamped to ``[-clamp, clamp]`` per coordinate;
    - ``per_sample`` (the paper): ``mean_j g_j / ||g_j||``, the mean of the per-sample gradients, each
      normalized over all parameters (exact per-sample gradients by ``vmap`` over samples; with BatchNorm
      in training mode, whose samples share the batch's statistics, the Jacobian of the per-sample losses
      computed on the whole batch, ``jacrev``, several times slower).

    Args:
        model: the network; ``inputs`` ``[B, ...]`` and integer ``targets`` ``[B]``: the batch.
        average: the mean over DDP ranks of a tensor (the global batch's gradient and losses when each
            rank holds an equal slice of it); ``None`` in one process.
        loss: ``loss(outputs, targets)``, the batch mean; ``reduction="none"`` gives ``[B]`` per-sample losses.

    Returns:
        ``S`` as a Python float (one host sync).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not allowed: use one of {', '.join(DIRECTIONS)}")
    average = average or (lambda t: t)
    probe = _Probe(model, inputs, targets, loss)
    step = probe.clamped_direction if direction == "clamped" else probe.per_sample_direction
    theta = probe.start()
    lower, upper = theta, theta
    for _ in range(steps_descent):
        lower = lower - step_size * step(lower, average, clamp)
    for _ in range(steps_ascent):
        upper = upper + step_size * step(upper, average, clamp)
    with torch.no_grad():
        losses = average(torch.stack([probe.loss(upper), probe.loss(lower)]))
    return (losses[0] - losses[1]).item()


def top_hessian_eigenvalue(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    iterations: int = 20,
    generator: torch.Generator | None = None,
    loss: Loss = F.cross_entropy,
) -> float:
    """The Hessian of ``f_B`` at the model's weights: its eigenvalue of largest magnitude, by power iteration.

    Hessian-vector products by double backward; the estimate is the Rayleigh quotient ``v^T H v`` of the
    last unit iterate ``v``, started from a normal draw of ``generator``.
    """
    probe = _Probe(model, inputs, targets, loss)
    theta = probe.start().requires_grad_()
    gradient = torch.autograd.grad(probe.loss(theta), theta, create_graph=True)[0]
    v = torch.randn(theta.shape, generator=generator, dtype=theta.dtype).to(theta.device)
    v = v / v.norm()
    estimate = torch.zeros((), dtype=theta.dtype)
    for _ in range(iterations):
        hv = torch.autograd.grad(gradient, theta, grad_outputs=v, retain_graph=True)[0]
        estimate = v @ hv
        v = hv / hv.norm()
    return estimate.item()


class _Probe:
    """The batch loss as a function of one flat parameter vector ``[P]`` (the model's trainable tensors).

    Gradients come from ``torch.func`` transforms, which take the buffers as an input so that BatchNorm may
    update its (copied) running statistics inside them.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor, loss: Loss) -> None:
        self.model, self.inputs, self.targets, self.loss_fn = model, inputs, targets, loss
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.buffers = {name: b.clone() for name, b in model.named_buffers()}  # their updates land on the copies
        self.coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())

    def start(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self.named])

    def tensors(self, theta: Tensor) -> dict[str, Tensor]:
        """The model's trainable tensors by name, as views of ``theta``."""
        sizes = [p.numel() for _, p in self.named]
        return {name: part.view_as(p) for (name, p), part in zip(self.named, theta.split(sizes))}

    def loss(self, theta: Tensor, buffers: dict[str, Tensor] | None = None, reduction: str = "mean") -> Tensor:
        outputs = functional_call(self.model, self.tensors(theta) | (buffers or self.buffers), (self.inputs,))
        return self.loss_fn(outputs, self.targets, reduction=reduction)

    def clamped_direction(self, theta: Tensor, average: Average, clamp: float) -> Tensor:
        return average(grad(self.loss)(theta, self.buffers)).clamp(-clamp, clamp)

    def per_sample_direction(self, theta: Tensor, average: Average, clamp: float) -> Tensor:
        grads = self.per_sample_gradients(theta)
        norms = grads.norm(dim=1, keepdim=True).clamp_min(torch.finfo(grads.dtype).tiny)
        return average((grads / norms).mean(0))

    def per_sample_gradients(self, theta: Tensor) -> Tensor:
        """``[B, P]``: row ``j`` is the gradient of sample ``j``'s loss ``f_j`` at ``theta``."""
        if self.coupled:
            return jacrev(lambda t, b: self.loss(t, b, reduction="none"))(theta, self.buffers)

        def sample_loss(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(functional_call(self.model, self.tensors(flat) | self.buffers, (x[None],)), y[None])

        return vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(theta, self.inputs, self.targets)
