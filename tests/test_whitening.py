"""Whitened-gradient steps against SGD on explicitly whitened inputs (float64), and the recursive variant."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from adacov import Whitening, kfac_param_groups
from adacov.optim.whitening import WHITENING_MAP, shrink_top_direction
from tests import reference_kfac as ref
from tests.helpers import assert_resume_is_bit_identical
from tests.test_kfac import _weights

pytestmark = pytest.mark.numerics

FIXED_R = dict(momentum=0.0, stat_decay=0.0, curvature_every=1, inverse_every=1)  # R of the one batch


def _layer_and_batch():
    """A linear layer whose inputs have very different scales (R's condition number about 1e4)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(32, 4, dtype=torch.float64) * torch.tensor([10.0, 1.0, 0.3, 0.1], dtype=torch.float64) + 0.5
    return layer, x, torch.randint(0, 3, (32,))


def _train(layer, optimizer, x, y, steps):
    for _ in range(steps):
        layer.zero_grad()
        nn.functional.cross_entropy(layer(x), y).backward()
        optimizer.step()


def test_whitened_gradient_steps_are_sgd_on_whitened_inputs():
    """Three steps of W <- W - lr grad (R + lambda I)^-1 on one batch equal three SGD steps on the weights of a
    layer fed x_hat = (R + lambda I)^(-1/2) [x; 1], mapped back: R = E[[x; 1][x; 1]^T], lambda = damping max eig R."""
    layer, x, y = _layer_and_batch()
    inputs = torch.cat([x, torch.ones(32, 1, dtype=torch.float64)], 1).numpy()
    R = inputs.T @ inputs / 32
    damped = R + 1e-3 * np.linalg.eigvalsh(R).max() * np.eye(5)
    values, vectors = np.linalg.eigh(damped)
    expected = ref.whitened_sgd(_weights(layer), x.numpy(), y.numpy(), (vectors / np.sqrt(values)) @ vectors.T, 0.5, 3)
    _train(layer, Whitening(kfac_param_groups(layer), lr=0.5, damping=1e-3, **FIXED_R), x, y, 3)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-10, atol=1e-12)


def test_recursive_steps_are_sgd_on_inputs_whitened_by_its_map():
    """After the map P is updated (step 1), the steps W <- W - lr grad P^T P equal SGD on x_hat = P [x; 1]."""
    layer, x, y = _layer_and_batch()
    optimizer = Whitening(kfac_param_groups(layer), lr=0.5, recursive=True, **{**FIXED_R, "inverse_every": 10})
    _train(layer, optimizer, x, y, 1)
    P = optimizer.state[layer.weight][WHITENING_MAP].numpy()
    assert not np.allclose(P, np.eye(5))
    expected = ref.whitened_sgd(_weights(layer), x.numpy(), y.numpy(), P, 0.5, 3)
    _train(layer, optimizer, x, y, 3)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-10, atol=1e-12)


def test_recursive_whitening_lowers_the_condition_number_step_by_step():
    """On a fixed R with eigenvalues 100, 30, 10, 3, 1, 0.3 (mean 24.05) and exact power iterations, each shrink
    brings the top whitened eigenvalue down to R's mean and leaves the rest: the condition number falls every step
    until no eigenvalue exceeds the mean, and P^T P = mean max(R, mean I)^-1."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64)).Q
    spectrum = torch.tensor([100.0, 30.0, 10.0, 3.0, 1.0, 0.3], dtype=torch.float64)
    R = (Q * spectrum) @ Q.T
    mean = spectrum.mean()
    P, conditions = torch.eye(6, dtype=torch.float64), []
    for _ in range(3):
        P = shrink_top_direction(P.unsqueeze(0), R.unsqueeze(0), torch.randn(1, 6, generator=g, dtype=torch.float64), 200)[0]
        conditions.append(float(torch.linalg.cond(P @ R @ P.T)))
    assert conditions[0] < 1000.0 and conditions[1] < conditions[0] and conditions[2] == pytest.approx(conditions[1])
    assert conditions[1] == pytest.approx(float(mean / 0.3), rel=1e-8)
    expected = float(mean) * torch.linalg.inv((Q * torch.maximum(spectrum, mean)) @ Q.T)
    torch.testing.assert_close(P.T @ P, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("recursive", [False, True], ids=["full", "recursive"])
def test_state_dict_resume_is_bit_identical(recursive):
    resumed = assert_resume_is_bit_identical(
        lambda n: Whitening(kfac_param_groups(n), lr=1e-2, recursive=recursive, curvature_every=2, inverse_every=2), 5, 6
    )
    assert all((WHITENING_MAP in s) == recursive for s in resumed.state.values() if "factor_in" in s)


INVALID = [("damping", 0.0), ("recursive", 1), ("power_iterations", 0), ("seed", -2), ("inverse_every", 0)]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_rejects_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: ")):
        Whitening(kfac_param_groups(nn.Linear(2, 2)), **{name: value})
