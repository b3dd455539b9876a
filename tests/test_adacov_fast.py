"""AdaCov's fast mode: a cached eigenbasis per kernel, checked every T steps and decomposed again when it drifted."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from adacov import AdaCov
from adacov.optim import adacov as adacov_module
from adacov.optim.adacov import BASIS, BASIS_EIG_COV, BASIS_EIG_DIAG, EXP_COV, EXP_COV_FOLDED, EXP_COV_SCALE, STEP
from adacov.optim.adacov import folded_covariance
from adacov.optim.matrix_functions import add_folded_outer, fold_symmetric, offdiagonal_mass, symmetric_eigh, unfold_symmetric
from tests.helpers import (
    assert_float32_follows_float64,
    assert_resume_is_bit_identical,
    batches,
    loss_and_backward,
    run_side_by_side,
    small_convnet,
)
from tests.reference import ReferenceFastAdaCov, relative_difference

pytestmark = pytest.mark.numerics

KW = dict(lr=1e-2, cov_eps=1e-5, offdiag_warmup=5.0, weight_decay=0.01)


@pytest.fixture
def decomposed(monkeypatch):
    """The number of blocks each call of AdaCov's batched eigh decomposes."""
    counts: list[int] = []
    real = adacov_module.symmetric_eigh

    def counting(A, out=None):
        counts.append(A.shape[0])
        return real(A, out=out)

    monkeypatch.setattr(adacov_module, "symmetric_eigh", counting)
    return counts


