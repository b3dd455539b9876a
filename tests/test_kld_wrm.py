"""KLD-WRM's SO and Q forms against K-FAC and float64 references written from their definitions."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from adacov import KFAC, KLDWRM, kfac_param_groups
from tests import reference_kfac as ref
from tests.helpers import assert_resume_is_bit_identical, batches, loss_and_backward, small_convnet
from tests.test_kfac import CONVS, _backward, _conv, _set_weights, _weights

pytestmark = pytest.mark.numerics

ONE_BATCH = dict(momentum=0.0, curvature_every=1, inverse_every=1)


def test_so_with_rho_zero_is_kfac_bit_for_bit():
    """rho = stat_decay = 0: g_hat = g, and every step is K-FAC's on the batch's factors (momentum, KL clip on)."""
    nets = [small_convnet(torch.float64), small_convnet(torch.float64)]
    settings = dict(lr=1e-2, stat_decay=0.0, curvature_every=1, inverse_every=2, kl_clip=1e-3, weight_decay=1e-2)
    optimizers = [KLDWRM(kfac_param_groups(nets[0]), form="so", **settings), KFAC(kfac_param_groups(nets[1]), **settings)]
    for x, y in batches(5):
        for net, optimizer in zip(nets, optimizers):
            loss_and_backward(net, x, y)
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(*(n.parameters() for n in nets)))


def test_so_with_rho_zero_steps_as_the_float64_kfac_reference():
    layer, head, x, y = _conv(**CONVS["3x3"])
    batch = ref.single_layer_batch(layer, head, x, y)
    A, G = ref.kfac_factors(batch)
    gamma_a, gamma_g = ref.factored_damping(A, G, 1e-3)
    expected = _weights(layer) - 0.1 * ref.kronecker_solve(A + gamma_a * np.eye(len(A)), G + gamma_g * np.eye(len(G)), batch.grad)
    optimizer = KLDWRM(kfac_param_groups(layer), lr=0.1, damping=1e-3, stat_decay=0.0, **ONE_BATCH)
    _backward(layer, head, x, y)
    optimizer.step()
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-8, atol=1e-12)


def _two_steps(form: str, rho: float, lrs: tuple[float, float]):
    """Two steps of a linear layer on two batches, the lr changed in between; returns the layer, the per-step
    references' inputs and the optimizer."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(2)]
    optimizer = KLDWRM(kfac_param_groups(layer), lr=lrs[0], damping=1e-2, stat_decay=rho, form=form, **ONE_BATCH)
    seen = []
    for (x, y), lr in zip(data, lrs):
        optimizer.param_groups[0]["lr"] = lr
        seen.append((_weights(layer), ref.single_layer_batch(layer, lambda out: out, x, y)))
        _backward(layer, lambda out: out, x, y)
        optimizer.step()
    return layer, seen


@pytest.mark.parametrize("form", ["so", "q"])
def test_the_second_step_descends_the_wake_gradient(form):
    """Step 2 is -alpha_2 (A_bar + g_A I)^-1 g_hat (G_bar + g_G I)^-1 with
    SO: g_hat = g_2 - rho (alpha_1 / alpha_2) g_1; Q: g_hat = g_2 - rho (alpha_1 / alpha_2)(g_1 + G_1 S_1 A_1) and the
    factors augmented, A_aug = A_bar + alpha_2 A_2. A_bar is the bias-corrected average, K-FAC's damping split."""
    rho, lrs = 0.6, (0.2, 0.1)
    layer, ((w1, b1), (w2, b2)) = _two_steps(form, rho, lrs)
    (A1, G1), (A2, G2) = ref.kfac_factors(b1), ref.kfac_factors(b2)
    A, G = ((rho * (1 - rho) * f1 + (1 - rho) * f2) / (1 - rho**2) for f1, f2 in ((A1, A2), (G1, G2)))
    wake = b1.grad
    if form == "q":
        wake = wake + G1 @ (w2 - w1) @ A1
        A, G = A + lrs[1] * A2, G + lrs[1] * G2
    g_hat = b2.grad - rho * (lrs[0] / lrs[1]) * wake
    gamma_a, gamma_g = ref.factored_damping(A, G, 1e-2)
    expected = w2 - lrs[1] * ref.kronecker_solve(A + gamma_a * np.eye(len(A)), G + gamma_g * np.eye(len(G)), g_hat)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["so", "q"])
def test_state_dict_resume_is_bit_identical(form):
    assert_resume_is_bit_identical(lambda n: KLDWRM(kfac_param_groups(n), lr=1e-3, form=form, curvature_every=2, inverse_every=3), 5, 6)


