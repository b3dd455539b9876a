"""The K-FAC family as torch optimizers: K-FAC, EKFAC, TKFAC and TEKFAC, sharing one implementation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.profiler import record_function
from torch.utils.weak import WeakIdKeyDictionary

from adacov.optim.adam_update import adam_update_
from adacov.optim.base import STEP, BaseOptimizer, block_grads, lr_value, new_counter, step_grad
from adacov.optim.kronecker import (
    eigenbasis_second_moments,
    kfac_factors,
    precondition_eigenbasis,
    precondition_kronecker,
    split_damping,
    trace_restricted_factors,
)
from adacov.optim.matrix_functions import cholesky_damped, symmetric_eigh
from adacov.optim.param_groups import with_names
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

__all__ = ["KFAC", "EKFAC", "TKFAC", "TEKFAC", "kfac_param_groups", "LINEAR", "CONV2D", "ADAM"]

LINEAR, CONV2D, ADAM = "linear", "conv2d", "adam"
LAYERS = (LINEAR, CONV2D, ADAM)
VARIANTS = ("kfac", "ekfac", "tkfac", "tekfac")

CURVATURE_UPDATES = "curvature_updates"
FACTOR_IN, FACTOR_OUT, TRACE = "factor_in", "factor_out", "trace"  # EMAs of A, G (TKFAC: Phi, Psi, tr F)
INVERSE_IN, INVERSE_OUT = "inverse_in", "inverse_out"  # K-FAC, TKFAC: damped inverses
BASIS_IN, BASIS_OUT, SCALE = "basis_in", "basis_out", "scale"  # EKFAC, TEKFAC: eigenbases, EMA of the moments
MOMENTUM_BUFFER = "momentum_buffer"
EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"  # Adam's moments for parameters outside Linear / Conv2d

# The last training batch of every layer that kfac_param_groups hooked, by weight parameter (identity).
_BATCHES: WeakIdKeyDictionary = WeakIdKeyDictionary()


class LayerBatch:
    """A layer's last training-mode inputs and the gradient of the loss with respect to its outputs."""

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs
        self.output_grads: Tensor | None = None

    def record_output_grads(self, grad: Tensor) -> None:
        self.output_grads = grad.detach()


def record_batch(module: nn.Module, args: tuple, output: Tensor) -> None:
    """The forward hook of every layer that :func:`kfac_param_groups` claims: keeps the layer's input under its
    weight (autograd keeps it anyway) and puts a hook on the output tensor, which receives the gradient with
    respect to the output itself, also when a later ``ReLU(inplace=True)`` overwrites it.

    A module-level function, so that ``copy.deepcopy`` and ``pickle`` of a model keep the hook, and the copy
    records its batches under its own weight.
    """
    if module.training and torch.is_grad_enabled() and output.requires_grad and module.weight.requires_grad:
        batch = LayerBatch(args[0].detach())
        _BATCHES[module.weight] = batch
        output.register_hook(batch.record_output_grads)


