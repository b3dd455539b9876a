"""Kronecker-factored curvature of Linear and Conv2d layers: the K-FAC family's math as pure functions.

Notation for one layer with weight matrix ``W`` of shape ``[o, i]`` (a convolution's weight reshaped to
``[C_out, C_in kh kw]``; with a bias, ``i`` counts one more column, the bias):

- ``a``: the layer's inputs ``[N, T, i]`` for ``N`` samples at ``T`` positions (a convolution's unfolded
  patches; ``T = 1`` for a linear layer), with a column of ones when the layer has a bias;
- ``e``: the per-sample gradients of the loss with respect to the layer's outputs ``[N, T, o]``
  (for a mean loss over the batch, ``N`` times the output gradient autograd delivers);
- per-sample weight gradient ``dW_n = sum_t e_nt a_nt^T`` ``[o, i]``; the batch gradient is their mean.

All functions take and return batched tensors; none loops over samples, positions or layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "factor_columns",
    "kfac_factors",
    "trace_restricted_factors",
    "per_sample_square_norms",
    "eigenbasis_second_moments",
    "split_damping",
    "precondition_kronecker",
    "precondition_eigenbasis",
    "per_sample_gram",
    "per_sample_inner",
    "per_sample_combination",
    "sample_positions",
    "low_rank_output_gradients",
]


def factor_columns(a: Tensor, e: Tensor) -> tuple[tuple[Tensor, int], tuple[Tensor, int]]:
    """K-FAC's factors of one batch as ``X^T X / s``: ``((a as [N T, i], N T), (e as [N T, o], N))``.

    The rows of ``X / sqrt(s)`` are the columns that a Brand update adds (:func:`kfac_factors` for the factors).
    """
    n, t = a.shape[0], a.shape[1]
    return (a.reshape(n * t, -1), n * t), (e.reshape(n * t, -1), n)


def kfac_factors(a: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """K-FAC's factors of one batch, the Kronecker-factored convolution approximation (KFC) for ``T > 1``.

    ``A = (1 / (N T)) sum_{n,t} a_nt a_nt^T`` ``[i, i]`` and ``G = (1 / N) sum_{n,t} e_nt e_nt^T`` ``[o, o]``:
    inputs averaged over samples and positions, output gradients summed over positions and averaged over
    samples, so that ``A kron G`` approximates ``E_n[vec(dW_n) vec(dW_n)^T]`` (exactly, for ``T = 1``).
    """
    (a2, scale_a), (e2, scale_e) = factor_columns(a, e)
    return a2.T @ a2 / scale_a, e2.T @ e2 / scale_e


def trace_restricted_factors(a: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TKFAC's factors of one batch: ``(Phi, Psi, tr F)``.

    With per-sample ``Lambda_n = (1/T) sum_t a_nt a_nt^T`` and ``Gamma_n = sum_t e_nt e_nt^T`` (K-FAC's terms
    before the expectation is split): ``Phi = E_n[tr(Gamma_n) Lambda_n]`` ``[i, i]``,
    ``Psi = E_n[tr(Lambda_n) Gamma_n]`` ``[o, o]``, and ``tr F = E_n ||dW_n||^2``, the trace of the Fisher
    block. The approximation is ``F ~ tr(F) / (tr(Phi) tr(Psi)) * Phi kron Psi``: its trace equals ``tr F``.
    For ``T = 1``, ``tr(Phi) = tr(Psi) = tr F`` and this is the paper's ``delta Phi kron Psi`` with
    ``delta = tr F``.
    """
    n, t = a.shape[0], a.shape[1]
    trace_lambda = a.square().sum((1, 2)) / t  # [N]
    trace_gamma = e.square().sum((1, 2))  # [N]
    a_weighted = a * (trace_gamma / (n * t)).sqrt().view(n, 1, 1)
    e_weighted = e * (trace_lambda / n).sqrt().view(n, 1, 1)
    phi = a_weighted.reshape(n * t, -1).T @ a_weighted.reshape(n * t, -1)
    psi = e_weighted.reshape(n * t, -1).T @ e_weighted.reshape(n * t, -1)
    return phi, psi, per_sample_square_norms(a, e).mean()


def per_sample_square_norms(a: Tensor, e: Tensor) -> Tensor:
    """``||dW_n||_F^2`` for every sample, ``[N]``.

    ``||sum_t e_t a_t^T||^2 = sum_{t,t'} (e_t . e_t')(a_t . a_t')``: the Gram matrices' product costs
    ``T^2 (o + i)`` per sample and the explicit gradient ``T o i``; the cheaper one is used.
    """
    t, i, o = a.shape[1], a.shape[2], e.shape[2]
    if t == 1:
        return a.square().sum((1, 2)) * e.square().sum((1, 2))
    if t * (o + i) < o * i:
        return (torch.bmm(a, a.mT) * torch.bmm(e, e.mT)).sum((1, 2))
    return torch.bmm(e.mT, a).square().sum((1, 2))


