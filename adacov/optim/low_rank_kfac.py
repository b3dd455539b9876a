"""K-FACs that invert their factors at low rank: RS-KFAC, SRE-KFAC, and the Brand-update K-FACs (B-KFAC,
B-R-KFAC, B-KFAC-c). Their statistics, schedule and update are :class:`~adacov.optim.kfac.KFAC`'s; what each adds
is the way it decomposes a factor (:mod:`adacov.optim.factor_inverse`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adacov.optim.factor_inverse import (
    LowRank,
    brand_correction,
    brand_update,
    factor_rank,
    precondition_low_rank,
    randomized_svd,
    sketched_eigh,
    truncated_dampings,
)
from adacov.optim.kfac import (
    BASIS_IN,
    BASIS_OUT,
    CURVATURE_UPDATES,
    FACTOR_IN,
    FACTOR_OUT,
    KFAC,
    STEP,
    VALUES_IN,
    VALUES_OUT,
    Inversion,
    bias_correction,
    check_single_process,
)
from adacov.optim.kronecker import factor_columns
from adacov.optim.layer_random import RNG, new_stream, sample_without_replacement, standard_normal
from adacov.optim.validation import check_nonnegative, check_nonnegative_int, check_positive_int

__all__ = ["BKFAC", "RSKFAC", "SREKFAC"]

# B-KFAC: the running decomposition (U, D) of a factor's raw average, kept in place of the factor
BRAND_BASIS_IN, BRAND_VALUES_IN = "brand_basis_in", "brand_values_in"
BRAND_BASIS_OUT, BRAND_VALUES_OUT = "brand_basis_out", "brand_values_out"
# (factor key, keys of its decomposition, keys of its Brand decomposition), input side then output side
SIDES = ((FACTOR_IN, (BASIS_IN, VALUES_IN), (BRAND_BASIS_IN, BRAND_VALUES_IN)),
         (FACTOR_OUT, (BASIS_OUT, VALUES_OUT), (BRAND_BASIS_OUT, BRAND_VALUES_OUT)))  # fmt: skip
RSVD, SKETCHED_EIGH, CORRECTION = "rsvd", "sketched_eigh", "correction"
SEED_STRIDE = 1_000_003  # a layer's stream is seeded with seed * SEED_STRIDE + its group's index


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in (0, 1])")


class RSKFAC(KFAC):
    r"""RS-KFAC (Puiu 2022): K-FAC whose factors are inverted by a randomized SVD at rank ``r``.

    Every ``inverse_every`` steps, each bias-corrected factor ``X`` (K-FAC's ``A`` or ``G``, see :class:`KFAC`)
    gets ``(Q, d)``, its top ``r`` eigenpairs, by :func:`~adacov.optim.factor_inverse.randomized_svd` with a
    Gaussian sketch ``[n, q]``, ``q = min(n, r + oversample)``, and ``niter`` power iterations. The rank is relative
    to the factor's size ``n``: ``r = min(n, max(min_rank, ceil(rank_fraction n)))``. The direction damps the
    truncated spectrum, the discarded eigenvalues counting as 0:

    .. math::
        \lambda_X = \lambda \max d_X, \qquad D = (G_r + \lambda_G I)^{-1} \nabla W (A_r + \lambda_A I)^{-1},
        \qquad (X_r + \lambda I)^{-1} M = Q [\operatorname{diag}(\tfrac{1}{d + \lambda}) - \tfrac{1}{\lambda}]
        Q^\top M + \tfrac{M}{\lambda}

    With ``r = n`` (``rank_fraction=1``) it is exactly K-FAC with this damping rule. Each layer draws its sketches
    from its own generator, seeded with ``seed * 1_000_003 + (its group's index)``, whose state is saved with the
    optimizer's. Statistics, bias correction, momentum, weight decay, KL clipping and the Adam groups are
    :class:`KFAC`'s.

    Args:
        params: param groups from :func:`~adacov.optim.kfac.kfac_param_groups`.
        lr, momentum, stat_decay, weight_decay, curvature_every, kl_clip, adam_betas, adam_eps, maximize: as
            :class:`KFAC` (defaults 1e-2, 0.9, 0.95, 0, 10, None, (0.9, 0.999), 1e-8, False).
        damping: ``lambda``, relative to each factor's top eigenvalue (default 0.1).
        inverse_every: steps between decompositions (default 50, the paper's).
        rank_fraction, min_rank: the rank rule above (defaults 0.1 and 32).
        oversample: extra sketch columns ``p`` (default 10, the paper's).
        niter: power iterations (default 3).
        seed: seeds the layers' generators (default 0).
    """

    variant = "rs_kfac"
    way = RSVD

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 0.1,
        min_damping: float = 1e-3,
        weight_decay: float = 0.0,
        curvature_every: int = 10,
        inverse_every: int = 50,
        kl_clip: float | None = None,
        rank_fraction: float = 0.1,
        min_rank: int = 32,
        oversample: int = 10,
        niter: int = 3,
        seed: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        maximize: bool = False,
    ) -> None:
        self._build(params, {
            "lr": lr, "momentum": momentum, "stat_decay": stat_decay, "damping": damping, "min_damping": min_damping,
            "weight_decay": weight_decay,
            "curvature_every": curvature_every, "inverse_every": inverse_every, "kl_clip": kl_clip,
            "rank_fraction": rank_fraction, "min_rank": min_rank, "oversample": oversample, "niter": niter,
            "seed": seed, "adam_betas": adam_betas, "adam_eps": adam_eps, "maximize": maximize,
        })  # fmt: skip

    def _validate(self, h: dict[str, Any]) -> None:
        super()._validate(h)
        check_nonnegative("min_damping", h["min_damping"])
        _check_fraction("rank_fraction", h["rank_fraction"])
        check_positive_int("min_rank", h["min_rank"])
        check_nonnegative_int("oversample", h["oversample"])
        check_nonnegative_int("niter", h["niter"])
        check_nonnegative_int("seed", h["seed"])

    def _init_state(self, group: dict, state: dict, index: int) -> None:
        super()._init_state(group, state, index)
        state[RNG] = new_stream(group["seed"] * SEED_STRIDE + index, group["params"][0])

    def _inversions(self, group: dict, state: dict) -> list[Inversion]:
        return [self._low_rank(group, state, keys, factor, self.way)
                for (_, keys, _), factor in zip(SIDES, self._factors(group, state))]  # fmt: skip

    def _low_rank(self, group: dict, state: dict, keys: tuple[str, str], factor: Tensor, way: str) -> Inversion:
        """A decomposition of ``factor`` by ``way`` at the group's rank, stored under ``keys``."""
        size = factor.shape[0]
        rank = factor_rank(size, group["rank_fraction"], group["min_rank"])
        return Inversion(state, keys, factor, options=(way, rank, min(size, rank + group["oversample"]), group["niter"]))

    def _invert(self, stacked: Tensor, entries: list[Inversion]) -> list[tuple[Tensor, ...]]:
        way, rank, width, niter = entries[0].options
        sketch = torch.stack([standard_normal(entry.state, (stacked.shape[-1], width), stacked) for entry in entries])
        decompose = randomized_svd if way == RSVD else sketched_eigh
        return list(zip(*decompose(stacked, sketch, niter, rank)))

    def _decompositions(self, group: dict, state: dict) -> list[LowRank]:
        """``(Q, d)`` of the layer's (input, output) factors."""
        return [(state[basis], state[values]) for _, (basis, values), _ in SIDES]

    def _direction(self, group: dict, state: dict, grad: Tensor) -> Tensor:
        factor_in, factor_out = self._decompositions(group, state)
        dampings = truncated_dampings(factor_in, factor_out, group["damping"], group["min_damping"])
        return precondition_low_rank(grad, factor_in, factor_out, *dampings)


class SREKFAC(RSKFAC):
    """SRE-KFAC (Puiu 2022): :class:`RSKFAC` with a sketched eigendecomposition in place of the randomized SVD.

    ``Omega ~ N(0, 1)`` ``[n, q]``, ``Y = X^niter Omega``, ``Q = qr(Y)``, ``B = Q^T X Q``, ``eigh(B)``, the top ``r``
    kept (:func:`~adacov.optim.factor_inverse.sketched_eigh`): one small ``eigh`` and ``niter`` products with ``X``
    instead of ``2 niter + 1`` QR factorizations of ``[n, q]``. Everything else, defaults included, is RS-KFAC's.
    """

    variant = "sre_kfac"
    way = SKETCHED_EIGH


class BKFAC(RSKFAC):
    r"""B-KFAC, B-R-KFAC and B-KFAC-c (Puiu 2023): K-FAC with Brand's online update of each factor's truncated
    eigendecomposition, for the factors where it is cheap; :class:`RSKFAC` for the others.

    A factor's batch term is ``C C^T`` with ``C = sqrt(1 - beta) X^T / sqrt(s)`` ``[n, m]`` (:func:`~adacov.optim.
    kronecker.factor_columns`: ``m = N T`` inputs or output gradients). Where ``r + m < n`` (a linear layer's input
    factor when the batch is smaller than its width, a late convolution's with few positions), every curvature
    update is :func:`~adacov.optim.factor_inverse.brand_update`:
    ``U D U^T <- top_r(beta U D U^T + C C^T)``, and the factor's average itself is not kept (B-KFAC); the direction
    uses ``(U, D / (1 - beta^k))`` with :class:`RSKFAC`'s damping. Elsewhere (most convolutions: ``m = N H W`` is
    large) the factor is averaged and decomposed by randomized SVD every ``inverse_every`` steps, as RS-KFAC.

    - ``brand_refresh_every = k`` (B-R-KFAC): the Brand factors' averages are kept too, and every ``k``-th inverse
      period ``(U, D)`` is replaced by a randomized SVD of the average, which resets the truncation error.
    - ``brand_correction = f`` (B-KFAC-c): the averages are kept, and every inverse period a fraction ``f`` of the
      ``r`` columns, drawn at random, are rotated and rescaled to the eigenpairs of ``Q_s^T X Q_s``
      (:func:`~adacov.optim.factor_inverse.brand_correction`).

    Args:
        brand_refresh_every: inverse periods between B-R-KFAC's refreshes (default None: B-KFAC).
        brand_correction: B-KFAC-c's fraction of corrected columns in (0, 1] (default None; the paper's 0.2).
        others: as :class:`RSKFAC`.
    """

    variant = "b_kfac"

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 0.1,
        min_damping: float = 1e-3,
        weight_decay: float = 0.0,
        curvature_every: int = 10,
        inverse_every: int = 50,
        kl_clip: float | None = None,
        rank_fraction: float = 0.1,
        min_rank: int = 32,
        oversample: int = 10,
        niter: int = 3,
        seed: int = 0,
        brand_refresh_every: int | None = None,
        brand_correction: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        maximize: bool = False,
    ) -> None:
        self._build(params, {
            "lr": lr, "momentum": momentum, "stat_decay": stat_decay, "damping": damping, "min_damping": min_damping,
            "weight_decay": weight_decay,
            "curvature_every": curvature_every, "inverse_every": inverse_every, "kl_clip": kl_clip,
            "rank_fraction": rank_fraction, "min_rank": min_rank, "oversample": oversample, "niter": niter,
            "seed": seed, "brand_refresh_every": brand_refresh_every, "brand_correction": brand_correction,
            "adam_betas": adam_betas, "adam_eps": adam_eps, "maximize": maximize,
        })  # fmt: skip

    def _validate(self, h: dict[str, Any]) -> None:
        super()._validate(h)
        if h["brand_refresh_every"] is not None:
            check_positive_int("brand_refresh_every", h["brand_refresh_every"])
        if h["brand_correction"] is not None:
            _check_fraction("brand_correction", h["brand_correction"])

    @staticmethod
    def _keeps_factor(group: dict) -> bool:
        return group["brand_refresh_every"] is not None or group["brand_correction"] is not None

    def _update_factors(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """Average the RS-KFAC factors; Brand-update the others, one batched update per shape."""
        if jobs:
            check_single_process(type(self).__name__, "updates its factors' decompositions")
        brand: dict[tuple, list[tuple[dict, tuple[str, str], Tensor]]] = defaultdict(list)
        for group, state, (a, e) in jobs:
            decay = group["stat_decay"]
            for (factor, _, keys), (rows, scale) in zip(SIDES, factor_columns(a, e)):
                size = rows.shape[1]
                rank = factor_rank(size, group["rank_fraction"], group["min_rank"])
                if keys[0] not in state and factor not in state and rank + rows.shape[0] < size:
                    state[keys[0]], state[keys[1]] = rows.new_zeros(size, rank), rows.new_zeros(rank)
                if keys[0] in state:
                    columns = rows.mT * math.sqrt((1.0 - decay) / scale)
                    brand[(size, rank, columns.shape[1], decay, rows.dtype, rows.device)].append((state, keys, columns))
                if keys[0] not in state or self._keeps_factor(group):
                    if factor not in state:
                        state[factor] = rows.new_zeros(size, size)
                    state[factor].lerp_(rows.mT @ rows / scale, 1.0 - decay)
            state[CURVATURE_UPDATES] += 1
        for (*_, decay, _, _), entries in brand.items():
            basis = torch.stack([state[keys[0]] for state, keys, _ in entries])
            values = torch.stack([state[keys[1]] for state, keys, _ in entries])
            updated = brand_update(basis, values, torch.stack([columns for *_, columns in entries]), decay)
            for (state, keys, _), new_basis, new_values in zip(entries, *updated):
                state[keys[0]], state[keys[1]] = new_basis.clone(), new_values.clone()

    def _inversions(self, group: dict, state: dict) -> list[Inversion]:
        """RS-KFAC's decomposition of the averaged factors; for the Brand factors a B-R-KFAC refresh or a
        B-KFAC-c correction when due (their averages are raw, as ``(U, D)``)."""
        period = (int(state[STEP].item()) - 1) // group["inverse_every"]
        correction = bias_correction(group, state)
        inversions = []
        for factor, keys, brand_keys in SIDES:
            if brand_keys[0] not in state:
                inversions.append(self._low_rank(group, state, keys, state[factor] / correction, self.way))
            elif period > 0 and group["brand_refresh_every"] and period % group["brand_refresh_every"] == 0:
                inversions.append(self._low_rank(group, state, brand_keys, state[factor], self.way))
            elif period > 0 and group["brand_correction"] is not None:
                count = math.ceil(group["brand_correction"] * state[brand_keys[1]].shape[0])
                inversions.append(Inversion(state, brand_keys, state[factor], options=(CORRECTION, count)))
        return inversions

    def _invert(self, stacked: Tensor, entries: list[Inversion]) -> list[tuple[Tensor, ...]]:
        if entries[0].options[0] != CORRECTION:
            return super()._invert(stacked, entries)
        count = entries[0].options[1]
        basis = torch.stack([entry.state[entry.keys[0]] for entry in entries])
        values = torch.stack([entry.state[entry.keys[1]] for entry in entries])
        index = torch.stack([sample_without_replacement(e.state, values.shape[-1], count, values.device) for e in entries])
        return list(zip(*brand_correction(basis, values, stacked, index)))

    def _decompositions(self, group: dict, state: dict) -> list[LowRank]:
        correction = bias_correction(group, state)
        return [(state[brand[0]], state[brand[1]] / correction) if brand[0] in state else (state[keys[0]], state[keys[1]])
                for _, keys, brand in SIDES]  # fmt: skip
