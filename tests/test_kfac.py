"""The K-FAC family against float64 references written from the papers' definitions."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from adacov import EKFAC, KFAC, TEKFAC, TKFAC, kfac_param_groups
from adacov.optim import kfac as kfac_module
from adacov.optim.kfac import ADAM, CONV2D, FACTOR_IN, FACTOR_OUT, LINEAR, TRACE, layer_batch
from adacov.optim.kronecker import kfac_factors
from tests import reference_kfac as ref
from tests.helpers import assert_float32_follows_float64, assert_resume_is_bit_identical

pytestmark = pytest.mark.numerics

VARIANTS = [KFAC, EKFAC, TKFAC, TEKFAC]
EXACT = dict(stat_decay=0.0, momentum=0.0, curvature_every=1, inverse_every=1)  # one batch, no averaging
CONVS = {
    "3x3": dict(kernel_size=3, padding=1),
    "stride2-dilation2": dict(kernel_size=3, padding=2, stride=2, dilation=2),
    "5x5-no-padding": dict(kernel_size=5),
}


def _linear(n: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(4, 3).double()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    return layer, (lambda out: out), x, y


def _conv(n: int = 4, seed: int = 0, **geometry):
    torch.manual_seed(seed)
    layer = nn.Conv2d(2, 3, **geometry).double()
    x, y = torch.randn(n, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (n,))
    return layer, (lambda out: out.mean((2, 3))), x, y  # a conv's outputs averaged into 3 logits


LAYERS = {"linear": _linear, **{f"conv-{name}": (lambda g=g: _conv(**g)) for name, g in CONVS.items()}}


def _backward(layer, head, x, y) -> None:
    layer.zero_grad()
    nn.functional.cross_entropy(head(layer(x)), y).backward()


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_captured_batch_and_factors_equal_their_definitions(make):
    layer, head, x, y = make()
    group = kfac_param_groups(layer)[0]
    assert group["layer"] == (LINEAR if isinstance(layer, nn.Linear) else CONV2D)
    _backward(layer, head, x, y)
    a, e = layer_batch(group)
    batch = ref.single_layer_batch(layer, head, x, y)
    np.testing.assert_allclose(a.numpy(), batch.a, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e.numpy(), batch.delta, rtol=1e-10, atol=1e-14)
    A, G = kfac_factors(a, e)
    A_ref, G_ref = ref.kfac_factors(batch)
    np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(G.numpy(), G_ref, rtol=1e-10, atol=1e-16)
    # the per-sample gradients sum_t e a^T are autograd's, and their mean the batch gradient
    np.testing.assert_allclose(np.einsum("nto,nti->noi", batch.delta, batch.a), batch.dW, rtol=1e-10, atol=1e-14)


def test_one_sample_kfac_is_the_exact_fisher_and_its_step_the_damped_kronecker_solve():
    layer, head, x, y = _linear(n=1)
    batch = ref.single_layer_batch(layer, head, x, y)
    A, G = ref.kfac_factors(batch)
    fisher = np.outer(batch.dW[0].reshape(-1, order="F"), batch.dW[0].reshape(-1, order="F"))
    np.testing.assert_allclose(np.kron(A, G), fisher, rtol=1e-12, atol=1e-15)  # exact for one sample

    damping, lr = 1e-2, 0.5
    gamma_a, gamma_g = ref.factored_damping(A, G, damping)
    expected = _weights(layer) - lr * ref.kronecker_solve(A + gamma_a * np.eye(len(A)), G + gamma_g * np.eye(len(G)), batch.grad)
    optimizer = KFAC(kfac_param_groups(layer), lr=lr, damping=damping, **EXACT)
    _backward(layer, head, x, y)
    optimizer.step()
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_kfac_step_is_the_factored_damped_solve(make):
    layer, head, x, y = make()
    batch = ref.single_layer_batch(layer, head, x, y)
    A, G = ref.kfac_factors(batch)
    damping, lr = 1e-3, 0.1
    gamma_a, gamma_g = ref.factored_damping(A, G, damping)
    expected = _weights(layer) - lr * ref.kronecker_solve(A + gamma_a * np.eye(len(A)), G + gamma_g * np.eye(len(G)), batch.grad)
    _one_step(KFAC, layer, head, x, y, lr=lr, damping=damping)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_ekfac_with_exact_moments_is_diagonal_in_the_kronecker_eigenbasis(make):
    layer, head, x, y = make()
    batch = ref.single_layer_batch(layer, head, x, y)
    A, G = ref.kfac_factors(batch)
    damping, lr = 1e-3, 0.1
    expected = _weights(layer) - lr * ref.eigenbasis_direction(A, G, batch.dW, batch.grad, damping)
    _one_step(EKFAC, layer, head, x, y, lr=lr, damping=damping)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_tkfac_keeps_the_trace_of_the_fisher_block(make):
    layer, head, x, y = make()
    batch = ref.single_layer_batch(layer, head, x, y)
    phi, psi, trace = ref.tkfac_terms(batch)
    optimizer = _one_step(TKFAC, layer, head, x, y, lr=0.0)
    state = optimizer.state[layer.weight]
    np.testing.assert_allclose(state[FACTOR_IN].numpy(), phi, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(state[FACTOR_OUT].numpy(), psi, rtol=1e-10, atol=1e-16)
    assert float(state[TRACE]) == pytest.approx(trace, rel=1e-12)  # E ||dW_n||^2: the Fisher block's trace
    scaled_in, scaled_out = optimizer._factors(optimizer.param_groups[0], state)
    assert float(torch.trace(scaled_in) * torch.trace(scaled_out)) == pytest.approx(trace, rel=1e-12)
    if isinstance(layer, nn.Linear):  # the paper's delta: both traces equal tr F for a linear layer
        assert np.trace(phi) == pytest.approx(trace, rel=1e-12) and np.trace(psi) == pytest.approx(trace, rel=1e-12)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("variant", [TKFAC, TEKFAC])
def test_trace_restricted_steps_with_their_damping(make, variant):
    """TKFAC: the damped solve on the trace-scaled factors; TEKFAC: EKFAC's rule in their eigenbasis.
    Convolutions damp with max(conv_damping tr(F) / (o i), damping), linear layers with damping."""
    layer, head, x, y = make()
    batch = ref.single_layer_batch(layer, head, x, y)
    phi, psi, trace = ref.tkfac_terms(batch)
    c = trace / (np.trace(phi) * np.trace(psi))
    phi, psi = np.sqrt(c) * phi, np.sqrt(c) * psi
    damping, conv_damping, lr = 1e-6, 0.3, 0.1
    if isinstance(layer, nn.Conv2d):
        damping_l = max(conv_damping * trace / batch.grad.size, damping)
        assert damping_l > 10 * damping  # the relative damping, not the floor, is what this case checks
    else:
        damping_l = damping
    if variant is TKFAC:
        gamma_in, gamma_out = ref.factored_damping(phi, psi, damping_l)
        direction = ref.kronecker_solve(phi + gamma_in * np.eye(len(phi)), psi + gamma_out * np.eye(len(psi)), batch.grad)
    else:
        direction = ref.eigenbasis_direction(phi, psi, batch.dW, batch.grad, damping_l)
    expected = _weights(layer) - lr * direction
    _one_step(variant, layer, head, x, y, lr=lr, damping=damping, conv_damping=conv_damping)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-7, atol=1e-12)


def test_curvature_is_a_bias_corrected_running_average():
    """Two batches, beta = 0.8: the factor that is inverted is (beta (1 - beta) A_1 + (1 - beta) A_2) / (1 - beta^2)."""
    layer, head, x, y = _conv(n=6, **CONVS["3x3"])
    beta, damping, lr = 0.8, 1e-3, 0.05
    optimizer = KFAC(kfac_param_groups(layer), lr=lr, damping=damping, stat_decay=beta, momentum=0.0, curvature_every=1, inverse_every=1)
    factors = []
    for half in (slice(0, 3), slice(3, 6)):
        batch = ref.single_layer_batch(layer, head, x[half], y[half])  # at the weights this step starts from
        factors.append(ref.kfac_factors(batch))
        before = _weights(layer)
        _backward(layer, head, x[half], y[half])
        optimizer.step()
    A, G = ((beta * (1 - beta) * f1 + (1 - beta) * f2) / (1 - beta**2) for f1, f2 in zip(*factors))
    state = optimizer.state[layer.weight]
    np.testing.assert_allclose(state[FACTOR_IN].numpy() / (1 - beta**2), A, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(state[FACTOR_OUT].numpy() / (1 - beta**2), G, rtol=1e-10, atol=1e-16)
    gamma_a, gamma_g = ref.factored_damping(A, G, damping)
    expected = before - lr * ref.kronecker_solve(A + gamma_a * np.eye(len(A)), G + gamma_g * np.eye(len(G)), batch.grad)
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-8, atol=1e-12)


def test_curvature_and_inverse_schedules(monkeypatch):
    calls = {"curvature": [], "inverse": []}
    layer, head, x, y = _conv(**CONVS["3x3"])
    optimizer = EKFAC(kfac_param_groups(layer), lr=1e-3, curvature_every=2, inverse_every=3)
    state = lambda: int(optimizer.state[layer.weight]["step"]) if optimizer.state else 1  # noqa: E731
    real_factors, real_eigh = kfac_module.kfac_factors, kfac_module.eigh_decomposition
    monkeypatch.setattr(kfac_module, "kfac_factors", lambda a, e: calls["curvature"].append(state()) or real_factors(a, e))
    monkeypatch.setattr(kfac_module, "eigh_decomposition", lambda A: calls["inverse"].append(state()) or real_eigh(A))
    for _ in range(8):
        _backward(layer, head, x, y)
        optimizer.step()
    assert calls["curvature"] == [1, 3, 5, 7]
    assert calls["inverse"] == [t for t in (1, 4, 7) for _ in range(2)]  # one batched eigh per factor size (19, 3)


def test_momentum_and_decoupled_weight_decay():
    """b <- mu b + D and W <- W (1 - lr wd) - lr b, checked against the same optimizer without them."""
    layer, head, x, y = _linear()
    twin = copy.deepcopy(layer)
    plain = KFAC(kfac_param_groups(twin), lr=0.1, stat_decay=0.0, momentum=0.0, curvature_every=1, inverse_every=1)
    full = KFAC(kfac_param_groups(layer), lr=0.1, stat_decay=0.0, momentum=0.5, weight_decay=0.2, curvature_every=1, inverse_every=1)
    buffer = 0.0
    for _ in range(3):
        start = _weights(layer)
        with torch.no_grad():
            _set_weights(twin, start)
        for net, opt in ((layer, full), (twin, plain)):
            _backward(net, head, x, y)
            opt.step()
        direction = (start - _weights(twin)) / 0.1
        buffer = 0.5 * buffer + direction
        np.testing.assert_allclose(_weights(layer), start * (1 - 0.1 * 0.2) - 0.1 * buffer, rtol=1e-10, atol=1e-13)


def test_kl_clip_scales_the_step_to_the_predicted_kl_bound():
    """With kl_clip the step is nu D, nu = min(1, sqrt(kl_clip / (lr^2 <D, g>))), D the unclipped direction."""
    layer, head, x, y = _conv(**CONVS["3x3"])
    twin = copy.deepcopy(layer)
    lr, clip = 0.1, 1e-6
    start = _weights(layer)
    _one_step(EKFAC, twin, head, x, y, lr=lr)
    direction = (start - _weights(twin)) / lr
    grad = ref.single_layer_batch(layer, head, x, y).grad
    nu = min(1.0, np.sqrt(clip / (lr**2 * np.sum(direction * grad))))
    assert nu < 0.1  # the clip is active
    _one_step(EKFAC, layer, head, x, y, lr=lr, kl_clip=clip)
    np.testing.assert_allclose(_weights(layer), start - lr * nu * direction, rtol=1e-9, atol=1e-13)


def test_adam_group_is_torch_adam():
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, adam = KFAC([{"params": [p], "layer": ADAM}], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    for _ in range(10):
        g = torch.randn(5, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        adam.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.__name__)
def test_float32_follows_float64(variant):
    """EKFAC and TEKFAC with one batch's curvature: a factor of rank < its size (the test net's linear layer:
    16 samples, 129 inputs) has a degenerate null space whose basis eigh picks arbitrarily, differently in
    float32 and float64, and a running average of ``S`` mixes moments recorded in those arbitrary
    coordinates (measured: 20 % apart after 8 steps; 8e-6 with one batch's curvature)."""
    averaging = dict(stat_decay=0.0, inverse_every=1) if variant in (EKFAC, TEKFAC) else dict(inverse_every=3)
    assert_float32_follows_float64(lambda net: variant(kfac_param_groups(net), lr=1e-3, curvature_every=1, **averaging), 8)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.__name__)
