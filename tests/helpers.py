"""Small nets and a driver that runs a torch optimizer and a NumPy reference side by side."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from tests.reference import relative_difference


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


def assert_float32_follows_float64(make_optimizer, n_steps: int) -> None:
    """The same net and batches in float32 and float64 must stay within 1e-3 (relative) of each other."""
    net64 = small_convnet(torch.float64)
    net32 = small_convnet(torch.float32)
    opt64, opt32 = make_optimizer(net64), make_optimizer(net32)
    for x, y in batches(n_steps):
        loss_and_backward(net64, x, y)
        opt64.step()
        loss_and_backward(net32, x.float(), y)
        opt32.step()
    for a, b in zip(net32.parameters(), net64.parameters()):
        assert a.dtype == torch.float32
        assert relative_difference(a.detach().double().numpy(), b.detach().numpy()) < 1e-3


def assert_is_torch_adam_on_a_linear_net(make_optimizer) -> None:
    """On a float64 linear net, 30 steps of ``make_optimizer(params)`` equal torch's Adam (eps 0, lr 1e-2)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(net)
    ours, adam = make_optimizer(net.parameters()), torch.optim.Adam(twin.parameters(), lr=1e-2, eps=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
        for model, opt in ((net, ours), (twin, adam)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def assert_resume_is_bit_identical(make_optimizer, n_before: int, n_after: int) -> torch.optim.Optimizer:
    """Train ``n_before`` steps, save model and optimizer, go on for ``n_after`` steps; a fresh model and
    optimizer loaded from the save (its constructor given other hyperparameters) must end bit-identical.
    Returns the resumed optimizer."""
    import io

    net = small_convnet(torch.float32)
    data = batches(n_before + n_after, dtype=torch.float32)
    optimizer = make_optimizer(net)
    for x, y in data[:n_before]:
        loss_and_backward(net, x, y)
        optimizer.step()
    saved = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    for x, y in data[n_before:]:
        loss_and_backward(net, x, y)
        optimizer.step()
    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed = small_convnet(torch.float32, seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make_optimizer(resumed)
    for group in resumed_opt.param_groups:
        group["lr"] = 123.0  # overwritten by the checkpoint
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for x, y in data[n_before:]:
        loss_and_backward(resumed, x, y)
        resumed_opt.step()
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    return resumed_opt