@pytest.mark.parametrize("d", [9, 25, 4, 8])
def test_folded_storage_holds_the_symmetric_block_and_its_update(d):
    g = torch.Generator().manual_seed(d)
    C = torch.randn(5, d, d, generator=g, dtype=torch.float64)
    C = C + C.mT
    folded = fold_symmetric(C)
    assert folded.shape == (5, d // 2 + 1, d)
    assert torch.equal(unfold_symmetric(folded, torch.empty_like(C)), C)
    assert torch.equal(folded[:, 0], C.diagonal(dim1=-2, dim2=-1))
    grad = torch.randn(5, d, generator=g, dtype=torch.float64)
    add_folded_outer(folded, grad, 0.1)
    expected = C + 0.1 * grad[:, :, None] * grad[:, None, :]
    torch.testing.assert_close(unfold_symmetric(folded, torch.empty_like(C)), expected, rtol=1e-14, atol=1e-14)


def test_offdiagonal_mass_is_zero_in_the_eigenbasis_and_normalized_by_the_diagonal():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    C = X @ X.mT
    _, Q = symmetric_eigh(C)
    assert offdiagonal_mass(Q.mT @ C @ Q, 1.0, 0.0).abs().max() < 1e-12
    A = torch.tensor([[[4.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)  # off-diagonal 1 / sqrt(4 * 1), twice
    torch.testing.assert_close(offdiagonal_mass(A, 1.0, 0.0), torch.tensor([(2 * 0.25) ** 0.5], dtype=torch.float64))
    # scaled by 2 and shifted by 1: diagonal (9, 3), off-diagonal 2
    torch.testing.assert_close(offdiagonal_mass(A, 2.0, 1.0), torch.tensor([(2 * 4 / 27) ** 0.5], dtype=torch.float64))


def test_refresh_every_step_is_bit_identical_to_the_exact_path():
    net = small_convnet(torch.float32)
    twin = copy.deepcopy(net)
    exact = AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0)
    explicit = AdaCov(twin.parameters(), lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=1, basis_refresh_warmup=0)
    for x, y in batches(15, dtype=torch.float32):
        for model, opt in ((net, exact), (twin, explicit)):
            loss_and_backward(model, x, y)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


@pytest.mark.parametrize(
    ("every", "warmup", "threshold"), [(4, 3, 0.0), (10, 0, 0.0), (3, 2, 2.0)], ids=["staggered", "no-warmup", "drifted-only"]
)
def test_matches_the_reference_rule(every, warmup, threshold, decomposed):
    """Against the float64 reference written from the rule, kernel by kernel, with the same kernels decomposed at
    each step (threshold 2.0 on this fast-moving net: some checked kernels are decomposed, some are not)."""
    net = small_convnet()
    ref = ReferenceFastAdaCov([tuple(p.shape) for p in net.parameters()], every=every, warmup=warmup, threshold=threshold, **KW)
    make = lambda n: AdaCov(n.parameters(), basis_refresh_every=every, basis_refresh_warmup=warmup,  # noqa: E731
                            basis_drift_threshold=threshold, **KW)  # fmt: skip
    ours, theirs = run_side_by_side(net, make, ref, n_steps=30)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-9
    assert sum(decomposed) == sum(ref.decomposed)
    checked = sum(-(-n // every) for n in (6, 12)) if threshold else 0  # at most ceil(B / T) kernels a tensor
    if threshold:
        after = ref.decomposed[warmup:]
        assert 0 < min(after) and max(after) <= checked and min(after) < checked


def test_the_folded_scale_multiplies_in_when_small():
    """C is kept as c F with c <- beta2 c; with beta2 = 0.5, c falls below 2^-20 at step 21 and multiplies into F."""
    net = small_convnet()
    kw = {**KW, "betas": (0.9, 0.5)}
    ref = ReferenceFastAdaCov([tuple(p.shape) for p in net.parameters()], every=3, warmup=2, threshold=0.0, **kw)
    optimizer = None

    def make(n):
        nonlocal optimizer
        optimizer = AdaCov(n.parameters(), basis_refresh_every=3, basis_refresh_warmup=2, basis_drift_threshold=0.0, **kw)
        return optimizer

    ours, theirs = run_side_by_side(net, make, ref, n_steps=25)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-9
    assert float(optimizer.state[net[0].weight][EXP_COV_SCALE]) == 0.5**4


def test_cached_steps_differ_from_exact_steps():
    """Guard for the test above: the stale basis really is stale between decompositions."""
    net = small_convnet()
    twin = copy.deepcopy(net)
    fast = AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=10, basis_refresh_warmup=0,
                  basis_drift_threshold=1e9)  # fmt: skip
    exact = AdaCov(twin.parameters(), lr=1e-2, offdiag_warmup=5.0)
    for x, y in batches(9):
        for model, opt in ((net, fast), (twin, exact)):
            loss_and_backward(model, x, y)
            opt.step()
    assert relative_difference(net[2].weight.detach().numpy(), twin[2].weight.detach().numpy()) > 1e-6


def test_staggered_schedule(decomposed):
    """Every kernel through the warm-up (steps 1-3), then the c-th of 5 contiguous ranges of each tensor:
    floor(c B / 5) to floor((c + 1) B / 5) for the 3x3 conv's 6 and the 5x5 conv's 12 kernels (one eigh call per
    kernel size)."""
    net = small_convnet()
    optimizer = AdaCov(net.parameters(), basis_refresh_every=5, basis_refresh_warmup=3, basis_drift_threshold=0.0)
    for x, y in batches(13):
        loss_and_backward(net, x, y)
        optimizer.step()
    ranges = [[(c + 1) * blocks // 5 - c * blocks // 5 for c in range(5)] for blocks in (6, 12)]
    assert decomposed == [6, 12] * 3 + [ranges[size][c] for c in [0, 1, 2, 3, 4] * 2 for size in (0, 1)]


def test_no_kernel_is_decomposed_when_none_drifted(decomposed):
    net = small_convnet()
    optimizer = AdaCov(net.parameters(), basis_refresh_every=2, basis_refresh_warmup=2, basis_drift_threshold=1e9)
    for x, y in batches(6):
        loss_and_backward(net, x, y)
        optimizer.step()
    assert decomposed == [6, 12] * 2


def test_float32_follows_float64():
    assert_float32_follows_float64(
        lambda net: AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=3, basis_refresh_warmup=2,
                           basis_drift_threshold=0.0), 10)  # fmt: skip


def test_state_dict_round_trip_in_fast_mode_is_bit_identical():
    kw = dict(lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=4, basis_refresh_warmup=2, basis_drift_threshold=1.0)
    resumed = assert_resume_is_bit_identical(lambda n: AdaCov(n.parameters(), **kw), 7, 9)
    assert any(BASIS in state for state in resumed.state.values())


def _trained(n_steps, **kw):
    net = small_convnet()
    optimizer = AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0, **kw)
    for x, y in batches(n_steps):
        loss_and_backward(net, x, y)
        optimizer.step()
    return net, optimizer


def _go_on(net, optimizer, n_steps):
    for x, y in batches(n_steps, seed=2):
        loss_and_backward(net, x, y)
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


def test_a_checkpoint_of_the_earlier_fast_layout_loads_and_goes_on():
    """Fast mode before issue 23 kept C full and tracked lambda_D = diag(Q^T diag(C) Q) every step under
    ``basis_eig_diag``: such a state is converted on its next step and goes on as the new layout would."""
    fast = dict(basis_refresh_every=3, basis_refresh_warmup=2, basis_drift_threshold=0.5)
    net, optimizer = _trained(6, **fast)
    earlier = copy.deepcopy(optimizer.state_dict())
    for state in earlier["state"].values():
        if EXP_COV_FOLDED in state:
            state[EXP_COV] = folded_covariance(state)
            del state[EXP_COV_FOLDED], state[EXP_COV_SCALE]
            state["basis_eig_diag"] = state.pop(BASIS_EIG_DIAG) * (1 - 0.999 ** int(state[STEP].item()))
    twin = copy.deepcopy(net)
    loaded = AdaCov(twin.parameters(), **fast)
    loaded.load_state_dict(earlier)
    expected, found = _go_on(net, optimizer, 5), _go_on(twin, loaded, 5)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert all("basis_eig_diag" not in state and EXP_COV not in state for state in loaded.state.values())


@pytest.mark.parametrize("direction", ["exact to fast", "fast to exact"])
def test_a_checkpoint_of_the_other_mode_loads(direction):
    """A checkpoint of one mode, loaded and switched to the other (``load_state_dict`` restores the saved groups'
    settings, so the switch is set after it): the state is converted and the next step is the exact step, exact
    mode's or fast mode's first step without a basis, which decomposes every kernel. The reference takes the exact
    step from the same checkpoint in its own mode (fast mode through a warm-up that decomposes every kernel)."""
    fast = dict(basis_refresh_every=3, basis_refresh_warmup=0, basis_drift_threshold=1e9)
    first, then = ({}, fast) if direction == "exact to fast" else (fast, {})
    net, optimizer = _trained(4, **first)
    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    found, expected = [], []
    for into, out in ((then, found), ({**first, "basis_refresh_warmup": 100} if first else first, expected)):
        twin = copy.deepcopy(net)
        loaded = AdaCov(twin.parameters(), lr=1e-2, offdiag_warmup=5.0, **into)
        saved.seek(0)
        loaded.load_state_dict(torch.load(saved))
        for group in loaded.param_groups:
            group.update(into or {"basis_refresh_every": 1})
        out += _go_on(twin, loaded, 1)
        keys = {key for state in loaded.state.values() for key in state}
        assert (EXP_COV_FOLDED in keys) == bool(into.get("basis_refresh_every", 1) > 1) != (EXP_COV in keys)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("every", [1, 10])
def test_memory_bytes_counts_state_and_workspace(every):
    """Closed form for one 3x3 conv ``[3, 2, 3, 3]`` (6 blocks of 9 x 9) and its bias ``[3]``, float32."""
    conv = torch.nn.Conv2d(2, 3, 3)
    optimizer = AdaCov(conv.parameters(), basis_refresh_every=every, basis_refresh_warmup=0)
    conv(torch.randn(4, 2, 5, 5)).square().sum().backward()
    optimizer.step()
    blocks, d, f32 = 6, 9, 4
    expected = {
        "step": 2 * f32,
        "exp_avg": (blocks * d + 3) * f32,
        "exp_avg_sq": 3 * f32,
        "eigh workspace": (2 * blocks * d * d + blocks * d) * f32,
    }
    if every == 1:
        expected["exp_cov"] = blocks * d * d * f32
    else:
        expected |= {
            "exp_cov_folded": blocks * d * (d // 2 + 1) * f32,
            "basis": blocks * d * d * f32,
            "basis_eig_cov": blocks * d * f32,
            "basis_eig_diag_hat": blocks * d * f32,
        }
    assert optimizer.memory_bytes() == expected
    assert (BASIS_EIG_COV in optimizer.state[conv.weight]) == (every > 1)
