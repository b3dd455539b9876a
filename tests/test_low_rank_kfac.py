"""RS-KFAC, SRE-KFAC and the Brand K-FACs against float64 references written from their definitions."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from adacov import BKFAC, KFAC, RSKFAC, SREKFAC, kfac_param_groups
from adacov.optim.factor_inverse import (
    brand_correction,
    brand_update,
    factor_rank,
    randomized_svd,
    sketched_eigh,
    solve_damped,
    truncated_dampings,
)
from adacov.optim.kfac import FACTOR_IN
from adacov.optim.low_rank_kfac import BRAND_BASIS_IN, BRAND_VALUES_IN
from tests import reference_kfac as ref
from tests.helpers import assert_resume_is_bit_identical, batches, loss_and_backward, small_convnet
from tests.test_kfac import CONVS, EXACT, _backward, _conv, _linear, _weights

pytestmark = pytest.mark.numerics

LOW_RANK = [RSKFAC, SREKFAC, BKFAC]
LAYERS = {"linear": _linear, "conv-3x3": lambda: _conv(**CONVS["3x3"])}


def _spd(n: int, decay: float, seed: int = 0) -> torch.Tensor:
    """A float64 ``n x n`` positive definite matrix with eigenvalues ``decay^k``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return q @ torch.diag(decay ** torch.arange(n, dtype=torch.float64)) @ q.T


def test_factor_rank_is_relative_to_the_size_with_a_floor():
    assert [factor_rank(n, 0.1, 32) for n in (10, 65, 145, 577, 1601)] == [10, 32, 32, 58, 161]
    assert factor_rank(7, 1.0, 1) == 7


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("variant", LOW_RANK, ids=lambda v: v.__name__)
@pytest.mark.parametrize("min_damping", [0.0, 1e-3], ids=["relative", "with-floor"])
def test_full_rank_is_kfac_with_the_truncated_damping_rule(make, variant, min_damping):
    """At r = n the step is (G + lambda_G I)^-1 grad (A + lambda_A I)^-1 with lambda_X = max(damping max eig X,
    floor_X), solved with the explicit Kronecker product."""
    layer, head, x, y = make()
    batch = ref.single_layer_batch(layer, head, x, y)
    A, G = ref.kfac_factors(batch)
    damping, lr = 0.05, 0.1
    gamma_a, gamma_g = ref.truncated_damping(A, G, damping, min_damping)
    expected = _weights(layer) - lr * ref.kronecker_solve(A + gamma_a * np.eye(len(A)), G + gamma_g * np.eye(len(G)), batch.grad)
    optimizer = variant(kfac_param_groups(layer), lr=lr, damping=damping, min_damping=min_damping, rank_fraction=1.0, **EXACT)
    _backward(layer, head, x, y)
    optimizer.step()
    np.testing.assert_allclose(_weights(layer), expected, rtol=1e-9, atol=1e-12)


