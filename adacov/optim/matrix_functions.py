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
    "folded_width",
    "fold_symmetric",
    "unfold_symmetric",
    "add_folded_outer",
    "offdiagonal_mass",
]

# A thread takes a part of a batch only if the part holds this much work, d^3 summed over its blocks: 64 blocks of
# 9x9, 4 of 25x25. Below about that, handing a part to a second thread costs as much as it saves; above it, the
# parts run side by side (fast AdaCov refreshes a fiftieth of its kernels per step: 637 blocks at the paper's widths).
_MIN_WORK_PER_THREAD = 64 * 9**3
# A batch that LAPACK fails to decompose is retried in this many parts, down to parts this small,
# which are decomposed in float64 (_eigh_or_split).
_RETRY_PARTS = 8
_FLOAT64_BLOCKS = 64


@lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    """The threads that run every CPU decomposition here; they flush subnormal floats to zero.

    ``torch.set_flush_denormal`` sets the FTZ/DAZ bits of the thread that calls it, so only these
    threads change. Gradient covariances are of order 1e-10, and LAPACK's products in their
    decomposition fall below float32's normal range (1.2e-38), where x86 arithmetic is slow and float32
    ``syevd`` failed to converge on blocks with exactly zero rows: AdaCov's 5x5 step took 1.5 s with
    subnormals, 0.8 s without (``benchmarks/optimizer_step.py``, 2-core CPU). What is flushed lies 28
    orders of magnitude below ``cov_eps^2``.
    """
    return ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix="adacov-linalg",
        initializer=torch.set_flush_denormal,
        initargs=(True,),
    )