def kfac_param_groups(model: nn.Module, named: bool = False) -> list[dict[str, Any]]:
    """Param groups of the K-FAC family, one per layer, with hooks that record each layer's batch.

    - ``Linear``: ``[weight, bias]``, ``layer="linear"``;
    - ``Conv2d`` with zero padding given as numbers and ``groups=1``: ``[weight, bias]``, ``layer="conv2d"``
      and the geometry (``kernel_size``, ``stride``, ``padding``, ``dilation``) that unfolds its patches;
    - every other parameter (normalization, other convolutions, ...): ``layer="adam"``, Adam's direction.

    Frozen tensors (``requires_grad=False``) are left out: a layer with a frozen bias is a layer without one,
    the bias of a frozen weight takes Adam's direction. Build the groups again after unfreezing. Each layer's
    hook is added once (calling it again, or on a copy of the model, adds none). ``named=True`` gives each
    tensor as ``(name, tensor)``, as ``model.named_parameters()`` does.
    """
    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not module.weight.requires_grad:
            continue
        if isinstance(module, nn.Linear):
            group: dict[str, Any] = {"layer": LINEAR}
        elif (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        ):
            group = {
                "layer": CONV2D,
                "kernel_size": tuple(module.kernel_size),
                "stride": tuple(module.stride),
                "padding": tuple(module.padding),
                "dilation": tuple(module.dilation),
            }
        else:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
        groups.append({"params": params, **group})
        claimed.update(id(p) for p in params)
        if record_batch not in module._forward_hooks.values():
            module.register_forward_hook(record_batch)
    rest = [p for p in model.parameters() if id(p) not in claimed and p.requires_grad]
    if rest:
        groups.append({"params": rest, "layer": ADAM})
    return with_names(groups, model) if named else groups


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
        _validate(defaults)
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        if "layer" not in group:
            raise ValueError(
                f"Invalid param group: no 'layer' key ({type(self).__name__} needs the param groups of "
                "kfac_param_groups(model), which record each layer's batch)"
            )
        _validate(group)
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
        for group in self.param_groups:
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
                state[STEP] = new_counter(weight)
                state[CURVATURE_UPDATES] = new_counter(weight)
            state[STEP] += 1
            layers.append((group, state, gradient_matrix(grads)))
        curvature = [(g, s, m) for g, s, m in layers if _due(s, g["curvature_every"])]
        with record_function("kfac::curvature"):
            batches = {id(s): layer_batch(g) for g, s, _ in curvature}
            self._update_factors([(g, s, batches[id(s)]) for g, s, _ in curvature])
        with record_function("kfac::inverses"):
            self._refresh([(g, s) for g, s, _ in layers if _due(s, g["inverse_every"])])
        if self._eigenbasis:
            with record_function("kfac::eigenbasis_moments"):
                self._update_scales([(g, s, batches[id(s)]) for g, s, _ in curvature])
        with record_function("kfac::precondition"):
            directions = [self._direction(group, state, grad) for group, state, grad in layers]
            for (group, state, _), direction in zip(layers, kl_clipped(layers, directions)):
                self._apply(group, state, direction)
        return loss

    def _update_factors(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """Fold each layer's batch statistics into the running averages (averaged over ranks first)."""
        stats = [
            trace_restricted_factors(a, e) if self._trace_restricted else kfac_factors(a, e) for _, _, (a, e) in jobs
        ]
        stats = _mean_over_ranks(stats)
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
        for (group, state, _), (moment,) in zip(jobs, _mean_over_ranks(moments)):
            if SCALE not in state:
                state[SCALE] = torch.zeros_like(moment)
            state[SCALE].lerp_(moment, 1.0 - group["stat_decay"])

    def _refresh(self, jobs: list[tuple[dict, dict]]) -> None:
        """Inverses (K-FAC, TKFAC) or eigenbases (EKFAC, TEKFAC) of every due layer's two factors,
        one batched decomposition per matrix size."""
        by_size: dict[tuple, list[tuple[dict, str, Tensor, float]]] = defaultdict(list)
        for group, state in jobs:
            factor_in, factor_out = self._factors(group, state)
            if self._eigenbasis:
                pairs = ((BASIS_IN, factor_in, 0.0), (BASIS_OUT, factor_out, 0.0))
            else:
                damping_in, damping_out = split_damping(factor_in, factor_out, self._damping(group, state))
                pairs = ((INVERSE_IN, factor_in, damping_in), (INVERSE_OUT, factor_out, damping_out))
            for key, matrix, damping in pairs:
                by_size[(matrix.shape[0], matrix.dtype, matrix.device)].append((state, key, matrix, damping))
        for entries in by_size.values():
            stacked = torch.stack([matrix for _, _, matrix, _ in entries])
            if self._eigenbasis:
                results = symmetric_eigh(stacked)[1]
            else:
                eye = torch.eye(stacked.shape[-1], dtype=stacked.dtype, device=stacked.device)
                dampings = torch.tensor([d for *_, d in entries], dtype=stacked.dtype, device=stacked.device)
                factor, _ = cholesky_damped(stacked + dampings.view(-1, 1, 1) * eye, 0.0)
                results = torch.cholesky_inverse(factor)
            for (state, key, _, _), result in zip(entries, results):
                state[key] = result.clone()

    def _factors(self, group: dict, state: dict) -> tuple[Tensor, Tensor]:
        """The bias-corrected factors whose Kronecker product is the layer's curvature (TKFAC: scaled by sqrt(c))."""
        correction = _correction(group, state)
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
        return max(group["conv_damping"] * float(state[TRACE]) / _correction(group, state) / size, group["damping"])

    def _direction(self, group: dict, state: dict, grad: Tensor) -> Tensor:
        if not self._eigenbasis:
            return precondition_kronecker(grad, state[INVERSE_IN], state[INVERSE_OUT])
        return precondition_eigenbasis(grad, state[BASIS_IN], state[BASIS_OUT], state[SCALE] / _correction(group, state), self._damping(group, state))

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


def gradient_matrix(grads: list[Tensor]) -> Tensor:
    """The layer's gradient as ``[o, i]`` from ``[weight's, bias's]``: the weight's reshaped, the bias's (if
    any) as the last column."""
    grad = grads[0].reshape(grads[0].shape[0], -1)
    if len(grads) > 1:
        grad = torch.cat([grad, grads[1].unsqueeze(1)], 1)
    return grad


def layer_batch(group: dict) -> tuple[Tensor, Tensor]:
    """``(a, e)`` of the layer's last batch: inputs ``[N, T, i]`` (ones appended for a bias) and per-sample
    output gradients ``[N, T, o]`` (``N`` times autograd's, for a mean loss)."""
    batch = _BATCHES.get(group["params"][0])
    if batch is None or batch.output_grads is None:
        raise ValueError(
            f"Invalid step: no batch recorded for a {group['layer']} layer (the K-FAC family needs the groups of "
            "kfac_param_groups(model), and one forward in training mode and one backward before each step)"
        )
    x, grad_out = batch.inputs, batch.output_grads
    n = x.shape[0]
    if group["layer"] == CONV2D:
        patches = F.unfold(x, group["kernel_size"], dilation=group["dilation"], padding=group["padding"], stride=group["stride"])
        a = patches.mT
        e = grad_out.reshape(n, grad_out.shape[1], -1).mT
    else:
        a = x.reshape(n, -1, x.shape[-1])
        e = grad_out.reshape(n, -1, grad_out.shape[-1])
    if len(group["params"]) > 1:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
    return a, e * n


def kl_clipped(layers: list[tuple[dict, dict, Tensor]], directions: list[Tensor]) -> list[Tensor]:
    """Directions scaled by ``nu = min(1, sqrt(kl_clip / sum_l lr^2 <D_l, g_l>))`` (Ba et al. 2017), per param group's
    ``kl_clip``, which bounds the step's predicted KL change; unchanged where ``kl_clip`` is None."""
    by_clip: dict[float, list[int]] = defaultdict(list)
    for index, (group, _, _) in enumerate(layers):
        if group["kl_clip"] is not None:
            by_clip[group["kl_clip"]].append(index)
    directions = list(directions)
    for clip, indices in by_clip.items():
        quadratic = sum(float((directions[i] * layers[i][2]).sum()) * lr_value(layers[i][0]) ** 2 for i in indices)
        nu = min(1.0, math.sqrt(clip / quadratic)) if quadratic > 0 else 1.0
        for i in indices:
            directions[i] = directions[i] * nu
    return directions


def _correction(group: dict, state: dict) -> float:
    """``1 - beta^k``, the bias correction of the curvature averages after ``k`` curvature updates."""
    return 1.0 - group["stat_decay"] ** int(state[CURVATURE_UPDATES].item())


def _due(state: dict, every: int) -> bool:
    return (int(state[STEP].item()) - 1) % every == 0


def _mean_over_ranks(stats: list[list[Tensor] | tuple[Tensor, ...]]) -> list[list[Tensor]]:
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


def _validate(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_unit_interval("momentum", h["momentum"])
    check_unit_interval("stat_decay", h["stat_decay"])
    check_positive("damping", h["damping"])
    check_positive("conv_damping", h["conv_damping"])
    check_nonnegative("weight_decay", h["weight_decay"])
    check_positive_int("curvature_every", h["curvature_every"])
    check_positive_int("inverse_every", h["inverse_every"])
    if h["kl_clip"] is not None:
        check_positive("kl_clip", h["kl_clip"])
    check_betas(h["adam_betas"], "adam_betas")
    check_positive("adam_eps", h["adam_eps"])
    check_bool("maximize", h["maximize"])