def test_rejects_an_unknown_form():
    with pytest.raises(ValueError, match=re.escape("Invalid form: 'qe' (use one of so, q)")):
        KLDWRM(kfac_param_groups(nn.Linear(2, 2)), form="qe")


def _reference_steps(form: str, layer, head, data, lrs, rho, damping, momentum, kl_clip, curvature_every, inverse_every):
    """The weights after each step of KLD-WRM written from its definition, one float64 layer, in NumPy.

    Step ``k`` (from 1), with ``A_k, G_k`` the last curvature batch's factors (the batch's own ``A``, which equals
    the definition's ``(A_bar_k - rho A_bar_{k-1}) / (1 - rho)``) and ``S_{k-1}`` the previous step's displacement:

        g_hat = g_k - rho (alpha_{k-1} / alpha_k) (g_{k-1} [+ G S_{k-1} A, Q; the factors before this step's update]),
        A_bar <- rho A_bar + (1 - rho) A_k every ``curvature_every`` steps (from 0, bias-corrected),
        every ``inverse_every`` steps: X_inv = (X_hat [+ alpha_k X_k, Q] + gamma_X I)^-1, K-FAC's split damping,
        D = nu G_inv g_hat A_inv, nu = min(1, sqrt(kl_clip / (alpha_k^2 <D, g_hat>))),
        b <- momentum b + D, theta <- theta - alpha_k b.
    """
    theta, trajectory = _weights(layer), []
    averages, batch_factors, count, previous, buffer, inverses = [0.0, 0.0], None, 0, None, 0.0, None
    for k, ((x, y), lr) in enumerate(zip(data, lrs)):
        with torch.no_grad():
            _set_weights(layer, theta)
        batch = ref.single_layer_batch(layer, head, x, y)
        g_hat = batch.grad
        if previous is not None:
            grad_before, lr_before, step_before = previous
            wake = grad_before + (batch_factors[1] @ step_before @ batch_factors[0] if form == "q" else 0.0)
            g_hat = batch.grad - rho * (lr_before / lr) * wake
        if k % curvature_every == 0:
            batch_factors = ref.kfac_factors(batch)
            averages = [rho * avg + (1 - rho) * new for avg, new in zip(averages, batch_factors)]
            count += 1
        if k % inverse_every == 0:
            augmentation = lr if form == "q" else 0.0
            A, G = (avg / (1 - rho**count) + augmentation * new for avg, new in zip(averages, batch_factors))
            gamma_a, gamma_g = ref.factored_damping(A, G, damping)
            inverses = np.linalg.inv(A + gamma_a * np.eye(len(A))), np.linalg.inv(G + gamma_g * np.eye(len(G)))
        direction = inverses[1] @ g_hat @ inverses[0]
        direction = direction * min(1.0, np.sqrt(kl_clip / (lr**2 * np.sum(direction * g_hat))))
        buffer = momentum * buffer + direction
        new_theta = theta - lr * buffer
        previous = batch.grad, lr, new_theta - theta
        theta = new_theta
        trajectory.append(theta)
    return trajectory


@pytest.mark.parametrize("form", ["so", "q"])
def test_steps_follow_the_float64_definition_with_stale_factors_momentum_and_kl_clipping(form):
    """Seven steps of a 3x3 convolution at the configs' kind of schedule (curvature every 2 steps, inverses every 3,
    so the wake's factors and the inverses go stale), momentum 0.9, KL clipping that binds on some steps, and an lr
    that changes: every step's weights equal the NumPy reference's."""
    rho, damping, momentum, kl_clip, lrs = 0.8, 1e-2, 0.9, 5e-2, (0.2, 0.1, 0.1, 0.3, 0.2, 0.2, 0.1)
    layer, head, x, y = _conv(n=12, **CONVS["3x3"])
    data = [(x[i : i + 4 + i % 3], y[i : i + 4 + i % 3]) for i in range(len(lrs))]
    schedule = dict(curvature_every=2, inverse_every=3)
    start = _weights(layer)
    expected = _reference_steps(form, layer, head, data, lrs, rho, damping, momentum, kl_clip, **schedule)
    with torch.no_grad():
        _set_weights(layer, start)
    hyper = dict(damping=damping, stat_decay=rho, momentum=momentum, kl_clip=kl_clip, form=form, **schedule)
    optimizer = KLDWRM(kfac_param_groups(layer), lr=lrs[0], **hyper)
    for (xb, yb), lr, weights in zip(data, lrs, expected):
        optimizer.param_groups[0]["lr"] = lr
        _backward(layer, head, xb, yb)
        optimizer.step()
        np.testing.assert_allclose(_weights(layer), weights, rtol=1e-9, atol=1e-12)
