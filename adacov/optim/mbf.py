"""MBF: the Mini-Block Fisher method (Bahamou, Goldfarb & Ren, "A Mini-Block Fisher Method for
Deep Neural Networks")."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from adacov.optim.adam_update import adam_update_
from adacov.optim.base import STEP, BaseOptimizer, block_grads, lr_value, new_counter, step_grad
from adacov.optim.matrix_functions import cholesky_damped
from adacov.optim.param_groups import with_names
from adacov.optim.validation import (
    check_betas,
    check_bool,
    check_dtypes,
    check_lr,
    check_nonnegative,
    check_nonnegative_int,
    check_positive,
    check_positive_int,
)

__all__ = ["MBF", "mbf_param_groups", "CONV", "ROWS", "SHARED_ROWS", "ADAM"]

CONV = "conv"  # one d x d block per (out, in) kernel of a [O, I, *kernel] weight
ROWS = "rows"  # one block per output neuron over [W_j, b_j] of a linear layer
SHARED_ROWS = "shared_rows"  # one block for all neurons: the average of their outer products
ADAM = "adam"  # the Adam direction (biases of convolutions, normalization, anything unpaired)
BLOCKS = (CONV, ROWS, SHARED_ROWS, ADAM)

EXP_AVG, EXP_AVG_SQ = "exp_avg", "exp_avg_sq"
FISHER, FACTOR, CURVATURE_UPDATES = "fisher", "factor", "curvature_updates"


def mbf_param_groups(model: nn.Module, max_block_size: int = 256, named: bool = False) -> list[dict[str, Any]]:
    """Param groups of MBF's mini-blocks, read off the module structure.

    - ``Conv{1,2,3}d`` weights: ``CONV``; their biases: ``ADAM``.
    - ``Linear(n_in, n_out)``: ``[weight, bias]`` in one ``ROWS`` group (block size ``n_in + 1``), or
      ``SHARED_ROWS`` when ``n_in + 1 > max_block_size``. The default 256 bounds the curvature and
      factor of a per-neuron layer by ``2 * n_out * 257^2`` floats (26 MB for 100 classes).
    - Every other parameter (normalization, embeddings, ...): ``ADAM``.

    Frozen tensors (``requires_grad=False``) are left out: a linear layer with a frozen bias has blocks of
    size ``n_in``, the bias of a frozen weight takes ``ADAM``. Build the groups again after unfreezing.
    ``named=True`` gives each tensor as ``(name, tensor)``, as ``model.named_parameters()`` does.
    """
    check_positive_int("max_block_size", max_block_size)
    groups: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for module in model.modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or not module.weight.requires_grad:
            continue
        if isinstance(module, nn.Linear):
            params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]
            size = module.in_features + len(params) - 1
            groups.append({"params": params, "block": ROWS if size <= max_block_size else SHARED_ROWS})
        else:
            params = [module.weight]
            groups.append({"params": params, "block": CONV})
        claimed.update(id(p) for p in params)
    rest = [p for p in model.parameters() if id(p) not in claimed and p.requires_grad]
    if rest:
        groups.append({"params": rest, "block": ADAM})
    return with_names(groups, model) if named else groups


class MBF(BaseOptimizer):
    r"""Mini-Block Fisher: a block-diagonal empirical Fisher with small blocks, damped and inverted.

    Per block with gradient sub-vector ``g`` (``t`` steps, ``k`` curvature updates so far):

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad \hat m = m / (1 - \beta_1^t) \\
        F &\leftarrow \beta_2 F + (1 - \beta_2) g g^\top \ \text{(every curvature\_every steps)},
            \qquad \hat F = F / (1 - \beta_2^k) \\
        \theta &\leftarrow \theta (1 - \alpha \lambda_{wd}) - \alpha (\hat F + \text{damping}\, I)^{-1} \hat m

    The Cholesky factor of ``F_hat + damping I`` is recomputed every ``inverse_every`` steps (batched
    ``cholesky_ex``, one call for all conv kernels of one size) and applied with ``cholesky_solve``;
    between refreshes the last factor is used with the current ``m_hat``. Blocks that fail to factor
    are refactored in float64 with more jitter, with one warning.

    Blocks (see :func:`mbf_param_groups`; a group's ``block`` key, inferred when absent: 3+ dims ->
    ``conv``, 2 dims -> ``rows`` without bias, else ``adam``):

    - ``conv``: one ``d x d`` block per (out, in) kernel, ``d = prod(kernel)``;
    - ``rows``: a linear layer's group ``[W, b]``: one ``(n_in + 1)``-block per output neuron over
      ``[W_j, b_j]``;
    - ``shared_rows``: one ``(n_in + 1)``-block shared by all neurons, the EMA of
      ``G^T G / n_out`` (the paper's "spatial averaging", applied to a linear layer too large for a
      block per neuron);
    - ``adam``: ``m_hat / (sqrt(v_hat) + eps)``, Adam's direction, as the paper does for the
      parameters of normalization layers.

    A block steps when its tensors have gradients; a ``rows`` block with a gradient for its weight but not
    its bias (or the reverse) is a ValueError. ``maximize`` steps along ``-g``: the same steps as minimizing
    the negated loss.

    Choices the paper leaves open (its formulas were lost in extraction; these follow its text):

    - momentum and curvature are exponential averages with Adam's bias corrections; the curvature's
      correction counts curvature updates, not steps, so it stays exact for ``curvature_every > 1``;
    - weight decay is decoupled and scaled by the learning rate (AdamW), as its Algorithm 2 describes;
    - ``curvature_every=1``: the rank-1 update is cheap (a fused in-place multiply-add);
      ``inverse_every=10``: the factorization is the cost (31,840 5x5 blocks: 218 ms on 2 CPU cores),
      and the paper (appendix 11.4.4) finds the final performance insensitive to both frequencies;
    - the warm start (``warm_start_batches=n``) spends the first ``n`` calls of :meth:`step` on
      curvature alone: ``F`` becomes the plain mean of ``g g^T`` over those batches (no bias
      correction afterwards) and the parameters do not move, as the paper's initialization pass.

    Args:
        params: tensors or param groups (use :func:`mbf_param_groups` for a model).
        lr: learning rate, a float or a 1-element tensor (default 3e-5, the paper's best on CIFAR-100, Table 8).
        betas: ``(beta1, beta2)`` for the momentum and the curvature averages (default (0.9, 0.999)).
        damping: ``lambda`` added to every block (default 3e-3, the paper's value).
        eps: Adam's epsilon for ``adam`` blocks (default 1e-8).
        weight_decay: decoupled weight decay (default 0; the paper's CIFAR-100 best is 10 with lr 3e-5).
        curvature_every: steps between curvature updates (default 1).
        inverse_every: steps between factorizations (default 10).
        warm_start_batches: steps spent estimating the curvature before moving (default 0).
        maximize: maximize the objective instead of minimizing it (default False).
    """

    counters = (STEP, CURVATURE_UPDATES)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        damping: float = 3e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        curvature_every: int = 1,
        inverse_every: int = 10,
        warm_start_batches: int = 0,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            damping=damping,
            eps=eps,
            weight_decay=weight_decay,
            curvature_every=curvature_every,
            inverse_every=inverse_every,
            warm_start_batches=warm_start_batches,
            maximize=maximize,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        params = group["params"]
        if "block" not in group:
            ranks = sorted({p.dim() for p in params})
            if len(ranks) > 1:
                raise ValueError(
                    f"Invalid param group: tensors of ranks {ranks} without a 'block' key "
                    "(MBF needs its blocks grouped: use MBF(mbf_param_groups(model)))"
                )
            rank = ranks[0] if ranks else 1
            group["block"] = CONV if rank >= 3 else ROWS if rank == 2 else ADAM
        _validate(group)
        check_dtypes("MBF", params)
        if group["block"] not in BLOCKS:
            raise ValueError(f"Invalid block: {group['block']!r} (use one of {', '.join(BLOCKS)})")
        if group["block"] in (ROWS, SHARED_ROWS) and params and not _is_linear_layer(params):
            raise ValueError(
                f"Invalid {group['block']!r} group: tensors of shapes {[tuple(p.shape) for p in params]} "
                "(it holds [weight] or [weight, bias] of one linear layer: use mbf_param_groups(model))"
            )

    def _init_buffers(self) -> None:
        self._warned = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One MBF step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        conv_jobs: dict[tuple, list[tuple[Tensor, Tensor, dict, dict]]] = defaultdict(list)
        for group in self.param_groups:
            if group["block"] in (ROWS, SHARED_ROWS):
                grads = block_grads("MBF", group, "mbf_param_groups") or []
                params = group["params"] if grads else []
            else:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [step_grad(p, group) for p in params]
            if not params:
                continue
            if any(g.is_sparse for g in grads):
                raise RuntimeError("MBF does not support sparse gradients; use dense gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    _init_state(p, state, group)
                state[STEP] += 1
            if group["block"] == ADAM:
                self._adam_step(group, params, grads)
            elif group["block"] == CONV:
                for p, grad in zip(params, grads):
                    d = self.state[p][FISHER].shape[-1]
                    conv_jobs[(d, p.dtype, p.device)].append((p, grad, self.state[p], group))
            else:
                self._rows_step(group, params, grads)
        for jobs in conv_jobs.values():
            self._conv_step(jobs)
        return loss

    def _adam_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        for p, grad in zip(params, grads):
            state = self.state[p]
            if _warming(state, group):
                continue
            t = int(state[STEP].item()) - group["warm_start_batches"]
            lr, betas, eps, wd = lr_value(group), group["betas"], group["eps"], group["weight_decay"]
            adam_update_(p, grad, state[EXP_AVG], state[EXP_AVG_SQ], t, lr, betas, eps, wd)

    def _conv_step(self, jobs: list[tuple[Tensor, Tensor, dict, dict]]) -> None:
        """Kernel blocks of one size ``d`` over all conv weights: one batched factorization."""
        d = jobs[0][2][FISHER].shape[-1]
        with record_function("mbf::curvature_update"):
            for _, grad, state, group in jobs:
                _update_curvature(state, group, grad.reshape(-1, d), shared=False)
        due = [(p, state, group) for p, _, state, group in jobs if _factor_due(state, group)]
        if due:
            with record_function("mbf::factorize"):
                sizes = [state[FISHER].shape[0] for _, state, _ in due]
                stacked = torch.cat([state[FISHER] / _curvature_correction(state, group) for _, state, group in due])
                factors, failed = cholesky_damped(stacked, due[0][2]["damping"]) if _same_damping(due) else _factor_each(due)
                self._warn_once(failed)
                for (_, state, _), factor in zip(due, factors.split(sizes)):
                    state[FACTOR].copy_(factor)
        with record_function("mbf::solve"):
            for p, grad, state, group in jobs:
                if _warming(state, group):
                    continue
                beta1 = group["betas"][0]
                state[EXP_AVG].lerp_(grad, 1.0 - beta1)
                direction = torch.cholesky_solve(state[EXP_AVG].view(-1, d, 1), state[FACTOR])
                _decay(p, group)
                p.add_(direction.view(p.shape), alpha=-lr_value(group) / _momentum_correction(state, group))

    def _rows_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """A linear layer's ``[W, b]``: blocks per neuron (``rows``) or one shared block."""
        weight, bias = params[0], (params[1] if len(params) > 1 else None)
        state = self.state[weight]
        shared = group["block"] == SHARED_ROWS
        G = weight_bias_rows(grads[0], grads[1] if bias is not None else None)
        with record_function("mbf::curvature_update"):
            _update_curvature(state, group, G, shared=shared)
        if _factor_due(state, group):
            with record_function("mbf::factorize"):
                factor, failed = cholesky_damped(state[FISHER] / _curvature_correction(state, group), group["damping"])
                self._warn_once(failed)
                state[FACTOR].copy_(factor)
        if _warming(state, group):
            return
        beta1 = group["betas"][0]
        for p, grad in zip(params, grads):
            self.state[p][EXP_AVG].lerp_(grad, 1.0 - beta1)
        M = weight_bias_rows(self.state[weight][EXP_AVG], self.state[bias][EXP_AVG] if bias is not None else None)
        with record_function("mbf::solve"):
            if shared:
                direction = torch.cholesky_solve(M.T, state[FACTOR]).T
            else:
                direction = torch.cholesky_solve(M.unsqueeze(-1), state[FACTOR]).squeeze(-1)
        step_size = -lr_value(group) / _momentum_correction(state, group)
        _decay(weight, group)
        weight.add_(direction[:, : weight.shape[1]], alpha=step_size)
        if bias is not None:
            _decay(bias, group)
            bias.add_(direction[:, -1], alpha=step_size)

    def _warn_once(self, failed: int) -> None:
        if failed and not self._warned:
            warnings.warn(f"MBF: {failed} blocks failed to factor and were redone in float64 with more jitter")
            self._warned = True


def weight_bias_rows(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[n_out, n_in (+1)]``: each output neuron's weights with its bias appended."""
    return torch.cat([weight, bias.unsqueeze(1)], 1) if bias is not None else weight


def _is_linear_layer(params: list[Tensor]) -> bool:
    """``[weight]`` or ``[weight, bias]``: a matrix ``[n_out, n_in]`` and a vector ``[n_out]``."""
    weight, *rest = params
    return weight.dim() == 2 and len(rest) <= 1 and all(b.shape == weight.shape[:1] for b in rest)


def _validate(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"])
    check_positive("damping", h["damping"])
    check_positive("eps", h["eps"])
    check_nonnegative("weight_decay", h["weight_decay"])
    check_positive_int("curvature_every", h["curvature_every"])
    check_positive_int("inverse_every", h["inverse_every"])
    check_nonnegative_int("warm_start_batches", h["warm_start_batches"])
    check_bool("maximize", h["maximize"])


def _init_state(p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
    state[STEP] = new_counter(p)
    state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    block = group["block"]
    if block == ADAM:
        state[EXP_AVG_SQ] = torch.zeros_like(p)
        return
    if block == CONV:
        d = math.prod(p.shape[2:])
        shape = (p.shape[0] * p.shape[1], d, d)
    elif p is group["params"][0]:
        size = p.shape[1] + (len(group["params"]) > 1)
        shape = (size, size) if block == SHARED_ROWS else (p.shape[0], size, size)
    else:
        return  # a linear bias: its curvature lives with the weight
    state[FISHER] = p.new_zeros(shape)
    state[FACTOR] = p.new_zeros(shape)
    state[CURVATURE_UPDATES] = new_counter(p)


def _warming(state: dict, group: dict) -> bool:
    return int(state[STEP].item()) <= group["warm_start_batches"]


def _update_curvature(state: dict, group: dict, G: Tensor, shared: bool) -> None:
    """EMA of ``g g^T`` per row of ``G`` (or of ``G^T G / rows`` when shared); a plain mean while warming."""
    t = int(state[STEP].item())
    warm = group["warm_start_batches"]
    if t <= warm:
        weight_old, weight_new = (t - 1) / t, 1.0 / t
    elif (t - warm - 1) % group["curvature_every"] == 0:
        weight_old, weight_new = group["betas"][1], 1.0 - group["betas"][1]
    else:
        return
    F = state[FISHER]
    if shared:
        F.addmm_(G.T, G, beta=weight_old, alpha=weight_new / G.shape[0])
    else:
        F.mul_(weight_old).addcmul_(G.unsqueeze(-1), G.unsqueeze(-2), value=weight_new)
    if t > warm:
        state[CURVATURE_UPDATES] += 1


def _curvature_correction(state: dict, group: dict) -> float:
    """``1 - beta2^k`` for ``k`` curvature updates; 1 after a warm start (F is then a true mean)."""
    if group["warm_start_batches"] > 0:
        return 1.0
    return 1.0 - group["betas"][1] ** int(state[CURVATURE_UPDATES].item())


def _momentum_correction(state: dict, group: dict) -> float:
    return 1.0 - group["betas"][0] ** (int(state[STEP].item()) - group["warm_start_batches"])


def _factor_due(state: dict, group: dict) -> bool:
    t = int(state[STEP].item()) - group["warm_start_batches"]
    return t >= 1 and (t - 1) % group["inverse_every"] == 0


def _same_damping(due: list[tuple[Tensor, dict, dict]]) -> bool:
    return len({group["damping"] for _, _, group in due}) == 1


def _factor_each(due: list[tuple[Tensor, dict, dict]]) -> tuple[Tensor, int]:
    results = [cholesky_damped(state[FISHER] / _curvature_correction(state, group), group["damping"]) for _, state, group in due]
    return torch.cat([factor for factor, _ in results]), sum(failed for _, failed in results)


def _decay(p: Tensor, group: dict) -> None:
    if group["weight_decay"] != 0:
        p.mul_(1.0 - lr_value(group) * group["weight_decay"])
