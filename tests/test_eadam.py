"""EAdam against a float64 reference of its paper's algorithm, a closed form, and torch's Adam."""

from __future__ import annotations

import re

import pytest
import torch

from adacov import EAdam
from tests.helpers import assert_is_torch_adam_on_a_linear_net, assert_resume_is_bit_identical, run_side_by_side, small_convnet
from tests.reference import ReferenceEAdam, relative_difference

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_float64_reference(weight_decay):
    net = small_convnet()
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ref = ReferenceEAdam([tuple(p.shape) for p in net.parameters()], **hyper)
    ours, theirs = run_side_by_side(net, lambda n: EAdam(n.parameters(), **hyper), ref, n_steps=30)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-10


def test_constant_gradient_sees_the_accumulated_epsilon():
    """With g constant, v_hat = g^2 + eps / (1 - beta2) exactly, so each step is lr g / sqrt(g^2 + eps / (1 - beta2))."""
    g, eps, lr = 1e-3, 1e-6, 0.1
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = EAdam([p], lr=lr, eps=eps)
    for t in range(1, 21):
        p.grad = torch.full_like(p, g)
        optimizer.step()
        expected = -t * lr * g / (g**2 + eps / (1 - 0.999)) ** 0.5
        torch.testing.assert_close(p.detach(), torch.full_like(p, expected), rtol=1e-12, atol=0)
    assert abs(expected) < 0.05 * t * lr  # Adam's step here would be lr g / (g + eps), about lr


def test_without_epsilon_it_is_torch_adam():
    assert_is_torch_adam_on_a_linear_net(lambda params: EAdam(params, lr=1e-2, eps=1e-300))


def test_state_dict_resume_is_bit_identical():
    assert_resume_is_bit_identical(lambda n: EAdam(n.parameters(), lr=1e-2, weight_decay=0.01), 5, 7)


INVALID = [("lr", -1.0), ("eps", 0.0), ("weight_decay", -0.1), ("betas", (0.9, 1.0))]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_rejects_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: ")):
        EAdam([torch.zeros(3, requires_grad=True)], **{name: value})
