"""Batched symmetric matrix functions used by the curvature-aware optimizers.

Every function works on a stack of small matrices ``A`` of shape ``[B, d, d]`` at once; no
function loops over the ``B`` blocks in Python.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "symmetric_eigh",
    "apply_inverse_root",
    "blend_offdiagonal",
    "cholesky_solve_damped",
]

# Below this many blocks a thread pool costs more than it saves.
_MIN_BLOCKS_PER_THREAD = 512


@lru_cache(maxsize=None)
def _eigh_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adacov-eigh")


def _eigh_into(A: Tensor, w: Tensor, Q: Tensor) -> None:
    """``eigh`` of ``A`` written into ``(w, Q)``; on CPU the batch is split over threads.

    Hand-written because torch's batched CPU ``eigh`` runs the whole batch on one thread
    (31,840 9x9 blocks: 233 ms with 1 thread, 229 ms with 2), while LAPACK is thread-safe and
    torch releases the GIL, so chunks in a thread pool use every core (132 ms on 2 cores).
    """
    workers = torch.get_num_threads()
    if A.device.type != "cpu" or workers < 2 or A.shape[0] < 2 * _MIN_BLOCKS_PER_THREAD:
        torch.linalg.eigh(A, out=(w, Q))
        return
    chunks = min(workers, A.shape[0] // _MIN_BLOCKS_PER_THREAD)
    jobs = zip(A.chunk(chunks), w.chunk(chunks), Q.chunk(chunks))
    futures = [_eigh_pool(workers).submit(torch.linalg.eigh, a, out=(wc, qc)) for a, wc, qc in jobs]
    for future in futures:
        future.result()


def symmetric_eigh(A: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition ``A = Q diag(w) Q^T`` of a stack of symmetric matrices.

    Args:
        A: ``[B, d, d]`` symmetric matrices (only the lower triangle is read).
        out: optional ``([B, d], [B, d, d])`` buffers for ``(w, Q)``, reused across calls to spare
            the page faults of fresh large allocations.

    Returns:
        ``w`` of shape ``[B, d]`` (ascending) and ``Q`` of shape ``[B, d, d]`` (eigenvectors in
        columns), in ``A``'s dtype. Blocks whose decomposition fails to converge or comes out
        non-finite are recomputed in float64; if even that fails, a ``torch.linalg.LinAlgError``
        names the block count.
    """
    w, Q = out if out is not None else (A.new_empty(A.shape[:-1]), torch.empty_like(A))
    try:
        _eigh_into(A, w, Q)
    except torch.linalg.LinAlgError:
        w64, Q64 = torch.linalg.eigh(A.double())
        w.copy_(w64)
        Q.copy_(Q64)
        return w, Q
    # NaN and inf survive a sum, so one reduction per block finds them (30x cheaper than isfinite(Q)).
    bad = ~torch.isfinite(w.sum(-1) + Q.sum((-2, -1)))
    if bool(bad.any()):
        w64, Q64 = torch.linalg.eigh(A[bad].double())
        w[bad] = w64.to(A.dtype)
        Q[bad] = Q64.to(A.dtype)
    return w, Q


def apply_inverse_root(Q: Tensor, w: Tensor, x: Tensor, shift: float, scale: float = 1.0) -> Tensor:
    """``(scale * Q diag(w) Q^T + shift I)^(-1/2) x`` without forming the matrix.

    Args:
        Q: ``[B, d, d]`` orthonormal eigenvectors (columns).
        w: ``[B, d]`` eigenvalues; negative round-off is clamped to 0 before the root.
        x: ``[B, d]`` vectors.
        shift: ``> 0``, added to every eigenvalue after scaling (``cov_eps^2`` in AdaCov).
        scale: multiplies the eigenvalues (a bias correction ``1 / (1 - beta2^t)``).

    Returns:
        ``[B, d]``: ``Q ((Q^T x) * (scale * max(w, 0) + shift)^(-1/2))``.
    """
    root = w.clamp_min(0.0).mul_(scale).add_(shift).rsqrt_()
    y = torch.bmm(x.unsqueeze(1), Q).squeeze(1)  # Q^T x, as a row vector times Q
    return torch.bmm(Q, y.mul_(root).unsqueeze(-1)).squeeze(-1)


def blend_offdiagonal(C: Tensor, s: float, out: Tensor) -> Tensor:
    """``out = s * C + (1 - s) * diag(C)``: off-diagonal entries scaled by ``s``, diagonal kept.

    Args:
        C: ``[B, d, d]``; out: a ``[B, d, d]`` buffer (may be a slice of a larger stack).
    """
    torch.mul(C, s, out=out)
    out.diagonal(dim1=-2, dim2=-1).copy_(C.diagonal(dim1=-2, dim2=-1))
    return out


def cholesky_solve_damped(F: Tensor, damping: float, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factor of ``F + damping I`` and the solution of ``(F + damping I) x = b``.

    Args:
        F: ``[B, d, d]`` symmetric positive semi-definite; damping: ``> 0``; b: ``[B, d]``.

    Returns:
        ``(L, x)`` with ``L`` the ``[B, d, d]`` lower Cholesky factor and ``x`` of shape ``[B, d]``.
        Blocks whose factorization fails are refactored in float64 with growing jitter.
    """
    L = cholesky_damped(F, damping)
    return L, torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


def cholesky_damped(F: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of ``F + damping I`` for ``F`` of shape ``[B, d, d]``.

    Blocks whose factorization fails (``info > 0``) are redone in float64 with jitter
    ``damping * 10^k`` added, ``k = 0, 1, ...``, until every block factors.
    """
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    L, info = torch.linalg.cholesky_ex(F + damping * eye)
    bad = info != 0
    if bool(bad.any()):
        F_bad = F[bad].double()
        eye64 = eye.double()
        jitter = damping
        for _ in range(12):
            L64, info64 = torch.linalg.cholesky_ex(F_bad + jitter * eye64)
            if not bool((info64 != 0).any()):
                break
            jitter *= 10.0
        else:
            raise torch.linalg.LinAlgError(f"Cholesky failed on {int(bad.sum())} blocks even in float64")
        L[bad] = L64.to(F.dtype)
    return L