def _batched_in_threads(fn, A: Tensor, out: tuple[Tensor, ...]) -> None:
    """``fn(A, out=out)`` for a batched LAPACK routine; on CPU in ``_pool``, the batch split over its threads.

    Hand-written because torch runs batched CPU ``eigh`` / ``cholesky_ex`` on one thread
    (31,840 9x9 blocks: eigh 233 ms with 1 thread, 229 ms with 2), while LAPACK is thread-safe and
    torch releases the GIL, so chunks in a thread pool use every core (eigh: 132 ms on 2 cores).
    Every CPU batch goes through the pool, whatever its size, so results do not depend on the
    thread count through the subnormal flush.
    """
    if A.device.type != "cpu":
        fn(A, out=out)
        return
    workers = torch.get_num_threads()
    chunks = max(1, min(workers, A.shape[0] * A.shape[-1] ** 3 // _MIN_WORK_PER_THREAD))
    parts = zip(A.chunk(chunks), *(o.chunk(chunks) for o in out))
    futures = [_pool(workers).submit(fn, a, out=tuple(o)) for a, *o in parts]
    for future in futures:
        future.result()


def _eigh_or_split(A: Tensor, out: tuple[Tensor, Tensor]) -> None:
    """``torch.linalg.eigh(A, out=out)``; a batch on which LAPACK fails is split and retried part by part.

    LAPACK's float32 ``syevd`` can fail to converge on a few blocks with exactly zero rows (dead ReLU
    inputs; seen in AdaCov's second step at 5x5). Retrying the whole batch in float64 on one thread
    doubled that step's time, so the failing batch is split into ``_RETRY_PARTS`` parts, each retried,
    and only parts of at most ``_FLOAT64_BLOCKS`` blocks that still fail are decomposed in float64.
    A float64 failure raises ``torch.linalg.LinAlgError``.
    """
    try:
        torch.linalg.eigh(A, out=out)
    except torch.linalg.LinAlgError:
        w, Q = out
        if A.shape[0] <= _FLOAT64_BLOCKS:
            w64, Q64 = torch.linalg.eigh(A.double())
            w.copy_(w64)
            Q.copy_(Q64)
            return
        for a, w_part, Q_part in zip(A.chunk(_RETRY_PARTS), w.chunk(_RETRY_PARTS), Q.chunk(_RETRY_PARTS)):
            _eigh_or_split(a, (w_part, Q_part))


def _eigh_into(A: Tensor, w: Tensor, Q: Tensor) -> None:
    _batched_in_threads(_eigh_or_split, A, (w, Q))


def symmetric_eigh(A: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition ``A = Q diag(w) Q^T`` of a stack of symmetric matrices.

    Args:
        A: ``[B, d, d]`` symmetric matrices (only the lower triangle is read).
        out: optional ``([B, d], [B, d, d])`` buffers for ``(w, Q)``, reused across calls to spare
            the page faults of fresh large allocations.

    Returns:
        ``w`` of shape ``[B, d]`` (ascending) and ``Q`` of shape ``[B, d, d]`` (eigenvectors in
        columns), in ``A``'s dtype. Blocks whose decomposition fails to converge are redone in float64
        in small groups (``_eigh_or_split``), and blocks that come out non-finite one by one; if float64
        fails too, ``torch.linalg.LinAlgError`` names the block.
    """
    w, Q = out if out is not None else (A.new_empty(A.shape[:-1]), torch.empty_like(A))
    _eigh_into(A, w, Q)
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


def folded_width(d: int) -> int:
    """Rows of a folded ``d x d`` symmetric block: ``d // 2 + 1`` (``d (d + 1) / 2`` entries for odd ``d``)."""
    return d // 2 + 1


@lru_cache(maxsize=None)
def _fold_columns(d: int, device: torch.device) -> Tensor:
    """``[d // 2 + 1, d]``: the column ``(i + k) mod d`` of the entry that folded ``(k, i)`` holds."""
    return (torch.arange(folded_width(d), device=device)[:, None] + torch.arange(d, device=device)) % d


@lru_cache(maxsize=None)
def _unfold_sources(d: int, device: torch.device) -> Tensor:
    """``[d * d]``: for entry ``(i, j)`` of the full block, its flat index in the folded ``[d // 2 + 1, d]`` block."""
    i, j = torch.arange(d, device=device)[:, None], torch.arange(d, device=device)
    k = (j - i) % d
    return torch.where(k < folded_width(d), k * d + i, (i - j) % d * d + j).flatten()


def fold_symmetric(C: Tensor) -> Tensor:
    """Folded storage of symmetric blocks, by circular diagonals: ``F[b, k, i] = C[b, i, (i + k) mod d]``,
    ``k <= d // 2``.

    Every pair ``{i, j}`` lies on diagonal ``(j - i) mod d`` or ``(i - j) mod d``, whichever is at most ``d // 2``:
    an odd ``d`` stores each of the ``d (d + 1) / 2`` distinct entries once, an even ``d`` the ``d / 2`` pairs on
    diagonal ``d / 2`` twice. Row ``F[b, 0]`` is the diagonal of ``C``. ``C``: ``[B, d, d]`` symmetric; returns
    ``[B, d // 2 + 1, d]``.
    """
    B, d = C.shape[0], C.shape[-1]
    columns = _fold_columns(d, C.device)
    return torch.gather(C.mT, 1, columns.expand(B, -1, -1))  # C^T[b, (i + k) mod d, i] = C[b, i, (i + k) mod d]


def unfold_symmetric(F: Tensor, out: Tensor) -> Tensor:
    """The full symmetric blocks ``[B, d, d]`` of folded ones ``F`` ``[B, d // 2 + 1, d]``, written into ``out``
    (contiguous) by one gather."""
    B, d = F.shape[0], F.shape[-1]
    torch.index_select(F.reshape(B, -1), 1, _unfold_sources(d, F.device), out=out.view(B, d * d))
    return out


def folded_partners(g: Tensor, rows: int) -> Tensor:
    """``[B, rows, d]``, row ``k`` holding ``g_((i + k) mod d)`` at ``i``: the partner of each ``g_i`` on folded
    diagonal ``k``, as one unfolded view of ``[g, g[:rows - 1]]`` for ``g`` ``[B, d]``."""
    return torch.cat([g, g[:, : rows - 1]], 1).unfold(1, g.shape[-1], 1)


def add_folded_outer(F: Tensor, g: Tensor, weight: float) -> None:
    """``C <- C + weight g g^T`` on folded blocks ``F`` ``[B, d // 2 + 1, d]``, for ``g`` ``[B, d]``.

    Diagonal ``k`` gains ``weight g_i g_((i + k) mod d)``; the shifted copies are ``folded_partners``, so the
    update is one broadcast multiply-add over half the entries of the full blocks, contiguous along ``i``, with
    no ``[B, d, d]`` temporary.
    """
    F.addcmul_(g.unsqueeze(1), folded_partners(g, F.shape[1]), value=weight)


def offdiagonal_mass(A: Tensor, scale: float, shift: float) -> Tensor:
    """How far a basis is from diagonalizing a block: ``||offdiag(D^-1/2 (scale A) D^-1/2)||_F`` per block.

    ``A`` ``[B, d, d]`` is the block in the basis (``Q^T C Q``), ``D = scale diag(A) + shift``: the off-diagonal
    entries relative to the geometric mean of their two diagonal entries, as the inverse root ``(scale A +
    shift I)^(-1/2)`` weighs them. 0 for a basis of eigenvectors; to first order, the relative error of
    preconditioning with ``D^(-1/2)`` alone is half of it. Returns ``[B]``.
    """
    root = A.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).mul(scale).add_(shift).rsqrt_()
    normalized = A * (root.unsqueeze(-1) * root.unsqueeze(-2) * scale)
    normalized.diagonal(dim1=-2, dim2=-1).zero_()
    return normalized.square_().sum((-2, -1)).sqrt_()


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
