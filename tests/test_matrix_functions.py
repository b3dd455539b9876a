"""Batched matrix functions on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import inv, sqrtm

from adacov.optim import matrix_functions
from adacov.optim.matrix_functions import apply_inverse_root, blend_offdiagonal, symmetric_eigh


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


def test_failed_decomposition_is_retried_in_float64(monkeypatch):
    A = _spd(4, 5, dtype=torch.float32)

    def failing(A, w, Q):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(matrix_functions, "_eigh_into", failing)
    w, Q = symmetric_eigh(A)
    torch.testing.assert_close(Q @ torch.diag_embed(w) @ Q.transpose(1, 2), A, rtol=1e-5, atol=1e-5)