def eigenbasis_second_moments(a: Tensor, e: Tensor, basis_in: Tensor, basis_out: Tensor) -> Tensor:
    """EKFAC's per-coordinate second moments ``E_n[(Q_out^T dW_n Q_in)^2]`` of one batch, ``[o, i]``.

    ``Q_out^T dW_n Q_in = sum_t (Q_out^T e_nt)(Q_in^T a_nt)^T``: the inputs and output gradients are rotated
    first; for ``T = 1`` the mean of squared outer products is one product of the squares.
    """
    n = a.shape[0]
    a_rot, e_rot = a @ basis_in, e @ basis_out
    if a.shape[1] == 1:
        return e_rot[:, 0].square().T @ a_rot[:, 0].square() / n
    return torch.bmm(e_rot.mT, a_rot).square_().mean(0)


def split_damping(factor_in: Tensor, factor_out: Tensor, damping: float) -> tuple[float, float]:
    """K-FAC's factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3): ``(pi sqrt(lambda), sqrt(lambda) / pi)``.

    ``pi = sqrt((tr(A) / dim A) / (tr(G) / dim G))`` balances the two factors' mean eigenvalues, so that
    ``(A + pi sqrt(lambda) I) kron (G + sqrt(lambda) / pi I)`` adds about ``lambda`` to ``A kron G``; ``pi = 1``
    when a factor has no trace yet.
    """
    mean_in = float(factor_in.diagonal().sum()) / factor_in.shape[0]
    mean_out = float(factor_out.diagonal().sum()) / factor_out.shape[0]
    pi = (mean_in / mean_out) ** 0.5 if mean_in > 0 and mean_out > 0 else 1.0
    root = damping**0.5
    return pi * root, root / pi


def precondition_kronecker(grad: Tensor, inverse_in: Tensor, inverse_out: Tensor) -> Tensor:
    """``(A_d kron G_d)^(-1) vec(grad)`` as ``G_d^(-1) grad A_d^(-1)`` for ``grad`` ``[o, i]`` and the damped inverses."""
    return inverse_out @ grad @ inverse_in


def precondition_eigenbasis(grad: Tensor, basis_in: Tensor, basis_out: Tensor, scale: Tensor, damping: Tensor | float) -> Tensor:
    """``Q_out ((Q_out^T grad Q_in) / (scale + damping)) Q_in^T``: a diagonal preconditioner in the Kronecker eigenbasis.

    ``scale`` ``[o, i]`` holds the curvature's eigenvalue estimates in that basis (EKFAC: the second moments
    of the rotated per-sample gradients; K-FAC would be ``lambda_G lambda_A^T``).
    """
    rotated = basis_out.T @ grad @ basis_in
    return basis_out @ (rotated / (scale + damping)) @ basis_in.T


def per_sample_gram(a: Tensor, e: Tensor) -> Tensor:
    """``<dW_n, dW_m>`` for every pair of samples, ``[N, N]`` (SENG's ``U U^T`` times ``N``).

    ``<dW_n, dW_m> = sum_{t,t'} (e_nt . e_mt')(a_nt . a_mt')``, at ``N^2 T^2 (o + i)``, or from the explicit
    per-sample gradients at ``N T o i + N^2 o i``: the cheaper one is used (the first for linear layers).
    """
    n, t, i = a.shape
    o = e.shape[2]
    if n * t * t * (o + i) < t * o * i + n * o * i:
        a2, e2 = a.reshape(n * t, i), e.reshape(n * t, o)
        return ((a2 @ a2.T) * (e2 @ e2.T)).reshape(n, t, n, t).sum((1, 3))
    grads = torch.bmm(e.mT, a).reshape(n, o * i)
    return grads @ grads.T


def per_sample_inner(a: Tensor, e: Tensor, matrix: Tensor) -> Tensor:
    """``<dW_n, M>`` for every sample, ``[N]``, for ``M`` ``[o, i]``: ``sum_t e_nt^T M a_nt``."""
    return ((e @ matrix) * a).sum((1, 2))


def per_sample_combination(a: Tensor, e: Tensor, weights: Tensor) -> Tensor:
    """``sum_n y_n dW_n`` ``[o, i]`` for weights ``y`` ``[N]``: ``sum_{n,t} y_n e_nt a_nt^T``."""
    o, i = e.shape[2], a.shape[2]
    return (e * weights.view(-1, 1, 1)).reshape(-1, o).T @ a.reshape(-1, i)


def sample_positions(a: Tensor, e: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """SENG's sampled coordinates: the positions ``index`` (``s`` of ``T``), scaled by ``sqrt(T / s)`` each, so
    that ``(T / s) sum_{t in index} e_nt a_nt^T`` is an unbiased estimate of ``dW_n``."""
    scale = (a.shape[1] / index.numel()) ** 0.5
    return a[:, index] * scale, e[:, index] * scale


def low_rank_output_gradients(a: Tensor, e: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """SENG's low-rank output gradients: each sample's ``e_n`` ``[T, o]`` cut to its top ``k`` singular triplets,
    ``e_n ~ U_n S_n V_n^T``; then ``dW_n ~ sum_j (s_j v_j)(U_n^T a_n)_j^T``, returned as ``(U_n^T a_n, S_n V_n^T)``
    ``([N, k, i], [N, k, o])``: ``k`` positions in place of ``T`` (exact for ``k = min(T, o)``)."""
    left, singular, right = torch.linalg.svd(e, full_matrices=False)
    k = min(rank, singular.shape[1])
    return left[..., :k].mT @ a, singular[:, :k, None] * right[:, :k]
