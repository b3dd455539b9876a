"""Small nets and a driver that runs a torch optimizer and a NumPy reference side by side."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def small_convnet(dtype=torch.float64, seed: int = 0) -> nn.Module:
    """3x3 and 5x5 convolutions, a 1x1 convolution and a linear layer, on 2x8x8 inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 5, padding=2),
        nn.Tanh(),
        nn.Conv2d(4, 2, 1),
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 5),
    )
    return net.to(dtype)


def batches(n_steps: int, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 2, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (16,), generator=g))
        for _ in range(n_steps)
    ]


def loss_and_backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss.item()


def run_side_by_side(net: nn.Module, make_optimizer, reference, n_steps: int):
    """Train ``net`` with the torch optimizer and a copy with the reference on the same batches.

    Returns the final parameters of both as lists of NumPy arrays.
    """
    ref_net = copy.deepcopy(net)
    optimizer = make_optimizer(net)
    for x, y in batches(n_steps, dtype=next(net.parameters()).dtype):
        loss_and_backward(net, x, y)
        optimizer.step()
        loss_and_backward(ref_net, x, y)
        params = [p.detach().numpy() for p in ref_net.parameters()]
        grads = [p.grad.numpy() for p in ref_net.parameters()]
        with torch.no_grad():
            for p, new in zip(ref_net.parameters(), reference.step(params, grads)):
                p.copy_(torch.from_numpy(np.asarray(new)))
    return [p.detach().numpy().copy() for p in net.parameters()], [p.detach().numpy().copy() for p in ref_net.parameters()]