def test_state_dict_resume_is_bit_identical(variant):
    resumed = assert_resume_is_bit_identical(
        lambda n: variant(kfac_param_groups(n), lr=1e-3, weight_decay=0.01, curvature_every=2, inverse_every=3), 5, 7
    )
    assert all(FACTOR_IN in s for s in resumed.state.values() if "curvature_updates" in s)


def test_groups_are_read_off_the_modules():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2, bias=False))
    groups = kfac_param_groups(net)
    assert [(g["layer"], [tuple(p.shape) for p in g["params"]]) for g in groups] == [
        (CONV2D, [(4, 3, 3, 3), (4,)]),
        (LINEAR, [(2, 4)]),
        (ADAM, [(4,), (4,), (4, 2, 3, 3), (4,)]),  # batch norm and the grouped convolution
    ]


INVALID = [("lr", -1.0), ("momentum", 1.0), ("stat_decay", -0.1), ("damping", 0.0), ("conv_damping", 0.0),
           ("weight_decay", -1.0), ("curvature_every", 0), ("inverse_every", 2.5), ("kl_clip", 0.0),
           ("adam_betas", (0.9, 1.0))]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_rejects_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: ")):
        KFAC(kfac_param_groups(nn.Linear(2, 2)), **{name: value})


def test_plain_parameters_are_rejected_with_a_hint():
    with pytest.raises(ValueError, match=r"kfac_param_groups\(model\)"):
        KFAC(nn.Linear(2, 2).parameters())


def _one_step(variant, layer, head, x, y, **hyper):
    optimizer = variant(kfac_param_groups(layer), **{**EXACT, **hyper})
    _backward(layer, head, x, y)
    optimizer.step()
    return optimizer


def _weights(layer: nn.Module) -> np.ndarray:
    """``[o, i]``: the weight reshaped with the bias as the last column."""
    o = layer.weight.shape[0]
    return np.concatenate([layer.weight.detach().reshape(o, -1).numpy(), layer.bias.detach().numpy()[:, None]], 1)


def _set_weights(layer: nn.Module, matrix: np.ndarray) -> None:
    layer.weight.copy_(torch.from_numpy(matrix[:, :-1]).reshape(layer.weight.shape))
    layer.bias.copy_(torch.from_numpy(matrix[:, -1]))
