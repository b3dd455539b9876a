"""Feature whitening by gradient transformation (Markovich-Golan, Battash, Bleiweiss): one-sided K-FAC with the
output-gradient factor set to the identity, and the repository's recursive variant."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adacov.optim.factor_inverse import eigh_decomposition, precondition_low_rank, relative_damping
from adacov.optim.kfac import (
    BASIS_IN,
    CURVATURE_UPDATES,
    FACTOR_IN,
    KFAC,
    VALUES_IN,
    Inversion,
    bias_correction,
    mean_over_ranks,
)
from adacov.optim.kronecker import factor_columns
from adacov.optim.layer_random import RNG, new_stream, standard_normal
from adacov.optim.validation import check_bool, check_nonnegative_int, check_positive_int

__all__ = ["Whitening", "shrink_top_direction"]

WHITENING_MAP = "whitening_map"  # the recursive variant's P, [i, i]
SEED_STRIDE = 1_000_003


def shrink_top_direction(whitening_map: Tensor, factors: Tensor, start: Tensor, iterations: int) -> Tensor:
    """One step of recursive whitening: ``P' = P - (1 - sqrt(mu / sigma)) v (v^T P)`` where ``(sigma, v)`` is the top
    eigenpair of the whitened covariance ``P R P^T``, estimated by ``iterations`` power iterations from ``start``,
    and ``mu = tr(R) / n`` is ``R``'s mean eigenvalue; nothing changes where ``sigma <= mu``.

    For an exact eigenvector the whitened variance along ``v`` falls from ``sigma`` to ``mu`` and every other
    eigenpair stays, so the condition number of ``P R P^T`` falls step by step, towards
    ``P^T P = mu max(R, mu I)^-1``. Batched: ``P`` and ``R`` ``[b, n, n]``, ``start`` ``[b, n]``; ``O(n^2)`` per
    iteration, against ``eigh``'s ``O(n^3)``.
    """

    def whitened(vector: Tensor) -> Tensor:
        return (whitening_map @ (factors @ (whitening_map.mT @ vector.unsqueeze(-1)))).squeeze(-1)

    tiny = torch.finfo(factors.dtype).tiny
    vector = start
    for _ in range(iterations):
        vector = whitened(vector)
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(tiny)
    sigma = (vector * whitened(vector)).sum(-1)
    mean = factors.diagonal(dim1=-2, dim2=-1).mean(-1)
    shrink = torch.where(sigma > mean, 1.0 - (mean / sigma.clamp_min(tiny)).sqrt(), torch.zeros_like(sigma))
    return whitening_map - shrink.view(-1, 1, 1) * vector.unsqueeze(-1) * (vector.unsqueeze(-2) @ whitening_map)


class Whitening(KFAC):
    r"""Whitened-gradient steps: SGD with momentum on every layer's inputs whitened, done on the weights instead.

    A layer ``y = W x`` (the bias as the last column of ``W``, ``x`` with a 1 appended) fed whitened inputs
    ``x_hat = P x`` has weights ``V = W P^-1``; SGD's step on ``V``, mapped back, is ``W <- W - lr grad_W P^T P``.
    The paper's gradient transformation takes ``P = R^(-1/2)``, ``R = E[x x^T]`` the layer's input covariance, so

    .. math::
        D = \nabla W (\hat R + \lambda_R I)^{-1}, \qquad \lambda_R = \lambda \max \operatorname{eig}(\hat R),

    one-sided K-FAC with the output-gradient factor ``G = I``: ``R_hat`` is K-FAC's input factor ``A`` (running
    average with decay ``stat_decay``, every ``curvature_every`` steps, bias corrected), inverted every
    ``inverse_every`` steps by ``eigh`` with the family's damping relative to the top eigenvalue
    (:mod:`adacov.optim.factor_inverse`). ``b <- mu b + D``, ``W <- W (1 - lr wd) - lr b`` as K-FAC's update.

    ``recursive=True`` is this repository's design of the paper's cheaper recursive variant (the paper's abstract
    gives no algorithm): each inverse period shrinks the top eigen-direction of the whitened covariance
    ``P R_hat P^T``, found by ``power_iterations`` power iterations from a start drawn from the layer's
    generator, to ``R_hat``'s mean eigenvalue (:func:`shrink_top_direction`), and ``D = grad P^T P``. ``P``
    starts at ``I`` (SGD) and only shrinks directions, so no damping is needed; a direction whose variance later
    falls stays shrunk.

    Args:
        params: param groups from :func:`~adacov.optim.kfac.kfac_param_groups`.
        lr, momentum, stat_decay, weight_decay, curvature_every, adam_betas, adam_eps, maximize: as
            :class:`KFAC` (defaults 0.1, 0.9, 0.95, 0, 10, (0.9, 0.999), 1e-8, False).
        damping: ``lambda``, relative to ``R_hat``'s top eigenvalue (default 1e-2; not used when recursive).
        inverse_every: steps between inverses, or between shrinks when recursive (default 10).
        recursive: the recursive variant (default False).
        power_iterations: its power iterations per shrink (default 4).
        seed: seeds the layers' generators (default 0).
    """

    variant = "whitening"

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 1e-2,
        weight_decay: float = 0.0,
        curvature_every: int = 10,
        inverse_every: int = 10,
        recursive: bool = False,
        power_iterations: int = 4,
        seed: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        maximize: bool = False,
    ) -> None:
        self._build(params, {
            "lr": lr, "momentum": momentum, "stat_decay": stat_decay, "damping": damping, "weight_decay": weight_decay,
            "curvature_every": curvature_every, "inverse_every": inverse_every, "recursive": recursive,
            "power_iterations": power_iterations, "seed": seed, "adam_betas": adam_betas, "adam_eps": adam_eps,
            "maximize": maximize,
        })  # fmt: skip

    def _validate(self, h: dict[str, Any]) -> None:
        super()._validate(h)
        check_bool("recursive", h["recursive"])
        check_positive_int("power_iterations", h["power_iterations"])
        check_nonnegative_int("seed", h["seed"])

    def _init_state(self, group: dict, state: dict, index: int) -> None:
        super()._init_state(group, state, index)
        state[RNG] = new_stream(group["seed"] * SEED_STRIDE + index, group["params"][0])

    def _update_factors(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """The running average of each layer's input second moment ``R`` (averaged over ranks first)."""
        stats = []
        for _, _, (a, e) in jobs:
            (rows, scale), _ = factor_columns(a, e)
            stats.append([rows.mT @ rows / scale])
        for (group, state, _), (factor,) in zip(jobs, mean_over_ranks(stats)):
            if FACTOR_IN not in state:
                state[FACTOR_IN] = torch.zeros_like(factor)
            state[FACTOR_IN].lerp_(factor, 1.0 - group["stat_decay"])
            state[CURVATURE_UPDATES] += 1

    def _inversions(self, group: dict, state: dict) -> list[Inversion]:
        factor = state[FACTOR_IN] / bias_correction(group, state)
        if group["recursive"]:
            return [Inversion(state, (WHITENING_MAP,), factor, options=("recursive", group["power_iterations"]))]
        return [Inversion(state, (BASIS_IN, VALUES_IN), factor, options=("eigh",))]

    def _invert(self, stacked: Tensor, entries: list[Inversion]) -> list[tuple[Tensor, ...]]:
        if entries[0].options[0] == "eigh":
            return list(zip(*eigh_decomposition(stacked)))
        eye = torch.eye(stacked.shape[-1], dtype=stacked.dtype, device=stacked.device)
        maps = torch.stack([entry.state.get(WHITENING_MAP, eye) for entry in entries])
        start = torch.stack([standard_normal(entry.state, (stacked.shape[-1],), stacked) for entry in entries])
        return [(p,) for p in shrink_top_direction(maps, stacked, start, entries[0].options[1])]

    def _direction(self, group: dict, state: dict, grad: Tensor) -> Tensor:
        if group["recursive"]:
            whitening_map = state[WHITENING_MAP]
            return grad @ whitening_map.mT @ whitening_map
        shift = relative_damping(state[VALUES_IN], group["damping"])
        return precondition_low_rank(grad, (state[BASIS_IN], state[VALUES_IN]), None, shift, None)
