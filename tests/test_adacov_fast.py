"""AdaCov's fast mode: a cached eigenbasis refreshed every T steps."""

from __future__ import annotations

import copy

import pytest
import torch

from adacov import AdaCov
from adacov.optim import adacov as adacov_module
from tests.helpers import assert_resume_is_bit_identical, batches, loss_and_backward, run_side_by_side, small_convnet
from tests.reference import ReferenceFastAdaCov, relative_difference

pytestmark = pytest.mark.numerics


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


@pytest.mark.parametrize(("every", "warmup"), [(4, 3), (10, 0)])
def test_matches_the_cached_basis_rule(every, warmup):
    net = small_convnet()
    kw = dict(lr=1e-2, cov_eps=1e-5, offdiag_warmup=5.0, weight_decay=0.01)
    ref = ReferenceFastAdaCov([tuple(p.shape) for p in net.parameters()], every=every, warmup=warmup, **kw)
    make = lambda n: AdaCov(n.parameters(), basis_refresh_every=every, basis_refresh_warmup=warmup, **kw)  # noqa: E731
    ours, theirs = run_side_by_side(net, make, ref, n_steps=30)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-6


def test_cached_steps_differ_from_exact_steps():
    """Guard for the test above: the stale basis really is stale between refreshes."""
    net = small_convnet()
    twin = copy.deepcopy(net)
    fast = AdaCov(net.parameters(), lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=10, basis_refresh_warmup=0)
    exact = AdaCov(twin.parameters(), lr=1e-2, offdiag_warmup=5.0)
    for x, y in batches(9):
        for model, opt in ((net, fast), (twin, exact)):
            loss_and_backward(model, x, y)
            opt.step()
    assert relative_difference(net[2].weight.detach().numpy(), twin[2].weight.detach().numpy()) > 1e-6


def test_refresh_schedule(monkeypatch):
    refreshed = []
    real = adacov_module.symmetric_eigh
    optimizer = None

    def counting(A, out=None):
        refreshed.append(int(optimizer.state[net[0].weight]["step"].item()))
        return real(A, out=out)

    monkeypatch.setattr(adacov_module, "symmetric_eigh", counting)
    net = small_convnet()
    optimizer = AdaCov(net.parameters(), basis_refresh_every=5, basis_refresh_warmup=3)
    for x, y in batches(20):
        loss_and_backward(net, x, y)
        optimizer.step()
    # one eigh per kernel size (3x3 and 5x5) on each refresh step
    assert refreshed == [t for t in (1, 2, 3, 4, 9, 14, 19) for _ in range(2)]


def test_state_dict_round_trip_in_fast_mode_is_bit_identical():
    kw = dict(lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=4, basis_refresh_warmup=2)
    resumed = assert_resume_is_bit_identical(lambda n: AdaCov(n.parameters(), **kw), 7, 9)
    assert any("basis" in state for state in resumed.state.values())


@pytest.mark.parametrize("every", [1, 10])
def test_memory_bytes_counts_state_caches_and_workspace(every):
    """Closed form for one 3x3 conv ``[3, 2, 3, 3]`` (6 blocks of 9 x 9) and its bias ``[3]``, float32."""
    conv = torch.nn.Conv2d(2, 3, 3)
    optimizer = AdaCov(conv.parameters(), basis_refresh_every=every, basis_refresh_warmup=0)
    conv(torch.randn(4, 2, 5, 5)).square().sum().backward()
    optimizer.step()
    blocks, d, f32 = 6, 9, 4
    expected = {
        "step": 2 * f32,
        "exp_avg": (blocks * d + 3) * f32,
        "exp_cov": blocks * d * d * f32,
        "exp_avg_sq": 3 * f32,
        "eigh workspace": (2 * blocks * d * d + blocks * d) * f32,
        "basis caches": 0,
    }
    if every > 1:
        expected |= {
            "basis": blocks * d * d * f32,
            "basis_eig_cov": blocks * d * f32,
            "basis_eig_diag": blocks * d * f32,
            "basis caches": blocks * d * d * f32,  # Q o Q
        }
    assert optimizer.memory_bytes() == expected
