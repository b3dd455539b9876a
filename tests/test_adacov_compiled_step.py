"""Fast AdaCov with its cached-basis step compiled by torch.compile (``compile_step=True``)."""

from __future__ import annotations

import copy

import pytest
import torch

from adacov import AdaCov
from adacov.optim import compiled_step
from adacov.optim.adacov import BASIS
from tests.helpers import assert_resume_is_bit_identical, batches, loss_and_backward, run_side_by_side, small_convnet
from tests.reference import ReferenceFastAdaCov, relative_difference

pytestmark = [
    pytest.mark.numerics,
    pytest.mark.skipif(not compiled_step.has_cxx_compiler(), reason="torch.compile needs a C++ compiler on the CPU"),
]

KW = dict(lr=1e-2, cov_eps=1e-5, offdiag_warmup=5.0, weight_decay=0.01, basis_refresh_every=4, basis_refresh_warmup=3,
          basis_drift_threshold=0.0)  # fmt: skip


def test_matches_the_reference_rule():
    """Through the warm-up (every kernel decomposed each step) and the staggered cycle (a quarter of them), against
    the float64 reference written from the rule."""
    net = small_convnet()
    ref = ReferenceFastAdaCov([tuple(p.shape) for p in net.parameters()], every=4, warmup=3, threshold=0.0,
                              **{k: KW[k] for k in ("lr", "cov_eps", "offdiag_warmup", "weight_decay")})  # fmt: skip
    ours, theirs = run_side_by_side(net, lambda n: AdaCov(n.parameters(), compile_step=True, **KW), ref, n_steps=12)
    for a, b in zip(ours, theirs):
        assert relative_difference(a, b) < 1e-9


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_follows_the_eager_step(layout):
    """The same steps as the eager fast mode up to float64 rounding, with a maximizing group, and for parameters
    that are not contiguous (channels_last: the compiled step works on a copy)."""
    net = small_convnet()
    if layout == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        assert not net[2].weight.is_contiguous()
    twin = copy.deepcopy(net)
    kw = KW | dict(maximize=True)
    eager, compiled = AdaCov(net.parameters(), **kw), AdaCov(twin.parameters(), compile_step=True, **kw)
    for x, y in batches(10):
        for model, optimizer in ((net, eager), (twin, compiled)):
            loss_and_backward(model, x, y)
            optimizer.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resume_is_bit_identical():
    resumed = assert_resume_is_bit_identical(lambda n: AdaCov(n.parameters(), compile_step=True, **KW), 5, 6)
    assert all(group["compile_step"] for group in resumed.param_groups)
    assert any(BASIS in state for state in resumed.state.values())


def test_needs_a_cxx_compiler(monkeypatch):
    monkeypatch.setattr(compiled_step.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="Invalid compile_step: True needs a C\\+\\+ compiler"):
        AdaCov(small_convnet().parameters(), compile_step=True)
