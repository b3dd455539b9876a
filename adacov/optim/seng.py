"""SENG (Yang et al. 2020): the sketched empirical natural gradient, layer by layer, with SGD momentum."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adacov.optim.kfac import CURVATURE_UPDATES, KFAC, check_single_process, is_due
from adacov.optim.kronecker import (
    low_rank_output_gradients,
    per_sample_combination,
    per_sample_gram,
    per_sample_inner,
    sample_positions,
)
from adacov.optim.layer_random import RNG, new_stream, sample_without_replacement
from adacov.optim.matrix_functions import cholesky_damped
from adacov.optim.validation import check_nonnegative_int, check_positive_int

__all__ = ["SENG"]

SAMPLES_IN, SAMPLES_OUT = "samples_in", "samples_out"  # the (sketched) batch (a, e) that U is made of
GRAM_FACTOR = "gram_factor"  # lower Cholesky factor of lambda I_B + U U^T, [B, B]
SEED_STRIDE = 1_000_003


class SENG(KFAC):
    r"""SENG: each layer's empirical Fisher ``F = U^T U + lambda I`` inverted by Sherman-Morrison-Woodbury.

    For a layer with ``B`` per-sample gradients ``dW_n = sum_t e_nt a_nt^T`` (:mod:`adacov.optim.kronecker`), ``U``
    ``[B, o i]`` has rows ``vec(dW_n) / sqrt(B)`` and

    .. math::
        D = F^{-1} g = \tfrac{1}{\lambda}\big[g - U^\top (\lambda I_B + U U^\top)^{-1} U g\big],
        \qquad b \leftarrow \mu b + D, \quad W \leftarrow W (1 - \alpha \lambda_{wd}) - \alpha b

    Every ``update_freq`` steps each layer keeps its batch's inputs and output gradients ``(a, e)`` (``U`` is never
    formed: ``U U^T`` is :func:`~adacov.optim.kronecker.per_sample_gram` of the unfolded inputs and output
    gradients, ``U g`` and ``U^T y`` come from ``(a, e)`` too) and factors ``lambda I_B + U U^T`` by Cholesky, one
    batched call over the layers; every step solves the ``B x B`` systems of all layers in one batched
    ``cholesky_solve`` with the step's own gradient ``g``. The paper's sketches for convolutions are options:
    ``sketch_positions = s`` keeps ``s`` of the ``T`` positions, drawn from the layer's generator at each refresh and
    scaled by ``sqrt(T / s)`` (sampled coordinates); ``output_rank = k`` keeps each sample's output gradients
    ``[T, o]`` at rank ``k`` (low-rank output gradients). Layers outside ``Linear`` / ``Conv2d`` and KL clipping
    are :class:`~adacov.optim.kfac.KFAC`'s (Adam; off by default). The paper's schedules for ``lambda`` and the lr
    are left to an LR scheduler.

    Args:
        params: param groups from :func:`~adacov.optim.kfac.kfac_param_groups`.
        lr: ``alpha`` (default 1e-3).
        momentum: SGD momentum ``mu`` (default 0.9).
        damping: ``lambda`` (default 1e-3).
        weight_decay: decoupled weight decay (default 0).
        update_freq: steps between curvature refreshes (default 1: between refreshes the part of a new gradient
            outside the kept batch's span is multiplied by ``1 / lambda``).
        kl_clip: as :class:`KFAC` (default None: off).
        sketch_positions: positions kept of a convolution's ``T`` (default None: all).
        output_rank: rank kept of each sample's output gradients (default None: all).
        seed: seeds the layers' generators (default 0).
        adam_betas, adam_eps, maximize: as :class:`KFAC`.
    """

    variant = "seng"

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        kl_clip: float | None = None,
        sketch_positions: int | None = None,
        output_rank: int | None = None,
        seed: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        maximize: bool = False,
    ) -> None:
        self._build(params, {
            "lr": lr, "momentum": momentum, "damping": damping, "weight_decay": weight_decay,
            "update_freq": update_freq, "kl_clip": kl_clip, "sketch_positions": sketch_positions,
            "output_rank": output_rank, "seed": seed, "adam_betas": adam_betas, "adam_eps": adam_eps,
            "maximize": maximize,
        })  # fmt: skip

    def _validate(self, h: dict[str, Any]) -> None:
        super()._validate(h)
        check_positive_int("update_freq", h["update_freq"])
        for name in ("sketch_positions", "output_rank"):
            if h[name] is not None:
                check_positive_int(name, h[name])
        check_nonnegative_int("seed", h["seed"])

    def _init_state(self, group: dict, state: dict, index: int) -> None:
        super()._init_state(group, state, index)
        state[RNG] = new_stream(group["seed"] * SEED_STRIDE + index, group["params"][0])

    def _curvature_due(self, group: dict, state: dict) -> bool:
        return is_due(state, group["update_freq"])

    def _inverse_due(self, group: dict, state: dict) -> bool:
        return is_due(state, group["update_freq"])

    def _update_factors(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """Keep each due layer's batch ``(a, e)``, sketched as the group asks."""
        if jobs:
            check_single_process(type(self).__name__, "builds its per-sample Gram matrices")
        for group, state, (a, e) in jobs:
            positions = group["sketch_positions"]
            if positions is not None and positions < a.shape[1]:
                a, e = sample_positions(a, e, sample_without_replacement(state, a.shape[1], positions, a.device))
            rank = group["output_rank"]
            if rank is not None and rank < min(e.shape[1], e.shape[2]):
                a, e = low_rank_output_gradients(a, e, rank)
            state[SAMPLES_IN], state[SAMPLES_OUT] = a, e
            state[CURVATURE_UPDATES] += 1

    def _refresh(self, jobs: list[tuple[dict, dict]]) -> None:
        """``chol(lambda I_B + U U^T)`` of every due layer, ``U U^T = Gram / B``, batched over layers."""
        by_size: dict[tuple, list[tuple[dict, Tensor]]] = defaultdict(list)
        for group, state in jobs:
            a, e = state[SAMPLES_IN], state[SAMPLES_OUT]
            gram = per_sample_gram(a, e) / a.shape[0]
            gram.diagonal().add_(group["damping"])
            by_size[(gram.shape[0], gram.dtype, gram.device)].append((state, gram))
        for entries in by_size.values():
            factors, _ = cholesky_damped(torch.stack([gram for _, gram in entries]), 0.0)
            for (state, _), factor in zip(entries, factors):
                state[GRAM_FACTOR] = factor.clone()

    def _directions(self, layers: list[tuple[dict, dict, Tensor]]) -> list[Tensor]:
        """``(g - U^T y) / lambda`` with ``y = (lambda I_B + U U^T)^-1 U g`` solved for all layers at once."""
        by_size: dict[tuple, list[int]] = defaultdict(list)
        projections = []
        for index, (_, state, grad) in enumerate(layers):
            a, e = state[SAMPLES_IN], state[SAMPLES_OUT]
            projections.append(per_sample_inner(a, e, grad) / math.sqrt(a.shape[0]))
            by_size[(a.shape[0], grad.dtype, grad.device)].append(index)
        solutions: list[Tensor] = [grad for *_, grad in layers]
        for indices in by_size.values():
            factors = torch.stack([layers[i][1][GRAM_FACTOR] for i in indices])
            solved = torch.cholesky_solve(torch.stack([projections[i] for i in indices]).unsqueeze(-1), factors)
            for i, y in zip(indices, solved.squeeze(-1)):
                group, state, grad = layers[i]
                a, e = state[SAMPLES_IN], state[SAMPLES_OUT]
                solutions[i] = (grad - per_sample_combination(a, e, y) / math.sqrt(a.shape[0])) / group["damping"]
        return solutions
