"""The layers the K-FAC family preconditions, and what it records of their batches.

:func:`kfac_param_groups` makes a param group per ``Linear`` and ``Conv2d`` and hooks the module, so that each step
finds the layer's last training-mode inputs and the gradient of the loss with respect to its outputs
(:func:`layer_batch`); :func:`gradient_matrix` puts a layer's weight and bias gradients into one ``[o, i]`` matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from adacov.optim.param_groups import with_names

__all__ = ["ADAM", "CONV2D", "LAYERS", "LINEAR", "LayerBatch", "gradient_matrix", "kfac_param_groups", "layer_batch", "record_batch"]

LINEAR, CONV2D, ADAM = "linear", "conv2d", "adam"
LAYERS = (LINEAR, CONV2D, ADAM)

# The last training batch of every layer that kfac_param_groups hooked, by weight parameter (identity).
_BATCHES: WeakIdKeyDictionary = WeakIdKeyDictionary()


class LayerBatch:
    """A layer's last training-mode inputs and the gradient of the loss with respect to its outputs."""

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs
        self.output_grads: Tensor | None = None

    def record_output_grads(self, grad: Tensor) -> None:
        self.output_grads = grad.detach()


def record_batch(module: nn.Module, args: tuple, output: Tensor) -> None:
    """The forward hook of every layer that :func:`kfac_param_groups` claims: keeps the layer's input under its
    weight (autograd keeps it anyway) and puts a hook on the output tensor, which receives the gradient with
    respect to the output itself, also when a later ``ReLU(inplace=True)`` overwrites it.

    A module-level function, so that ``copy.deepcopy`` and ``pickle`` of a model keep the hook, and the copy
    records its batches under its own weight.
    """
    if module.training and torch.is_grad_enabled() and output.requires_grad and module.weight.requires_grad:
        batch = LayerBatch(args[0].detach())
        _BATCHES[module.weight] = batch
        output.register_hook(batch.record_output_grads)


def kfac_param_groups(model: nn.Module, named: bool = False) -> list[dict[str, Any]]:
    """Param groups of the K-FAC family, one per layer, with hooks that record each layer's batch.

    - ``Linear``: ``[weight, bias]``, ``layer="linear"``;
    - ``Conv2d`` with zero padding given as numbers and ``groups=1``: ``[weight, bias]``, ``layer="conv2d"``
      and the geometry (``kernel_size``, ``stride``, ``padding``, ``dilation``) that unfolds its patches;
    - every other parameter (normalization, other convolutions, ...): ``layer="adam"``, Adam's direction.

    Frozen tensors (``requires_grad=False``) are left out: a layer with a frozen bias is a layer without one,
    the bias of a frozen weight takes Adam's direction. Build the groups again after unfreezing. Each layer's
    hook is added once (calling it again, or on a copy of the model, adds none). ``named=True`` gives each
    tensor as ``(name, tensor)``, as ``model.named_parameters()`` does.
    """
    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not module.weight.requires_grad:
            continue
        if isinstance(module, nn.Linear):
            group: dict[str, Any] = {"layer": LINEAR}
        elif (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        ):
            group = {
                "layer": CONV2D,
                "kernel_size": tuple(module.kernel_size),
                "stride": tuple(module.stride),
                "padding": tuple(module.padding),
                "dilation": tuple(module.dilation),
            }
        else:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
        groups.append({"params": params, **group})
        claimed.update(id(p) for p in params)
        if record_batch not in module._forward_hooks.values():
            module.register_forward_hook(record_batch)
    rest = [p for p in model.parameters() if id(p) not in claimed and p.requires_grad]
    if rest:
        groups.append({"params": rest, "layer": ADAM})
    return with_names(groups, model) if named else groups


def gradient_matrix(grads: list[Tensor]) -> Tensor:
    """The layer's gradient as ``[o, i]`` from ``[weight's, bias's]``: the weight's reshaped, the bias's (if
    any) as the last column."""
    grad = grads[0].reshape(grads[0].shape[0], -1)
    if len(grads) > 1:
        grad = torch.cat([grad, grads[1].unsqueeze(1)], 1)
    return grad


def layer_batch(group: dict) -> tuple[Tensor, Tensor]:
    """``(a, e)`` of the layer's last batch: inputs ``[N, T, i]`` (ones appended for a bias) and per-sample
    output gradients ``[N, T, o]`` (``N`` times autograd's, for a mean loss)."""
    batch = _BATCHES.get(group["params"][0])
    if batch is None or batch.output_grads is None:
        raise ValueError(
            f"Invalid step: no batch recorded for a {group['layer']} layer (the K-FAC family needs the groups of "
            "kfac_param_groups(model), and one forward in training mode and one backward before each step)"
        )
    x, grad_out = batch.inputs, batch.output_grads
    n = x.shape[0]
    if group["layer"] == CONV2D:
        patches = F.unfold(x, group["kernel_size"], dilation=group["dilation"], padding=group["padding"], stride=group["stride"])
        a = patches.mT
        e = grad_out.reshape(n, grad_out.shape[1], -1).mT
    else:
        a = x.reshape(n, -1, x.shape[-1])
        e = grad_out.reshape(n, -1, grad_out.shape[-1])
    if len(group["params"]) > 1:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
    return a, e * n
