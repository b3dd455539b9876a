"""Batched matrix functions on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import inv, sqrtm

from adacov.optim import matrix_functions
from adacov.optim.matrix_functions import apply_inverse_root, blend_offdiagonal, symmetric_eigh

pytestmark = pytest.mark.numerics


def _spd(batch: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, 2 * d, generator=g, dtype=dtype)
    return x @ x.transpose(1, 2) / (2 * d)


def test_inverse_root_of_identity_scales_by_shift():
    Q = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    w = torch.ones(3, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(apply_inverse_root(Q, w, x, shift=3.0), x / 2.0)


def test_inverse_root_matches_scipy():
    A = _spd(5, 9)
    x = torch.randn(5, 9, dtype=torch.float64)
    w, Q = symmetric_eigh(A)
    got = apply_inverse_root(Q, w, x, shift=1e-4, scale=2.0)
    for a, xv, gv in zip(A.numpy(), x.numpy(), got.numpy()):
        expected = inv(sqrtm(2.0 * a + 1e-4 * np.eye(9)).real) @ xv
        np.testing.assert_allclose(gv, expected, rtol=1e-9)


def test_inverse_root_clamps_negative_roundoff():
    Q = torch.eye(2, dtype=torch.float64).expand(1, 2, 2)
    w = torch.tensor([[-1e-3, 4.0]], dtype=torch.float64)
    got = apply_inverse_root(Q, w, torch.ones(1, 2, dtype=torch.float64), shift=1e-2)
    torch.testing.assert_close(got, torch.tensor([[10.0, 1 / np.sqrt(4.01)]], dtype=torch.float64))


def test_blend_offdiagonal():
    C = _spd(3, 4)
    out = torch.empty_like(C)
    torch.testing.assert_close(blend_offdiagonal(C, 0.0, out), torch.diag_embed(C.diagonal(dim1=1, dim2=2)))
    torch.testing.assert_close(blend_offdiagonal(C, 1.0, out), C)
    half = blend_offdiagonal(C, 0.5, out)
    torch.testing.assert_close(half - torch.diag_embed(half.diagonal(dim1=1, dim2=2)), 0.5 * (C - torch.diag_embed(C.diagonal(dim1=1, dim2=2))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_of_a_large_batch_reconstructs(dtype):
    """Large enough that the CPU path splits the batch over threads."""
    A = _spd(3000, 9, dtype=dtype)
    w, Q = symmetric_eigh(A)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(Q @ torch.diag_embed(w) @ Q.transpose(1, 2), A, rtol=tol, atol=tol)
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A), rtol=tol, atol=tol)


def test_non_finite_blocks_are_recomputed_in_float64(monkeypatch):
    A = _spd(6, 5, dtype=torch.float32)
    real = matrix_functions._eigh_into

    def broken(A, w, Q):
        real(A, w, Q)
        w[2] = float("nan")
        Q[4] = float("inf")

    monkeypatch.setattr(matrix_functions, "_eigh_into", broken)
    w, Q = symmetric_eigh(A)
    assert w.dtype == torch.float32 and torch.isfinite(w).all() and torch.isfinite(Q).all()
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A.double()).float())


def test_blocks_lapack_fails_on_are_redone_in_float64_in_a_small_group(monkeypatch):
    """A float32 batch that LAPACK fails on is split and retried; only the failing block's small group
    goes to float64, and every block comes out right."""
    A = _spd(3000, 5, dtype=torch.float32)
    A[1234, 0, 0] = 7.0  # the block our stand-in for LAPACK "fails to converge" on in float32
    real = torch.linalg.eigh
    float64_blocks = []

    def fails_on_the_marked_block(A, *args, **kwargs):
        if A.dtype == torch.float32 and bool((A[:, 0, 0] == 7.0).any()):
            raise torch.linalg.LinAlgError("did not converge")
        if A.dtype == torch.float64:
            float64_blocks.append(A.shape[0])
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fails_on_the_marked_block)
    w, Q = symmetric_eigh(A)
    assert 0 < sum(float64_blocks) <= matrix_functions._FLOAT64_BLOCKS
    torch.testing.assert_close(Q @ torch.diag_embed(w) @ Q.transpose(1, 2), A, rtol=1e-4, atol=1e-4)


def test_a_block_that_fails_in_float64_too_raises(monkeypatch):
    def never_converges(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", never_converges)
    with pytest.raises(torch.linalg.LinAlgError):
        symmetric_eigh(_spd(100, 5, dtype=torch.float32))


def test_decompositions_flush_subnormals_in_their_own_threads_only():
    """A block whose entries are all subnormal (below 1.2e-38) decomposes as if its off-diagonal were
    zero: its eigenvectors are the unit vectors. The caller's own arithmetic keeps subnormals."""
    tiny = _spd(4, 5, dtype=torch.float32) * 1e-40
    assert not bool(torch.linalg.eigh(tiny)[1].abs().round().eq(torch.linalg.eigh(tiny)[1].abs()).all())
    _, Q = symmetric_eigh(tiny)
    assert bool(Q.abs().eq(Q.abs().round()).all()) and bool(Q.abs().sum(-1).eq(1).all())
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


@pytest.mark.parametrize(("blocks", "d", "parts"), [(637, 25, 2), (637, 9, 2), (128, 9, 2), (100, 9, 1), (8, 25, 2), (4, 25, 1)])
def test_a_batch_is_split_over_the_threads_where_each_part_holds_enough_work(monkeypatch, blocks, d, parts):
    """Fast AdaCov's refresh (a fiftieth of the paper-width net's kernels) runs on both cores; a batch too small to
    pay for a second thread stays on one. Every block is decomposed, once."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    A = _spd(blocks, d, dtype=torch.float32)
    sizes = []
    real = torch.linalg.eigh

    def recording(A, *args, **kwargs):
        sizes.append(A.shape[0])
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    w, Q = symmetric_eigh(A)
    assert len(sizes) == parts and sum(sizes) == blocks
    torch.testing.assert_close(w, torch.linalg.eigvalsh(A.double()).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(Q @ torch.diag_embed(w) @ Q.mT, A, rtol=1e-4, atol=1e-4)
