"""The K-FAC family as torch optimizers: K-FAC, EKFAC, TKFAC and TEKFAC, sharing one implementation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from adacov.optim.adam_update import adam_update_
from adacov.optim.base import STEP, BaseOptimizer, block_grads, lr_value, new_counter, step_grad
from adacov.optim.factor_inverse import damped_cholesky_inverse, eigh_decomposition
from adacov.optim.kfac_layers import ADAM, CONV2D, LAYERS, LINEAR, gradient_matrix, kfac_param_groups, layer_batch
from adacov.optim.kronecker import (
    eigenbasis_second_moments,
    kfac_factors,
    precondition_eigenbasis,
    precondition_kronecker,
    split_damping,
    trace_restricted_factors,
)
from adacov.optim.validation import (
    check_betas,
    check_bool,
    check_dtypes,
    check_lr,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_unit_interval,
)

__all__ = ["ADAM", "CONV2D", "EKFAC", "KFAC", "LINEAR", "TEKFAC", "TKFAC", "Inversion", "kfac_param_groups"]

CURVATURE_UPDATES = "curvature_updates"
FACTOR_IN, FACTOR_OUT, TRACE = "factor_in", "factor_out", "trace"  # EMAs of A, G (TKFAC: Phi, Psi, tr F)
INVERSE_IN, INVERSE_OUT = "inverse_in", "inverse_out"  # K-FAC, TKFAC: damped inverses
BASIS_IN, BASIS_OUT, SCALE = "basis_in", "basis_out", "scale"  # EKFAC, TEKFAC: eigenbases, EMA of the moments
VALUES_IN, VALUES_OUT = "values_in", "values_out"  # low-rank K-FACs, whitening: (Q, d) = (basis, values)
MOMENTUM_BUFFER = "momentum_buffer"
EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"  # Adam's moments for parameters outside Linear / Conv2d


@dataclass
class Inversion:
    """One factor to invert: its layer's ``state``, the ``keys`` its results are stored under, the ``matrix``,
    K-FAC's ``damping``, and ``options`` that a batched call must share (factors of one size and options are
    inverted together)."""

    state: dict
    keys: tuple[str, ...]
    matrix: Tensor
    damping: float = 0.0
    options: tuple = ()


class KFAC(BaseOptimizer):
    r"""Kronecker-factored natural gradient for ``Linear`` and ``Conv2d`` layers, in four variants.

    For a layer with weight matrix ``W`` ``[o, i]`` (bias as the last column; a convolution reshaped to
    ``[C_out, C_in kh kw (+1)]``), batch inputs ``a`` and per-sample output gradients ``e`` (see
    :mod:`adacov.optim.kronecker`), ``t`` the step count and ``k`` the number of curvature updates so far:

    .. math::
        \text{every curvature\_every steps:}\quad
            X &\leftarrow \beta X + (1 - \beta) X_\text{batch}, \qquad \hat X = X / (1 - \beta^k) \\
        \text{K-FAC:}\quad & D = (\hat G + \gamma_G I)^{-1} \nabla W (\hat A + \gamma_A I)^{-1},
            \quad \gamma_A = \pi \sqrt\lambda,\ \gamma_G = \sqrt\lambda / \pi,\
            \pi^2 = \frac{\operatorname{tr}\hat A / \dim A}{\operatorname{tr}\hat G / \dim G} \\
        \text{EKFAC:}\quad & D = Q_G \big[(Q_G^\top \nabla W Q_A) \oslash (\hat S + \lambda)\big] Q_A^\top,
            \quad S_\text{batch} = \mathbb{E}_n\big[(Q_G^\top dW_n Q_A)^{\odot 2}\big] \\
        \text{TKFAC:}\quad & \hat F = c\, \hat\Phi \otimes \hat\Psi,\ c = \frac{\widehat{\operatorname{tr} F}}
            {\operatorname{tr}\hat\Phi \operatorname{tr}\hat\Psi}, \text{ then K-FAC's rule on }
            (\sqrt c\,\hat\Phi, \sqrt c\,\hat\Psi) \text{ with damping } \lambda_l \\
        \text{TEKFAC:}\quad & \text{EKFAC's rule in the eigenbasis of } (\hat\Phi, \hat\Psi)
            \text{ with damping } \lambda_l \\
        & b \leftarrow \mu b + D, \qquad W \leftarrow W (1 - \alpha \lambda_{wd}) - \alpha b

    with ``X`` each running average: K-FAC's ``A = E[a a^T]``, ``G = E[e e^T]``; TKFAC's
    ``Phi = E_n[tr(Gamma_n) Lambda_n]``, ``Psi = E_n[tr(Lambda_n) Gamma_n]`` and ``tr F = E_n ||dW_n||^2``;
    EKFAC's ``S``. Inverses (K-FAC, TKFAC: damped Cholesky inverses) or eigenbases (EKFAC, TEKFAC: ``eigh``)
    are recomputed every ``inverse_every`` steps, in one batched call per matrix size over all layers.

    Choices the papers leave open, and this implementation's answers:

    - the curvature is the **empirical Fisher**: ``e`` are the gradients of the observed labels' losses,
      taken from the output gradients of a loss that is the **mean** over the batch (times ``N``);
    - convolutions use the KFC factors (Grosse & Martens 2016): patches averaged and output gradients summed
      over positions; TKFAC's per-sample terms are ``Lambda_n = (1/T) sum_t a a^T`` and
      ``Gamma_n = sum_t e e^T``, and ``tr F`` is the exact trace of the per-sample gradients' second moment,
      so TKFAC keeps the Fisher block's trace (for a linear layer ``c = 1 / tr F``, the paper's ``delta``);
    - running averages start at zero with Adam-style bias correction (``k`` counts curvature updates);
      EKFAC's ``S`` keeps averaging across basis refreshes, as EKFAC's Algorithm 1;
    - damping: Tikhonov ``lambda``, split between the factors by ``pi`` (Martens & Grosse, sec. 6.3) for
      K-FAC and TKFAC, added to ``S`` for EKFAC and TEKFAC. TKFAC's damping for convolutions (Gao et al.
      2021) ties a convolution's damping to its own curvature, whose scale differs between layers by orders
      of magnitude; its exact rule is not in the material this repository was built from, so this is our
      reading: for T(E)KFAC a convolution's ``lambda_l = max(conv_damping * tr(F_hat) / (o i), lambda)``,
      proportional to the block's mean eigenvalue, with ``lambda`` as a floor (without it the steps grow as
      ``1 / |g|`` where gradients vanish: TKFAC and TEKFAC diverged at every lr we tried). Linear layers
      keep ``lambda``. TEKFAC (Gao et al. 2020) = EKFAC's rescaling in TKFAC's eigenbasis with that damping;
    - EKFAC and TEKFAC are defined only up to the eigenbasis inside a degenerate eigenspace: a factor of rank
      below its size (fewer samples times positions than inputs) has a null space whose basis ``eigh`` picks
      arbitrarily, and gradients of later batches, and ``S``'s running average, have components there; two
      LAPACK builds or dtypes can then take different steps (K-FAC and TKFAC are basis-free);
    - momentum is heavy-ball on the preconditioned direction (``mu = momentum``), weight decay decoupled;
      with ``kl_clip`` set, the directions are first scaled by KL clipping (off by default; the papers'
      algorithms do not have it, their code bases do);
    - parameters outside ``Linear`` / ``Conv2d`` (a param group with ``layer="adam"``) take Adam's
      direction with ``adam_betas`` and ``adam_eps`` and the group's ``lr``;
    - under ``torch.distributed`` the batch statistics are averaged over the ranks, so every rank holds the
      statistics of the global batch;
    - a layer steps when its weight and bias have gradients; a layer with only some of them is a ValueError.
      ``maximize`` descends ``-grad`` with the same curvature (the factors are quadratic in the output
      gradients): the same steps as minimizing the negated loss.

    Use ``KFAC(kfac_param_groups(model), ...)`` (or ``EKFAC``, ``TKFAC``, ``TEKFAC``): the hooks record each
    layer's batch; one forward and one backward per step.

    Args:
        params: param groups from :func:`kfac_param_groups`.
        lr: learning rate ``alpha``, a float or a 1-element tensor (default 1e-2).
        momentum: ``mu`` (default 0.9).
        stat_decay: ``beta`` of the curvature averages (default 0.95).
        damping: Tikhonov ``lambda`` (default 1e-3).
        conv_damping: TKFAC/TEKFAC: a convolution's damping relative to its block's mean eigenvalue (default 0.1).
        weight_decay: decoupled weight decay (default 0).
        curvature_every: steps between curvature updates (default 10).
        inverse_every: steps between inverses / eigenbases (default 100).
        kl_clip: if set, each step's directions are scaled by ``min(1, sqrt(kl_clip / sum lr^2 <D, g>))``, the
            KL-divergence clipping of Ba et al. (2017) that practical K-FAC codes use (default None: off).
        adam_betas, adam_eps: Adam's settings for ``layer="adam"`` groups (default (0.9, 0.999), 1e-8).
        maximize: maximize the objective instead of minimizing it (default False).
    """

    variant = "kfac"
    counters = (STEP, CURVATURE_UPDATES)

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 1e-3,
        conv_damping: float = 0.1,
        weight_decay: float = 0.0,
        curvature_every: int = 10,
        inverse_every: int = 100,
        kl_clip: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            stat_decay=stat_decay,
            damping=damping,
            conv_damping=conv_damping,
            weight_decay=weight_decay,
            curvature_every=curvature_every,
            inverse_every=inverse_every,
            kl_clip=kl_clip,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            maximize=maximize,
        )
        self._build(params, defaults)

    def _build(self, params: Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        """Validate the settings, then build the groups; the family's subclasses call this with their own settings."""
        self._validate(defaults)
        super().__init__(params, defaults)

    def _validate(self, h: dict[str, Any]) -> None:
        """Check every setting the group has (:data:`CHECKS`); subclasses check their own settings after these."""
        for name, check in CHECKS.items():
            if name in h:
                check(h[name])

    def _prepare_group(self, group: dict[str, Any]) -> None:
        if "layer" not in group:
            raise ValueError(
                f"Invalid param group: no 'layer' key ({type(self).__name__} needs the param groups of "
                "kfac_param_groups(model), which record each layer's batch)"
            )
        self._validate(group)
        check_dtypes(type(self).__name__, group["params"])
        if group["layer"] not in LAYERS:
            raise ValueError(f"Invalid layer: {group['layer']!r} (use one of {', '.join(LAYERS)})")

    @property
    def _eigenbasis(self) -> bool:
        return self.variant in ("ekfac", "tekfac")

    @property
    def _trace_restricted(self) -> bool:
        return self.variant in ("tkfac", "tekfac")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step: curvature and inverses when due, then every layer's preconditioned update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layers: list[tuple[dict, dict, Tensor]] = []  # (group, state, gradient matrix)
        for index, group in enumerate(self.param_groups):
            if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use dense gradients")
            if group["layer"] == ADAM:
                _adam_step(group, [p for p in group["params"] if p.grad is not None], self.state)
                continue
            grads = block_grads(type(self).__name__, group, "kfac_param_groups")
            if grads is None:
                continue
            weight = group["params"][0]
            state = self.state[weight]
            if not state:
                self._init_state(group, state, index)
            state[STEP] += 1
            layers.append((group, state, self._layer_gradient(group, state, gradient_matrix(grads))))
        curvature = [(g, s, m) for g, s, m in layers if self._curvature_due(g, s)]
        with record_function("kfac::curvature"):
            batches = {id(s): layer_batch(g) for g, s, _ in curvature}
            self._update_factors([(g, s, batches[id(s)]) for g, s, _ in curvature])
        with record_function("kfac::inverses"):
            self._refresh([(g, s) for g, s, _ in layers if self._inverse_due(g, s)])
        if self._eigenbasis:
            with record_function("kfac::eigenbasis_moments"):
                self._update_scales([(g, s, batches[id(s)]) for g, s, _ in curvature])
        with record_function("kfac::precondition"):
            directions = self._directions(layers)
            for (group, state, _), direction in zip(layers, kl_clipped(layers, directions)):
                self._apply(group, state, direction)
        return loss

    def _init_state(self, group: dict, state: dict, index: int) -> None:
        """A layer's first step: its counters (``index`` is its group's place, for per-layer seeds)."""
        state[STEP] = new_counter(group["params"][0])
        state[CURVATURE_UPDATES] = new_counter(group["params"][0])

    def _layer_gradient(self, group: dict, state: dict, grad: Tensor) -> Tensor:
        """The gradient matrix that is preconditioned (and KL-clipped): the layer's own, here."""
        return grad

    def _curvature_due(self, group: dict, state: dict) -> bool:
        return is_due(state, group["curvature_every"])

    def _inverse_due(self, group: dict, state: dict) -> bool:
        return is_due(state, group["inverse_every"])

    def _update_factors(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """Fold each layer's batch statistics into the running averages (averaged over ranks first)."""
        stats = [
            trace_restricted_factors(a, e) if self._trace_restricted else kfac_factors(a, e) for _, _, (a, e) in jobs
        ]
        stats = mean_over_ranks(stats)
        for (group, state, _), batch in zip(jobs, stats):
            keys = (FACTOR_IN, FACTOR_OUT, TRACE)[: len(batch)]
            for key, value in zip(keys, batch):
                if key not in state:
                    state[key] = torch.zeros_like(value)
                state[key].lerp_(value, 1.0 - group["stat_decay"])
            state[CURVATURE_UPDATES] += 1

    def _update_scales(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """EKFAC's running average of the per-coordinate second moments in the current eigenbasis."""
        moments = [[eigenbasis_second_moments(a, e, state[BASIS_IN], state[BASIS_OUT])] for _, state, (a, e) in jobs]
        for (group, state, _), (moment,) in zip(jobs, mean_over_ranks(moments)):
            if SCALE not in state:
                state[SCALE] = torch.zeros_like(moment)
            state[SCALE].lerp_(moment, 1.0 - group["stat_decay"])

    def _refresh(self, jobs: list[tuple[dict, dict]]) -> None:
        """Invert every due layer's factors (:meth:`_inversions`), one batched call (:meth:`_invert`) per matrix
        size over all layers; each result is stored under its keys."""
        by_size: dict[tuple, list[Inversion]] = defaultdict(list)
        for group, state in jobs:
            for inversion in self._inversions(group, state):
                matrix = inversion.matrix
                by_size[(matrix.shape[0], matrix.dtype, matrix.device, inversion.options)].append(inversion)
        for entries in by_size.values():
            results = self._invert(torch.stack([entry.matrix for entry in entries]), entries)
            for entry, result in zip(entries, results):
                for key, value in zip(entry.keys, result):
                    entry.state[key] = value.clone()

    def _inversions(self, group: dict, state: dict) -> list[Inversion]:
        """The factors of one layer to invert: K-FAC, TKFAC: the damped inverses, with the factored damping;
        EKFAC, TEKFAC: the eigenbases."""
        factor_in, factor_out = self._factors(group, state)
        if self._eigenbasis:
            return [Inversion(state, (BASIS_IN,), factor_in), Inversion(state, (BASIS_OUT,), factor_out)]
        damping_in, damping_out = split_damping(factor_in, factor_out, self._damping(group, state))
        return [Inversion(state, (INVERSE_IN,), factor_in, damping_in), Inversion(state, (INVERSE_OUT,), factor_out, damping_out)]

    def _invert(self, stacked: Tensor, entries: list[Inversion]) -> list[tuple[Tensor, ...]]:
        """The batched inversions of same-sized factors ``[b, n, n]``: Cholesky inverses or eigenbases."""
        if self._eigenbasis:
            return [(basis,) for basis in eigh_decomposition(stacked)[0]]
        dampings = torch.tensor([entry.damping for entry in entries], dtype=stacked.dtype, device=stacked.device)
        return [(inverse,) for inverse in damped_cholesky_inverse(stacked, dampings)]

    def _factors(self, group: dict, state: dict) -> tuple[Tensor, Tensor]:
        """The bias-corrected factors whose Kronecker product is the layer's curvature (TKFAC: scaled by sqrt(c))."""
        correction = bias_correction(group, state)
        factor_in, factor_out = state[FACTOR_IN] / correction, state[FACTOR_OUT] / correction
        if self._trace_restricted:
            traces = float(factor_in.diagonal().sum()) * float(factor_out.diagonal().sum())
            c = float(state[TRACE]) / correction / traces if traces > 0 else 0.0
            factor_in, factor_out = factor_in * math.sqrt(c), factor_out * math.sqrt(c)
        return factor_in, factor_out

    def _damping(self, group: dict, state: dict) -> float:
        """``lambda``; for T(E)KFAC's convolutions ``max(conv_damping * tr(F_hat) / (o i), lambda)``."""
        if not (self._trace_restricted and group["layer"] == CONV2D):
            return group["damping"]
        size = state[FACTOR_IN].shape[0] * state[FACTOR_OUT].shape[0]
        return max(group["conv_damping"] * float(state[TRACE]) / bias_correction(group, state) / size, group["damping"])

    def _directions(self, layers: list[tuple[dict, dict, Tensor]]) -> list[Tensor]:
        """Every layer's direction ``D`` (one layer at a time; SENG batches its solves over layers)."""
        return [self._direction(group, state, grad) for group, state, grad in layers]

    def _direction(self, group: dict, state: dict, grad: Tensor) -> Tensor:
        if not self._eigenbasis:
            return precondition_kronecker(grad, state[INVERSE_IN], state[INVERSE_OUT])
        return precondition_eigenbasis(grad, state[BASIS_IN], state[BASIS_OUT], state[SCALE] / bias_correction(group, state), self._damping(group, state))

    def _apply(self, group: dict, state: dict, direction: Tensor) -> None:
        """``b <- mu b + D``; ``W <- W (1 - lr wd) - lr b`` for the weight and, as the last column, the bias."""
        if group["momentum"] > 0:
            if MOMENTUM_BUFFER not in state:
                state[MOMENTUM_BUFFER] = torch.zeros_like(direction)
            direction = state[MOMENTUM_BUFFER].mul_(group["momentum"]).add_(direction)
        weight, bias = group["params"][0], (group["params"][1] if len(group["params"]) > 1 else None)
        columns = weight[0].numel()
        for p, update in ((weight, direction[:, :columns]), (bias, direction[:, columns] if bias is not None else None)):
            if p is None:
                continue
            if group["weight_decay"] != 0:
                p.mul_(1.0 - lr_value(group) * group["weight_decay"])
            p.add_(update.reshape(p.shape), alpha=-lr_value(group))


class EKFAC(KFAC):
    """EKFAC (George et al. 2018): K-FAC's eigenbasis with per-coordinate second moments; see :class:`KFAC`."""

    variant = "ekfac"


class TKFAC(KFAC):
    """TKFAC (Gao et al. 2021): trace-restricted Kronecker factors; see :class:`KFAC`."""

    variant = "tkfac"


class TEKFAC(KFAC):
    """TEKFAC (Gao et al. 2020): EKFAC's rescaling in TKFAC's eigenbasis, with its damping; see :class:`KFAC`."""

    variant = "tekfac"


def kl_clipped(layers: list[tuple[dict, dict, Tensor]], directions: list[Tensor]) -> list[Tensor]:
    """Directions scaled by ``nu = min(1, sqrt(kl_clip / sum_l lr^2 <D_l, g_l>))`` (Ba et al. 2017), per param group's
    ``kl_clip``, which bounds the step's predicted KL change; unchanged where ``kl_clip`` is None."""
    by_clip: dict[float, list[int]] = defaultdict(list)
    for index, (group, _, _) in enumerate(layers):
        if group.get("kl_clip") is not None:
            by_clip[group["kl_clip"]].append(index)
    directions = list(directions)
    for clip, indices in by_clip.items():
        quadratic = sum(float((directions[i] * layers[i][2]).sum()) * lr_value(layers[i][0]) ** 2 for i in indices)
        nu = min(1.0, math.sqrt(clip / quadratic)) if quadratic > 0 else 1.0
        for i in indices:
            directions[i] = directions[i] * nu
    return directions


def bias_correction(group: dict, state: dict) -> float:
    """``1 - beta^k``, the bias correction of the curvature averages after ``k`` curvature updates."""
    return 1.0 - group["stat_decay"] ** int(state[CURVATURE_UPDATES].item())


def is_due(state: dict, every: int) -> bool:
    """Whether the layer's current step (counting from 1) is one of ``1, 1 + every, 1 + 2 every, ...``."""
    return (int(state[STEP].item()) - 1) % every == 0


def check_single_process(optimizer: str, what: str) -> None:
    """``what`` reads this process's batch slice only: a ValueError under an initialized multi-process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"Invalid setup: {optimizer} {what} from this process's part of the batch, which differs between the "
            f"{dist.get_world_size()} processes; run it in one process"
        )


def mean_over_ranks(stats: list[list[Tensor] | tuple[Tensor, ...]]) -> list[list[Tensor]]:
    """Each statistic averaged over the ranks of an initialized process group (one all-reduce), else as given."""
    stats = [list(s) for s in stats]
    if not stats or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    flat = [t.reshape(-1) for s in stats for t in s]
    buffer = torch.cat(flat)
    dist.all_reduce(buffer)
    buffer /= dist.get_world_size()
    parts = iter(buffer.split([t.numel() for t in flat]))
    return [[next(parts).view_as(t) for t in s] for s in stats]


def _adam_step(group: dict, params: list[Tensor], states: dict) -> None:
    """Adam (eps outside the root, decoupled weight decay) for the parameters outside Linear / Conv2d."""
    for p in params:
        state = states[p]
        if not state:
            state.update({STEP: new_counter(p), EXP_AVG: torch.zeros_like(p), EXP_AVG_SQ: torch.zeros_like(p)})
        state[STEP] += 1
        t, lr = int(state[STEP].item()), lr_value(group)
        adam_update_(p, step_grad(p, group), state[EXP_AVG], state[EXP_AVG_SQ], t, lr, group["adam_betas"],
                     group["adam_eps"], group["weight_decay"])  # fmt: skip


CHECKS: dict[str, Callable[[Any], None]] = {  # the family's shared settings, checked where a group has them
    "lr": check_lr,
    "momentum": partial(check_unit_interval, "momentum"),
    "stat_decay": partial(check_unit_interval, "stat_decay"),
    "damping": partial(check_positive, "damping"),
    "conv_damping": partial(check_positive, "conv_damping"),
    "weight_decay": partial(check_nonnegative, "weight_decay"),
    "curvature_every": partial(check_positive_int, "curvature_every"),
    "inverse_every": partial(check_positive_int, "inverse_every"),
    "kl_clip": lambda clip: clip is None or check_positive("kl_clip", clip),
    "adam_betas": partial(check_betas, name="adam_betas"),
    "adam_eps": partial(check_positive, "adam_eps"),
    "maximize": partial(check_bool, "maximize"),
}
