"""The K-FAC family's ways to invert a Kronecker factor, and the one place where a damped inverse is applied.

A factor ``X`` ``[n, n]`` (symmetric, positive semi-definite: an average of outer products) is inverted through
a decomposition ``(Q, d)``: ``Q`` ``[n, r]`` with orthonormal columns and ``d`` ``[r] >= 0``, so that
``X ~ X_r = Q diag(d) Q^T``; the discarded part of the spectrum counts as 0. Every way below goes from a
factor's statistics to ``(Q, d)``, batched over a leading dimension ``b`` (factors of one size):

- :func:`eigh_decomposition`: all of it (``r = n``), from ``X``;
- :func:`randomized_svd`: the top ``r`` from ``X`` and a Gaussian sketch (Halko et al. 2009, RS-KFAC);
- :func:`sketched_eigh`: the top ``r`` from ``X`` and a sketch, through a small ``eigh`` (SRE-KFAC);
- :func:`brand_update`: the top ``r`` of ``rho X + C C^T`` from ``X``'s decomposition and new columns ``C``
  (Brand 2006, B-KFAC), without ``X`` itself; :func:`brand_correction` re-fits some columns against ``X``.

Damping on the truncated spectrum (:func:`truncated_dampings`, :func:`solve_damped`): ``lambda_X = lambda max(d)``,
relative to the factor's top eigenvalue (with K-FAC's factored damping as an optional floor), and

    (X_r + lambda_X I)^-1 M = Q [diag(1 / (d + lambda_X)) - 1 / lambda_X] Q^T M + M / lambda_X.

K-FAC's own exact inverse (:func:`damped_cholesky_inverse`) takes the factored damping instead and returns the
inverse itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adacov.optim.matrix_functions import cholesky_damped, symmetric_eigh

__all__ = [
    "LowRank",
    "brand_correction",
    "brand_update",
    "damped_cholesky_inverse",
    "eigh_decomposition",
    "factor_rank",
    "precondition_low_rank",
    "randomized_svd",
    "relative_damping",
    "sketched_eigh",
    "solve_damped",
    "truncated_dampings",
]

LowRank = tuple[Tensor, Tensor]  # (Q [..., n, r], d [..., r])


def factor_rank(size: int, rank_fraction: float, min_rank: int) -> int:
    """The rank kept of an ``size x size`` factor: ``min(size, max(min_rank, ceil(rank_fraction * size)))``."""
    return min(size, max(min_rank, math.ceil(rank_fraction * size)))


def damped_cholesky_inverse(factors: Tensor, dampings: Tensor) -> Tensor:
    """``(X + gamma I)^-1`` for factors ``[b, n, n]`` and dampings ``[b]``, by Cholesky (K-FAC, TKFAC)."""
    eye = torch.eye(factors.shape[-1], dtype=factors.dtype, device=factors.device)
    factor, _ = cholesky_damped(factors + dampings.view(-1, 1, 1) * eye, 0.0)
    return torch.cholesky_inverse(factor)


def eigh_decomposition(factors: Tensor) -> LowRank:
    """``(Q [b, n, n], d [b, n])`` with ``X = Q diag(d) Q^T``, eigenvalues ascending (EKFAC's basis, whitening)."""
    values, vectors = symmetric_eigh(factors)
    return vectors, values


def randomized_svd(factors: Tensor, sketch: Tensor, niter: int, rank: int) -> LowRank:
    """The top ``rank`` singular pairs of ``X`` by randomized SVD, as ``torch.svd_lowrank(X, q, niter)`` computes
    them (Halko et al. 2009, Algorithms 4.4 and 5.1) but with the sketch ``Omega`` ``[b, n, q]`` given, so that it
    comes from a stream the optimizer checkpoints: ``Q = qr(X Omega)``, then ``niter`` times
    ``Q = qr(X qr(X^T Q))``; ``U S V^T = svd(Q^T X)``; returns ``(Q U, S)`` cut to ``rank``. For a positive
    semi-definite ``X`` the singular pairs are its eigenpairs; with ``q = n`` the result is exact.
    """
    basis = torch.linalg.qr(factors @ sketch).Q
    for _ in range(niter):
        basis = torch.linalg.qr(factors.mT @ basis).Q
        basis = torch.linalg.qr(factors @ basis).Q
    left, singular, _ = torch.linalg.svd(basis.mT @ factors, full_matrices=False)
    return (basis @ left[..., :rank]), singular[..., :rank]


def sketched_eigh(factors: Tensor, sketch: Tensor, niter: int, rank: int) -> LowRank:
    """The top ``rank`` eigenpairs of ``X`` by a sketched eigendecomposition (SRE-KFAC): ``Y = X^niter Omega``
    (columns rescaled after each product, which keeps their span), ``Q = qr(Y)``, ``B = Q^T X Q`` ``[q, q]``,
    ``(S, W) = eigh(B)``; returns ``(Q W, S)`` for the ``rank`` largest ``S`` (clamped at 0), largest first."""
    tiny = torch.finfo(factors.dtype).tiny
    sketch_y = sketch
    for _ in range(niter):
        sketch_y = factors @ sketch_y
        sketch_y = sketch_y / sketch_y.norm(dim=-2, keepdim=True).clamp_min(tiny)
    basis = torch.linalg.qr(sketch_y).Q
    values, vectors = symmetric_eigh(basis.mT @ factors @ basis)
    top = vectors[..., -rank:].flip(-1)
    return basis @ top, values[..., -rank:].flip(-1).clamp_min(0.0)


def brand_update(basis: Tensor, values: Tensor, columns: Tensor, decay: float) -> LowRank:
    """Brand's online update of a truncated eigendecomposition: the top ``r`` of ``decay U D U^T + C C^T``.

    ``U`` ``[b, n, r]`` (orthonormal columns, or zero columns: empty slots), ``D`` ``[b, r]``, new columns ``C``
    ``[b, n, m]``: ``P = U^T C``; thin QR of the residual ``C - U P = Q R``;
    ``K = [[decay D + P P^T, P R^T], [R P^T, R R^T]]``; ``(S, W) = eigh(K)``; ``U' = [U Q] W``, ``D' = S``, cut to the
    ``r`` largest, largest first. Costs ``O(n (r + m)^2 + (r + m)^3)`` and never forms an ``n x n`` matrix.
    Eigenvalues at the rounding level of ``K`` leave empty slots (see :func:`_empty_slots`), so that the next
    update's ``U^T C`` needs no orthogonal complement of them.
    """
    rank = basis.shape[-1]
    projection = basis.mT @ columns
    residual, triangle = torch.linalg.qr(columns - basis @ projection)
    top = torch.diag_embed(decay * values) + projection @ projection.mT
    cross = projection @ triangle.mT
    middle = torch.cat([torch.cat([top, cross], -1), torch.cat([cross.mT, triangle @ triangle.mT], -1)], -2)
    eigenvalues, rotation = symmetric_eigh(middle)
    rotation, eigenvalues = rotation[..., -rank:].flip(-1), eigenvalues[..., -rank:].flip(-1)
    return _empty_slots(torch.cat([basis, residual], -1) @ rotation, eigenvalues, middle.shape[-1])


def brand_correction(basis: Tensor, values: Tensor, factors: Tensor, index: Tensor) -> LowRank:
    """B-KFAC-c's correction: the columns ``Q_s`` picked by ``index`` ``[b, s]`` are rotated and rescaled to the
    eigenpairs of ``Q_s^T X Q_s``: ``(S, W) = eigh(Q_s^T X Q_s)``, ``Q_s <- Q_s W``, ``d_s <- S``. ``Q_s W`` spans
    what ``Q_s`` spanned, so the columns stay orthonormal, and ``d_s`` become ``X``'s Rayleigh quotients."""
    gather = index.unsqueeze(-2).expand(*basis.shape[:-1], index.shape[-1])
    picked = basis.gather(-1, gather)
    eigenvalues, rotation = symmetric_eigh(picked.mT @ factors @ picked)
    new_basis = basis.scatter(-1, gather, picked @ rotation)
    new_values = values.scatter(-1, index, eigenvalues.clamp_min(0.0))
    return _empty_slots(new_basis, new_values, index.shape[-1])


def _empty_slots(basis: Tensor, values: Tensor, size: int) -> LowRank:
    """Columns whose eigenvalue is at most ``size * eps * max(d)`` (rounding) become zero columns with ``d = 0``:
    an eigenvector of a numerically zero eigenvalue may mix an empty slot with anything, and is not kept."""
    tolerance = values.amax(-1, keepdim=True) * size * torch.finfo(values.dtype).eps
    kept = values > tolerance
    return basis * kept.unsqueeze(-2), values * kept


def relative_damping(values: Tensor, damping: float) -> Tensor:
    """``lambda_X = damping * max(d)`` for each factor (``[..., r] -> [...]``); ``damping`` where ``d`` is all 0
    (no curvature recorded: the direction is then ``M / damping``)."""
    top = values.amax(-1)
    return torch.where(top > 0, damping * top, torch.full_like(top, damping))


def truncated_dampings(factor_in: LowRank, factor_out: LowRank, damping: float, min_damping: float) -> tuple[Tensor, Tensor]:
    """``(lambda_A, lambda_G)`` of a layer: ``lambda_X = max(damping max(d_X), floor_X)``, the floors being K-FAC's
    factored damping of ``min_damping`` on the truncated factors, ``(pi sqrt(min_damping), sqrt(min_damping) / pi)``
    with ``pi^2 = (sum d_A / n_A) / (sum d_G / n_G)`` (1 while a factor has no curvature): the product of the two
    dampings is then at least ``min_damping``, which bounds the step of a layer whose curvature is tiny.
    ``min_damping = 0`` is the purely relative rule."""
    relative_in, relative_out = relative_damping(factor_in[1], damping), relative_damping(factor_out[1], damping)
    if min_damping == 0:
        return relative_in, relative_out
    mean_in = factor_in[1].sum(-1) / factor_in[0].shape[-2]
    mean_out = factor_out[1].sum(-1) / factor_out[0].shape[-2]
    pi = torch.where((mean_in > 0) & (mean_out > 0), (mean_in / mean_out.clamp_min(torch.finfo(mean_out.dtype).tiny)).sqrt(), 1.0)
    root = min_damping**0.5
    return torch.maximum(relative_in, pi * root), torch.maximum(relative_out, root / pi)


def solve_damped(basis: Tensor, values: Tensor, shift: Tensor, matrix: Tensor) -> Tensor:
    """``(Q diag(d) Q^T + lambda I)^-1 M = Q [diag(1 / (d + lambda)) - 1 / lambda] Q^T M + M / lambda`` for
    ``M`` ``[n, k]``: ``O(n r k)``, exact for the truncated factor."""
    coefficients = 1.0 / (values + shift) - 1.0 / shift
    return basis @ (coefficients.unsqueeze(-1) * (basis.mT @ matrix)) + matrix / shift


def precondition_low_rank(
    grad: Tensor, factor_in: LowRank | None, factor_out: LowRank | None, damping_in: Tensor | None, damping_out: Tensor | None
) -> Tensor:
    """``V = (G_r + lambda_G I)^-1 grad (A_r + lambda_A I)^-1`` for ``grad`` ``[o, i]``, the factors' ``(Q, d)`` and
    their dampings; a side given as None is the identity (whitening: ``G = I``)."""
    if factor_out is not None:
        grad = solve_damped(*factor_out, damping_out, grad)
    if factor_in is not None:
        grad = solve_damped(*factor_in, damping_in, grad.mT).mT
    return grad
