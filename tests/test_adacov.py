"""AdaCov against an independent float64 reference of the paper's equations, and torch's Adam."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from adacov import AdaCov
from adacov.optim.adacov import EXP_AVG_SQ, EXP_COV
from tests.helpers import (
    assert_float32_follows_float64,
    assert_is_torch_adam_on_a_linear_net,
    assert_resume_is_bit_identical,
    batches,
    loss_and_backward,
    run_side_by_side,
    small_convnet,
)
from tests.reference import ReferenceAdaCov, relative_difference

pytestmark = pytest.mark.numerics


def _shapes(net):
    return [tuple(p.shape) for p in net.parameters()]


@pytest.mark.parametrize("offdiag_warmup", [3.0, 390.0], ids=["short-warmup", "paper-warmup"])
def test_matches_float64_reference_on_3x3_and_5x5_convnet(offdiag_warmup):
    net = small_convnet()
    ref = ReferenceAdaCov(_shapes(net), lr=1e-2, cov_eps=1e-5, offdiag_warmup=offdiag_warmup)
    ours, theirs = run_side_by_side(
        net, lambda n: AdaCov(n.parameters(), lr=1e-2, offdiag_warmup=offdiag_warmup), ref, n_steps=40
    )
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-6


def test_offdiagonals_change_the_trajectory():
    """Guard for the test above: a diagonal-only reference ends far from AdaCov."""
    net = small_convnet()
    diagonal_only = ReferenceAdaCov(_shapes(net), lr=1e-2, offdiag_warmup=1e12)
    ours, theirs = run_side_by_side(net, lambda n: AdaCov(n.parameters(), lr=1e-2, offdiag_warmup=3.0), diagonal_only, 40)
    assert relative_difference(ours[0], theirs[0]) > 1e-3
    assert relative_difference(ours[2], theirs[2]) > 1e-3


def test_param_groups_and_weight_decay_match_reference():
    net = small_convnet()
    convs = [net[0].weight, net[2].weight]
    others = [p for p in net.parameters() if all(p is not c for c in convs)]
    hyper = dict(lr=3e-3, betas=(0.8, 0.99), cov_eps=1e-3, offdiag_warmup=5.0, weight_decay=0.1)

    def make(n):
        return AdaCov([{"params": convs, **hyper}, {"params": others}], lr=1e-2)

    ref_convs = ReferenceAdaCov([tuple(c.shape) for c in convs], **hyper)
    ref_others = ReferenceAdaCov([tuple(p.shape) for p in others], lr=1e-2)
    conv_ids = {id(c) for c in convs}
    order = [id(p) in conv_ids for p in net.parameters()]

    class Split:
        def step(self, params, grads):
            a = ref_convs.step([p for p, c in zip(params, order) if c], [g for g, c in zip(grads, order) if c])
            b = ref_others.step([p for p, c in zip(params, order) if not c], [g for g, c in zip(grads, order) if not c])
            a, b = iter(a), iter(b)
            return [next(a) if c else next(b) for c in order]

    ours, theirs = run_side_by_side(net, make, Split(), n_steps=30)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-6


def test_diagonal_rule_is_adam_with_eps_inside_the_root():
    """With eps -> 0 both forms of the denominator agree, so AdaCov on a linear net is torch's Adam."""
    assert_is_torch_adam_on_a_linear_net(lambda params: AdaCov(params, lr=1e-2, eps=1e-30))


def test_diagonal_rule_puts_eps_inside_the_root():
    """A large eps makes sqrt(v + eps^2) and sqrt(v) + eps differ; the reference uses eq. 2."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3)).double()
    ref = ReferenceAdaCov(_shapes(net), lr=1e-2, eps=1e-2)
    p = list(net.parameters())
    optimizer = AdaCov(p, lr=1e-2, eps=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        grads = [1e-2 * torch.randn(q.shape, generator=g, dtype=torch.float64) for q in p]
        expected = ref.step([q.detach().numpy().copy() for q in p], [gr.numpy() for gr in grads])
        for q, gr in zip(p, grads):
            q.grad = gr
        optimizer.step()
        for q, e in zip(p, expected):
            np.testing.assert_allclose(q.detach().numpy(), e, rtol=1e-12)


@pytest.mark.parametrize(
    "shape",
    [(3, 2, 5), (2, 2, 3, 3), (2, 1, 3, 3, 3), (4, 3, 1, 1)],
    ids=["conv1d-k5", "conv2d-3x3", "conv3d-3x3x3", "conv2d-1x1"],
)
def test_block_rule_on_1d_2d_3d_and_1x1_kernels(shape):
    """d = prod(kernel); a 1x1 kernel (d = 1) reduces to the diagonal rule with cov_eps."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    optimizer = AdaCov([p], lr=1e-2, cov_eps=1e-3, offdiag_warmup=4.0)
    ref = ReferenceAdaCov([shape], lr=1e-2, cov_eps=1e-3, offdiag_warmup=4.0)
    for _ in range(20):
        grad = torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape, generator=g, dtype=torch.float64)
        expected = ref.step([p.detach().numpy().copy()], [grad.numpy()])[0]
        p.grad = grad
        optimizer.step()
        assert relative_difference(p.detach().numpy(), expected) < 1e-9
    state = optimizer.state[p]
    assert (EXP_AVG_SQ in state) == (shape[2:] == (1, 1))
    assert (EXP_COV in state) == (shape[2:] != (1, 1))


def test_float32_follows_float64():
    assert_float32_follows_float64(lambda net: AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0), 10)


def test_state_dict_resume_is_bit_identical():
    assert_resume_is_bit_identical(lambda n: AdaCov(n.parameters(), lr=1e-2, offdiag_warmup=5.0, weight_decay=0.01), 5, 7)


def test_params_without_gradients_are_left_alone():
    net = small_convnet()
    frozen = nn.Parameter(torch.ones(3, 3, 3, 3, dtype=torch.float64))
    optimizer = AdaCov([*net.parameters(), frozen], lr=1e-2)
    x, y = batches(1)[0]
    loss_and_backward(net, x, y)
    optimizer.step()
    assert torch.equal(frozen, torch.ones_like(frozen))
    assert frozen not in optimizer.state


def test_closure_returns_loss():
    net = small_convnet()
    optimizer = AdaCov(net.parameters())
    x, y = batches(1)[0]
    loss = optimizer.step(lambda: loss_and_backward(net, x, y))
    assert loss == pytest.approx(nn.functional.cross_entropy(small_convnet()(x), y).item())


def test_sparse_gradients_are_rejected():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = AdaCov(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = small_convnet(torch.float64)
    gpu = copy.deepcopy(net).cuda()
    opt_cpu, opt_gpu = AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0), AdaCov(gpu.parameters(), lr=1e-2, offdiag_warmup=5.0)
    for x, y in batches(10):
        loss_and_backward(net, x, y)
        opt_cpu.step()
        loss_and_backward(gpu, x.cuda(), y.cuda())
        opt_gpu.step()
    for a, b in zip(net.parameters(), gpu.parameters()):
        assert relative_difference(b.detach().cpu().numpy(), a.detach().numpy()) < 1e-9