def test_randomized_svd_is_torch_svd_lowrank_with_the_sketch_it_draws():
    """Given the Gaussian sketch that torch.svd_lowrank draws from the global stream, the same top pairs."""
    A = _spd(40, 0.8)
    torch.manual_seed(3)
    U, S, _ = torch.svd_lowrank(A, q=12, niter=2)
    torch.manual_seed(3)
    sketch = torch.randn(40, 12, dtype=torch.float64)
    Q, d = randomized_svd(A.unsqueeze(0), sketch.unsqueeze(0), 2, 12)
    torch.testing.assert_close(d[0], S, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((Q[0] * d[0]) @ Q[0].T, (U * S) @ U.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decompose", [randomized_svd, sketched_eigh], ids=["rsvd", "sketched-eigh"])
def test_low_rank_decompositions_find_the_top_eigenpairs(decompose):
    """A decaying spectrum (0.7^k), r = 8 with 10 oversampled columns: the top 8 eigenpairs to 1e-7; batched."""
    A = torch.stack([_spd(60, 0.7, seed) for seed in range(2)])
    values, vectors = torch.linalg.eigh(A)
    Q, d = decompose(A, torch.randn(2, 60, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 3, 8)
    torch.testing.assert_close(d, values.flip(-1)[:, :8], rtol=1e-7, atol=1e-14)
    overlap = (Q.mT @ vectors.flip(-1)[..., :8]).abs()  # |<q_j, v_j>| = 1: the same vectors up to sign
    torch.testing.assert_close(overlap.diagonal(dim1=-2, dim2=-1), torch.ones(2, 8, dtype=torch.float64), rtol=0, atol=1e-6)


def test_truncated_inverse_is_the_inverse_of_the_truncated_damped_factor():
    """Q [diag(1/(d + l)) - 1/l] Q^T M + M / l = (Q diag(d) Q^T + l I)^-1 M for a rank-5 factor of size 12."""
    Q = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64)).Q
    d, shift, M = torch.rand(5, dtype=torch.float64) + 0.1, torch.tensor(0.3, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    expected = torch.linalg.solve((Q * d) @ Q.T + shift * torch.eye(12, dtype=torch.float64), M)
    torch.testing.assert_close(solve_damped(Q, d, shift, M), expected, rtol=1e-12, atol=1e-13)


def test_truncated_dampings_floor_is_the_factored_damping():
    """With eigenvalues (4, 1) and (0.01,): relative 0.1 gives (0.4, 0.001); the floor of 1e-2 is
    (pi sqrt(1e-2), sqrt(1e-2) / pi) with pi^2 = (5 / 2) / 0.01, which the input side's relative value exceeds."""
    factor_in = (torch.eye(2, dtype=torch.float64), torch.tensor([4.0, 1.0], dtype=torch.float64))
    factor_out = (torch.eye(1, dtype=torch.float64), torch.tensor([0.01], dtype=torch.float64))
    relative = truncated_dampings(factor_in, factor_out, 0.1, 0.0)
    assert [float(v) for v in relative] == pytest.approx([0.4, 0.001])
    pi = np.sqrt(2.5 / 0.01)
    floored = truncated_dampings(factor_in, factor_out, 0.1, 1e-2)
    assert [float(v) for v in floored] == pytest.approx([max(0.4, pi * 0.1), 0.1 / pi])


def test_brand_update_without_truncation_is_eigh_of_the_accumulated_factor():
    """Four updates of 3 columns each into 12 slots of a 20 x 20 factor (decay 0.7): nothing is cut, and (U, D)
    is the eigendecomposition of 0.7 X + C C^T accumulated explicitly."""
    g = torch.Generator().manual_seed(0)
    columns = [torch.randn(20, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    basis, values = torch.zeros(1, 20, 12, dtype=torch.float64), torch.zeros(1, 12, dtype=torch.float64)
    for c in columns:
        basis, values = brand_update(basis, values, c.unsqueeze(0), 0.7)
    expected = ref.explicit_average([c.numpy() for c in columns], 0.7)
    np.testing.assert_allclose(((basis[0] * values[0]) @ basis[0].T).numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(values[0].numpy(), np.linalg.eigvalsh(expected)[::-1][:12], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(basis[0].T @ basis[0], torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)


def test_brand_update_truncates_to_the_top_of_the_update():
    """With 4 slots, one update of a rank-4 factor by 3 columns keeps the top 4 eigenpairs of 0.5 X + C C^T."""
    g = torch.Generator().manual_seed(1)
    start = torch.linalg.qr(torch.randn(15, 4, generator=g, dtype=torch.float64)).Q
    values = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    columns = torch.randn(15, 3, generator=g, dtype=torch.float64)
    _, kept = brand_update(start.unsqueeze(0), values.unsqueeze(0), columns.unsqueeze(0), 0.5)
    full = 0.5 * (start * values) @ start.T + columns @ columns.T
    np.testing.assert_allclose(kept[0].numpy(), np.linalg.eigvalsh(full.numpy())[::-1][:4], rtol=1e-10)


def test_brand_correction_refits_the_sampled_columns_to_the_factor():
    """The sampled columns become the eigenvectors of Q_s^T X Q_s, scaled by its eigenvalues; the others stay."""
    X = _spd(10, 0.6)
    basis = torch.linalg.qr(torch.randn(10, 6, dtype=torch.float64)).Q
    values = torch.rand(6, dtype=torch.float64)
    index = torch.tensor([[1, 4]])
    new_basis, new_values = brand_correction(basis.unsqueeze(0), values.unsqueeze(0), X.unsqueeze(0), index)
    picked = new_basis[0][:, [1, 4]]
    torch.testing.assert_close(picked.T @ X @ picked, torch.diag(new_values[0][[1, 4]]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new_basis[0].T @ new_basis[0], torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    for j in (0, 2, 3, 5):
        assert torch.equal(new_basis[0][:, j], basis[:, j]) and new_values[0][j] == values[j]


def _linear_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _linear_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 40, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize(
    ("settings", "keeps"), [({}, False), ({"brand_refresh_every": 1}, True), ({"brand_correction": 0.5}, True)],
    ids=["b_kfac", "b_r_kfac", "b_kfac_c"],
)
def test_brand_factors_track_the_running_average(settings, keeps):
    """A linear layer of 41 inputs fed 4 samples (r = 17: 17 + 4 < 41) keeps a Brand decomposition of its input
    factor (B-KFAC: and not the factor itself); the other factors are at full rank (min_rank 7). No column is ever
    cut (4 steps of rank 4 < 17), so U D U^T equals the explicit running average; B-R-KFAC's refreshes and B-KFAC-c's
    corrections keep it, and the steps equal full-rank RS-KFAC's."""
    net, twin = _linear_net(), _linear_net()
    options = dict(lr=0.1, curvature_every=1, inverse_every=1, stat_decay=0.6, damping=0.05, min_damping=0.0)
    brand = BKFAC(kfac_param_groups(net), rank_fraction=0.4, min_rank=7, **options, **settings)
    exact = RSKFAC(kfac_param_groups(twin), rank_fraction=1.0, **options)
    rows = []
    for x, y in _linear_batches(4):
        rows.append(torch.cat([x, torch.ones(4, 1, dtype=torch.float64)], 1).T.numpy() * np.sqrt(0.4 / 4))
        for model, optimizer in ((net, brand), (twin, exact)):
            loss_and_backward(model, x, y)
            optimizer.step()
    state = brand.state[net[0].weight]
    assert (FACTOR_IN in state) == keeps and state[BRAND_BASIS_IN].shape == (41, 17)
    average = ref.explicit_average(rows, 0.6)
    np.testing.assert_allclose(((state[BRAND_BASIS_IN] * state[BRAND_VALUES_IN]) @ state[BRAND_BASIS_IN].T).numpy(), average, rtol=1e-9, atol=1e-12)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: RSKFAC(kfac_param_groups(n), lr=1e-3, curvature_every=2, inverse_every=3, rank_fraction=0.25, min_rank=2, weight_decay=0.01),
        lambda n: SREKFAC(kfac_param_groups(n), lr=1e-3, curvature_every=2, inverse_every=3, rank_fraction=0.25, min_rank=2),
        lambda n: BKFAC(kfac_param_groups(n), lr=1e-3, curvature_every=1, inverse_every=2, rank_fraction=0.25, min_rank=2, brand_refresh_every=2),
        lambda n: BKFAC(kfac_param_groups(n), lr=1e-3, curvature_every=1, inverse_every=2, rank_fraction=0.25, min_rank=2, brand_correction=0.3),
    ],
    ids=["rs_kfac", "sre_kfac", "b_r_kfac", "b_kfac_c"],
)
def test_state_dict_resume_is_bit_identical(make):
    """The sketches and sampled columns come from each layer's stream in the state: a resumed run draws the same."""
    resumed = assert_resume_is_bit_identical(make, 5, 6)
    assert any(BRAND_BASIS_IN in s for s in resumed.state.values()) == isinstance(resumed, BKFAC)


def test_the_seed_picks_the_sketches():
    """Two seeds take different steps at low rank; the same seed the same steps, bit for bit."""
    runs = []
    for seed in (0, 0, 1):
        net = small_convnet(torch.float64)
        optimizer = RSKFAC(kfac_param_groups(net), lr=1e-2, curvature_every=1, inverse_every=1, rank_fraction=0.1, min_rank=1, niter=0, seed=seed)
        for x, y in batches(2):
            loss_and_backward(net, x, y)
            optimizer.step()
        runs.append(list(net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


INVALID = [("rank_fraction", 0.0), ("rank_fraction", 1.5), ("min_rank", 0), ("oversample", -1), ("niter", -1),
           ("seed", -1), ("min_damping", -1.0), ("brand_refresh_every", 0), ("brand_correction", 0.0)]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_rejects_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}: ")):
        BKFAC(kfac_param_groups(nn.Linear(2, 2)), **{name: value})


def test_kfac_itself_takes_no_low_rank_settings():
    with pytest.raises(TypeError):
        KFAC(kfac_param_groups(nn.Linear(2, 2)), rank_fraction=0.5)
