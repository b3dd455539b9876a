"""MBF against an independent float64 reference of its rule, and closed forms."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from adacov import MBF, mbf_param_groups
from adacov.optim.mbf import ADAM, CONV, FISHER, ROWS, SHARED_ROWS
from tests.helpers import (
    assert_float32_follows_float64,
    assert_resume_is_bit_identical,
    batches,
    loss_and_backward,
    run_side_by_side,
    small_convnet,
)
from tests.reference import ReferenceMBF, relative_difference

pytestmark = pytest.mark.numerics


def _spec(net, groups):
    index = {id(p): i for i, p in enumerate(net.parameters())}
    spec = []
    for group in groups:
        if group["block"] == ADAM:
            spec += [("adam", [index[id(p)]]) for p in group["params"]]
        else:
            spec.append((group["block"], [index[id(p)] for p in group["params"]]))
    return spec


@pytest.mark.parametrize(
    ("every", "max_block_size"),
    [((1, 1), 256), ((2, 3), 256), ((1, 1), 64)],
    ids=["every-step", "curvature2-inverse3", "shared-linear-block"],
)
def test_matches_float64_reference(every, max_block_size):
    net = small_convnet()
    groups = mbf_param_groups(net, max_block_size=max_block_size)
    assert {g["block"] for g in groups} == {CONV, ADAM, ROWS if max_block_size > 129 else SHARED_ROWS}
    hyper = dict(lr=1e-3, damping=1e-2, weight_decay=0.5, curvature_every=every[0], inverse_every=every[1])
    ref = ReferenceMBF([p.detach().numpy().copy() for p in net.parameters()], _spec(net, groups), **hyper)
    ours, theirs = run_side_by_side(net, lambda n: MBF(mbf_param_groups(n, max_block_size), **hyper), ref, n_steps=30)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-6


def test_one_by_one_kernel_is_the_closed_form():
    """d = 1: theta <- theta - lr m_hat / (v_hat + damping), elementwise."""
    p = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    optimizer = MBF([p], lr=0.1, damping=0.05, inverse_every=1)
    theta, m, v = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 11):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        theta = theta - 0.1 * (m / (1 - 0.9**t)) / (v / (1 - 0.999**t) + 0.05)
        p.grad = grad
        optimizer.step()
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-14)


def test_warm_start_estimates_the_mean_curvature_without_moving():
    net = small_convnet()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = MBF(mbf_param_groups(net), warm_start_batches=3)
    outer_sum = 0
    for x, y in batches(3):
        loss_and_backward(net, x, y)
        g = net[0].weight.grad.reshape(-1, 9)
        outer_sum = outer_sum + g[:, :, None] * g[:, None, :]
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    torch.testing.assert_close(optimizer.state[net[0].weight][FISHER], outer_sum / 3)
    x, y = batches(4)[3]
    loss_and_backward(net, x, y)
    optimizer.step()
    assert not torch.equal(before[0], net[0].weight)


def test_state_dict_resume_is_bit_identical():
    assert_resume_is_bit_identical(lambda n: MBF(mbf_param_groups(n), lr=1e-3, inverse_every=4, weight_decay=0.1), 6, 8)


def test_float32_follows_float64():
    assert_float32_follows_float64(lambda net: MBF(mbf_param_groups(net), lr=1e-3), 8)


def test_failed_factorization_warns_once_and_recovers():
    p = torch.zeros(2, 2, 3, 3, dtype=torch.float32, requires_grad=True)
    optimizer = MBF([p], lr=1e-3, damping=1e-30, inverse_every=1)
    g = torch.Generator().manual_seed(0)
    p.grad = 1e3 * torch.randn(p.shape, generator=g)  # F = g g^T: rank 1, the damping lost to rounding
    with pytest.warns(UserWarning, match="failed to factor"):
        optimizer.step()
    assert torch.isfinite(p).all()
    p.grad = 1e3 * torch.randn(p.shape, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # warned once only


def test_param_groups_from_module_structure():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2, bias=False))
    groups = mbf_param_groups(net, max_block_size=10)
    kinds = [(g["block"], [tuple(p.shape) for p in g["params"]]) for g in groups]
    assert kinds == [
        (CONV, [(4, 3, 3, 3)]),
        (SHARED_ROWS, [(8, 16), (8,)]),
        (ROWS, [(2, 8)]),
        (ADAM, [(4,), (4,), (4,)]),
    ]


INVALID = [("lr", -1.0), ("damping", 0.0), ("eps", 0.0), ("weight_decay", -1.0), ("curvature_every", 0),
           ("inverse_every", 1.5), ("warm_start_batches", -1), ("betas", (0.9, 1.0))]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_rejects_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: ")):
        MBF([torch.zeros(2, 2, 3, 3, requires_grad=True)], **{name: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = small_convnet()
    gpu = small_convnet().cuda()
    a, b = MBF(mbf_param_groups(net), lr=1e-3), MBF(mbf_param_groups(gpu), lr=1e-3)
    for x, y in batches(5):
        loss_and_backward(net, x, y)
        a.step()
        loss_and_backward(gpu, x.cuda(), y.cuda())
        b.step()
    for p, q in zip(net.parameters(), gpu.parameters()):
        np.testing.assert_allclose(q.detach().cpu().numpy(), p.detach().numpy(), rtol=1e-9, atol=1e-12)
