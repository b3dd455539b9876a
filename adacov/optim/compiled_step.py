"""Fast AdaCov's per-step work on every kernel as two functions for ``torch.compile`` (issue 23).

In eager mode the cached-basis step runs as about ten passes over every kernel (two batched ``bmm`` of one row per
kernel, which are bound by their per-block overhead, and the elementwise estimates, root and update between them),
and the folded covariance update as a broadcast over a strided view. Inductor fuses each function below into loops
over the kernels that keep a block in registers and cache; each takes every tensor of one block size, so that a
step makes two compiled calls per block size, each with its guards and wrappers.

The rotation ``Q^T g`` is written as a sum over the rows of ``Q``: as a reduction over the middle, non-contiguous
dimension, inductor (torch 2.13, CPU, 2+ threads) opens an OpenMP region per kernel and row, which made it over
1,000x slower than eager at 3x3 (results/profile_step_cpu.md).
"""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager
from functools import cache
from typing import Callable

import torch
from torch import Tensor

from adacov.optim.matrix_functions import folded_partners

__all__ = ["cached_basis_steps", "compiled", "cpu_vector_width", "has_cxx_compiler", "moment_updates"]

# ATen's CPU capability -> inductor's cpp.simdlen. Inductor writes vector code for the CPU it detects; with ATen
# held to narrower kernels (ATEN_CPU_CAPABILITY) that code fails to build or computes wrong sums, so its vector
# width follows ATen's (1: scalar loops).
SIMD_BITS = {"DEFAULT": 1, "AVX2": 256, "AVX512": 512}


# Inductor inlines the direction's estimate, root and scaling into the reduction of the back-rotation, computing them
# again for each of a kernel's d rows; computed once each (realized) when the graph holds more than 4 operations.
OPTIONS = {"cached_basis_steps": {"realize_opcount_threshold": 4}}


def has_cxx_compiler() -> bool:
    """Whether ``torch.compile`` finds a C++ compiler for CPU kernels (``CXX``, g++, c++ or clang++ on PATH)."""
    return any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def moment_updates(grads: list[Tensor], exp_avgs: list[Tensor], folded: list[Tensor], k: Tensor) -> None:
    r"""``m <- m + (1 - beta1) (g - m)`` and ``F <- F + w g g^T`` on folded blocks, per tensor, in place.

    ``grads[n]``, ``exp_avgs[n]``: ``[B, d]``; ``folded[n]``: ``[B, d // 2 + 1, d]``
    (``matrix_functions.add_folded_outer``: diagonal ``j`` gains ``w g_i g_((i + j) mod d)``); ``k[n]``:
    ``[1 - beta1, w]``.
    """
    for g, m, F, (weight_m, weight_f) in zip(grads, exp_avgs, folded, k):
        F.copy_(F + weight_f * g.unsqueeze(1) * folded_partners(g, F.shape[1]))
        m.copy_(m + weight_m * (g - m))


def cached_basis_steps(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], bases: list[Tensor],
                       eig_covs: list[Tensor], eig_diags: list[Tensor], fresh: list[Tensor], k: Tensor) -> None:  # fmt: skip
    r"""Each tensor's cached-basis step, in place; tensor ``n`` holds ``B`` kernels of ``d`` entries.

    .. math::
        \lambda_C &\leftarrow \beta_2 \lambda_C + (1 - \beta_2) (Q^T g)^2 \quad \text{(kernels not fresh)} \\
        \theta &\leftarrow \theta (1 - \alpha w) - \frac{\alpha}{1 - \beta_1^t}
            Q \frac{Q^T m}{\sqrt{s \lambda_C / (1 - \beta_2^t) + (1 - s) \lambda_D + \text{cov\_eps}^2}}

    ``params[n]``, ``grads[n]``, ``exp_avgs[n]`` (m, already updated): ``[B, d]``; ``bases[n]`` (Q): ``[B, d, d]``;
    ``eig_covs[n]`` (``lambda_C``), ``eig_diags[n]`` (``lambda_D``): ``[B, d]``; ``fresh[n]``: ``[B, 1]`` bool, the
    kernels decomposed in this step, whose ``lambda_C`` already holds this step's gradient; ``k[n]``: ``[beta2, s /
    (1 - beta2^t), 1 - s, cov_eps^2, alpha / (1 - beta1^t), 1 - alpha w]``. The eigenvalue estimate is clamped at
    0 before the root, as in the eager step.
    """
    for p, g, m, Q, eig_cov, eig_diag, is_fresh, (beta2, s_hat, one_minus_s, shift, step, decay) in zip(
        params, grads, exp_avgs, bases, eig_covs, eig_diags, fresh, k
    ):
        rows = Q.unbind(1)
        g_rot = sum(g[:, i, None] * row for i, row in enumerate(rows))
        m_rot = sum(m[:, i, None] * row for i, row in enumerate(rows))
        eig_cov.copy_(torch.where(is_fresh, eig_cov, eig_cov * beta2 + (1.0 - beta2) * g_rot * g_rot))
        root = (eig_cov * s_hat + eig_diag * one_minus_s).clamp_min(0.0).add(shift).rsqrt()
        p.copy_(p * decay - (Q * (m_rot * root).unsqueeze(-2)).sum(-1) * step)


@cache
def _compiled(fn: Callable[..., None]) -> Callable[..., None]:
    return torch.compile(fn, options=OPTIONS.get(fn.__name__))


def cpu_vector_width() -> AbstractContextManager:
    """Inductor's config with the vector width of its CPU code following ATen's (``SIMD_BITS``), for compiling
    and calling a compiled function."""
    simd_bits = SIMD_BITS.get(torch.backends.cpu.get_cpu_capability())
    return torch._inductor.config.patch({} if simd_bits is None else {"cpp.simdlen": simd_bits})


def compiled(fn: Callable[..., None], *args: list[Tensor] | Tensor) -> None:
    """``fn(*args)`` compiled by ``torch.compile``: at its first call per set of shapes, dtype and device; the
    numbers of kernels become dynamic when they change."""
    with cpu_vector_width():
        _compiled(fn)(*args)
