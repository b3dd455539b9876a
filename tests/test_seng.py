"""SENG against the explicit (U^T U + lambda I)^-1 g, and its Gram matrices and sketches against their definitions."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from adacov import SENG, kfac_param_groups
from adacov.optim.kronecker import (
    low_rank_output_gradients,
    per_sample_combination,
    per_sample_gram,
    per_sample_inner,
    sample_positions,
)
from tests import reference_kfac as ref
from tests.helpers import assert_resume_is_bit_identical, batches, loss_and_backward, small_convnet
from tests.test_kfac import CONVS, _backward, _conv, _linear, _weights

pytestmark = pytest.mark.numerics

LAYERS = {"linear": _linear, **{f"conv-{name}": (lambda g=g: _conv(**g)) for name, g in CONVS.items()}}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_step_is_the_explicit_damped_empirical_fisher_solve(make):
    """W <- W - lr (U^T U + lambda I)^-1 g, U's rows vec(dW_n) / sqrt(N) from each sample's own loss."""
    layer, head, x, y = make()
    batch = ref.single_layer_batch(layer, head, x, y)
    damping, lr = 1e-2, 0.1
    expected = _weights(layer) - lr * ref.seng_direction(batch, damping)
    optimizer = SENG(kfac_param_groups(layer), lr=lr, momentum=0.0, damping=damping)
    _backward(layer, head, x, y)
    optimizer.step()
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("t", "o", "i"), [(1, 3, 5), (9, 3, 5), (2, 8, 40)], ids=["linear", "pairs", "explicit"])
def test_per_sample_products_equal_the_explicit_gradients(t, o, i):
    """Gram <dW_n, dW_m>, <dW_n, M> and sum_n y_n dW_n, with dW_n = sum_t e_nt a_nt^T formed explicitly; the
    three shapes take both of per_sample_gram's ways."""
    g = torch.Generator().manual_seed(0)
    a, e = torch.randn(4, t, i, generator=g, dtype=torch.float64), torch.randn(4, t, o, generator=g, dtype=torch.float64)
    grads = torch.einsum("nto,nti->noi", e, a)
    M, weights = torch.randn(o, i, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(per_sample_gram(a, e), torch.einsum("noi,moi->nm", grads, grads), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_sample_inner(a, e, M), torch.einsum("noi,oi->n", grads, M), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_sample_combination(a, e, weights), torch.einsum("n,noi->oi", weights, grads), rtol=1e-12, atol=1e-12)


def test_sketches_keep_the_per_sample_gradients_where_they_keep_everything():
    """All T positions, or output gradients at rank min(T, o): the same per-sample gradients; s of T positions
    scaled by sqrt(T / s), so each sampled term counts T / s times."""
    g = torch.Generator().manual_seed(1)
    a, e = torch.randn(3, 6, 5, generator=g, dtype=torch.float64), torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    grads = torch.einsum("nto,nti->noi", e, a)
    low_a, low_e = low_rank_output_gradients(a, e, 4)
    assert low_a.shape == (3, 4, 5)
    torch.testing.assert_close(torch.einsum("nto,nti->noi", low_e, low_a), grads, rtol=1e-12, atol=1e-12)
    all_a, all_e = sample_positions(a, e, torch.arange(6))
    torch.testing.assert_close(torch.einsum("nto,nti->noi", all_e, all_a), grads, rtol=1e-12, atol=1e-12)
    some_a, some_e = sample_positions(a, e, torch.tensor([1, 4]))
    expected = 3.0 * torch.einsum("nto,nti->noi", e[:, [1, 4]], a[:, [1, 4]])
    torch.testing.assert_close(torch.einsum("nto,nti->noi", some_e, some_a), expected, rtol=1e-12, atol=1e-12)


def test_layers_are_solved_together_as_each_alone():
    """The batched solve over layers takes, for each layer, the step of a SENG that holds only that layer."""
    net = small_convnet(torch.float64)
    together = SENG(kfac_param_groups(net), lr=1e-3, damping=1e-2, update_freq=2)
    alone = []
    for layer in (0, 2, 4, 6):
        twin = copy.deepcopy(net)
        groups = kfac_param_groups(twin)
        alone.append((twin, layer, SENG([g for g in groups if g["params"][0] is twin[layer].weight], lr=1e-3, damping=1e-2, update_freq=2)))
    for x, y in batches(1):
        loss_and_backward(net, x, y)
        together.step()
        for twin, _, optimizer in alone:
            loss_and_backward(twin, x, y)
            optimizer.step()
    for twin, layer, _ in alone:
        torch.testing.assert_close(twin[layer].weight, net[layer].weight, rtol=1e-12, atol=1e-14)


def test_a_stale_curvature_is_reused_between_refreshes():
    """With update_freq 2, step 2 solves with step 1's U: (U_1^T U_1 + lambda I)^-1 g_2."""
    layer, head, x, y = _linear(n=6)
    x2, y2 = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    first = ref.single_layer_batch(layer, head, x, y)
    optimizer = SENG(kfac_param_groups(layer), lr=0.1, momentum=0.0, damping=0.05, update_freq=2)
    _backward(layer, head, x, y)
    optimizer.step()
    start, second = _weights(layer), ref.single_layer_batch(layer, head, x2, y2)
    stale = ref.SingleLayerBatch(a=first.a, delta=first.delta, dW=first.dW, grad=second.grad)
    _backward(layer, head, x2, y2)
    optimizer.step()
    np.testing.assert_allclose(_weights(layer), start - 0.1 * ref.seng_direction(stale, 0.05), rtol=1e-9, atol=1e-12)


def test_state_dict_resume_is_bit_identical_with_sampled_positions():
    resumed = assert_resume_is_bit_identical(
        lambda n: SENG(kfac_param_groups(n), lr=1e-3, damping=1e-2, update_freq=2, sketch_positions=10, output_rank=2), 5, 6
    )
    assert all(s["samples_in"].shape[1] <= 10 for s in resumed.state.values() if "samples_in" in s)


INVALID = [("damping", 0.0), ("update_freq", 0), ("sketch_positions", 0), ("output_rank", 1.5), ("seed", -1)]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_rejects_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: ")):
        SENG(kfac_param_groups(nn.Linear(2, 2)), **{name: value})
