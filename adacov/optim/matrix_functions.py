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
    "cholesky_damped",
]

# Below this many blocks a thread pool costs more than it saves.
_MIN_BLOCKS_PER_THREAD = 512


@lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adacov-linalg")


def _batched_in_threads(fn, A: Tensor, out: tuple[Tensor, ...]) -> None:
    """``fn(A, out=out)`` for a batched LAPACK routine; on CPU the batch is split over threads.

    Hand-written because torch runs batched CPU ``eigh`` / ``cholesky_ex`` on one thread
    (31,840 9x9 blocks: eigh 233 ms with 1 thread, 229 ms with 2), while LAPACK is thread-safe and
    torch releases the GIL, so chunks in a thread pool use every core (eigh: 132 ms on 2 cores).
    """
    workers = torch.get_num_threads()
    if A.device.type != "cpu" or workers < 2 or A.shape[0] < 2 * _MIN_BLOCKS_PER_THREAD:
        fn(A, out=out)
        return
    chunks = min(workers, A.shape[0] // _MIN_BLOCKS_PER_THREAD)
    parts = zip(A.chunk(chunks), *(o.chunk(chunks) for o in out))
    futures = [_pool(workers).submit(fn, a, out=tuple(o)) for a, *o in parts]
    for future in futures:
        future.result()


def _eigh_into(A: Tensor, w: Tensor, Q: Tensor) -> None:
    _batched_in_threads(torch.linalg.eigh, A, (w, Q))


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
    # Both products as a row vector times a matrix, the fast form of small batched products on CPU:
    # (Q^T x)^T = x^T Q and (Q y)^T = y^T Q^T (Q^T a transposed view, no copy).
    y = torch.bmm(x.unsqueeze(1), Q)
    return torch.bmm(y.mul_(root.unsqueeze(1)), Q.mT).squeeze(1)


def blend_offdiagonal(C: Tensor, s: float, out: Tensor) -> Tensor:
    """``out = s * C + (1 - s) * diag(C)``: off-diagonal entries scaled by ``s``, diagonal kept.

    Args:
        C: ``[B, d, d]``; out: a ``[B, d, d]`` buffer (may be a slice of a larger stack).
    """
    torch.mul(C, s, out=out)
    out.diagonal(dim1=-2, dim2=-1).copy_(C.diagonal(dim1=-2, dim2=-1))
    return out


def cholesky_damped(F: Tensor, damping: float) -> tuple[Tensor, int]:
    """Lower Cholesky factor of ``F + damping I`` for ``F`` of shape ``[B, d, d]`` (or ``[d, d]``).

    Returns the factor and the number of blocks that failed to factor in ``F``'s dtype; those are
    redone in float64 with jitter ``j * 10^k``, ``k = 0, 1, ...``, until they factor, where
    ``j = max(damping, 1e-12 * max |diag F|)`` keeps the jitter above the block's rounding level.
    """
    batched = F.dim() == 3
    F3 = F if batched else F.unsqueeze(0)
    A = F3 + damping * torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    L = torch.empty_like(A)
    info = torch.empty(A.shape[0], dtype=torch.int32, device=A.device)
    _batched_in_threads(torch.linalg.cholesky_ex, A, (L, info))
    bad = info != 0
    failed = int(bad.sum())
    if failed:
        F_bad = F3[bad].double()
        eye64 = torch.eye(F.shape[-1], dtype=torch.float64, device=F.device)
        jitter = max(damping, 1e-12 * F_bad.diagonal(dim1=-2, dim2=-1).abs().max().item())
        for _ in range(12):
            L64, info64 = torch.linalg.cholesky_ex(F_bad + jitter * eye64)
            if not bool((info64 != 0).any()):
                break
            jitter *= 10.0
        else:
            raise torch.linalg.LinAlgError(f"Cholesky failed on {failed} blocks even in float64 with jitter {jitter:g}")
        L[bad] = L64.to(F.dtype)
    return (L if batched else L[0]), failed
