"""AdaCov: Adam with a full covariance estimate inside each convolution kernel."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from adacov.optim.base import STEP, BaseOptimizer, lr_value, new_counter, step_grad
from adacov.optim.matrix_functions import apply_inverse_root, blend_offdiagonal, symmetric_eigh
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

__all__ = ["AdaCov", "STEP", "EXP_AVG", "EXP_AVG_SQ", "EXP_COV", "BASIS", "BASIS_EIG_COV", "BASIS_EIG_DIAG", "update_covariance", "uses_covariance"]

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
EXP_COV = "exp_cov"
BASIS = "basis"  # fast mode: Q of the last eigendecomposition, [O*I, d, d]
BASIS_EIG_COV = "basis_eig_cov"  # fast mode: diag(Q^T C Q), tracked every step, [O*I, d]
BASIS_EIG_DIAG = "basis_eig_diag"  # fast mode: diag(Q^T diag(C) Q), tracked every step, [O*I, d]


def uses_covariance(p: Tensor) -> bool:
    """A tensor ``[O, I, *kernel]`` with 3+ dims and a kernel of 2+ entries gets covariance blocks."""
    return p.dim() >= 3 and math.prod(p.shape[2:]) > 1


def offdiagonal_scale(step: int, offdiag_warmup: float) -> float:
    """``s(t) = 1 - 10^(-t / offdiag_warmup)``: 0 at t = 0, about 0.9 after one warm-up period."""
    return 1.0 - 10.0 ** (-step / offdiag_warmup)


class AdaCov(BaseOptimizer):
    r"""AdaCov (Stroganoff, "AdaCov: more efficient learning by estimating gradient covariances").

    Adam whose diagonal second-moment estimate is replaced, inside each convolution kernel, by a
    full covariance estimate. With ``t`` the step count (from 1), ``g`` the gradient:

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad \hat m = m / (1 - \beta_1^t) \\
        \text{kernel blocks } (d = \prod \text{kernel} > 1): \quad
        C &\leftarrow \beta_2 C + (1 - \beta_2) g g^\top, \qquad \hat C = C / (1 - \beta_2^t) \\
        \hat C_s &= s(t) \hat C + (1 - s(t)) \operatorname{diag}(\hat C), \qquad
            s(t) = 1 - 10^{-t / \text{offdiag\_warmup}} \\
        \theta &\leftarrow \theta - \alpha (\hat C_s + \text{cov\_eps}^2 I)^{-1/2} \hat m \\
        \text{other tensors:} \quad
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
        \theta \leftarrow \theta - \alpha \hat m / \sqrt{\hat v + \epsilon^2}

    A tensor of shape ``[O, I, *kernel]`` (3 or more dims: conv weights of any dimension) holds
    ``O * I`` blocks of size ``d x d``. 1x1 kernels (``d = 1``) take the diagonal rule with
    ``cov_eps`` in place of ``eps``, which is what the block rule reduces to. Weight decay is
    decoupled (AdamW): ``theta <- theta * (1 - lr * weight_decay)`` before the update. ``maximize`` steps
    along ``-g``: the same steps as minimizing the negated loss.

    Fast mode (``basis_refresh_every = T > 1``): the eigenbasis ``Q`` of ``C_s`` is recomputed only
    every ``T`` steps (and every step during the first ``basis_refresh_warmup`` steps). In between,
    the step uses the cached ``Q`` with the exact Rayleigh quotients of the current ``C_s`` in it,
    ``lambda = diag(Q^T C_s Q) = s(t) diag(Q^T C Q) + (1 - s(t)) (Q o Q)^T diag(C)``, both terms tracked
    by their exact recursions ``lambda_C <- beta2 lambda_C + (1 - beta2) (Q^T g)^2`` and
    ``lambda_D <- beta2 lambda_D + (1 - beta2) (Q o Q)^T g^2`` (SOAP / EKFAC style), and applies
    ``Q ((Q^T m_hat) / sqrt(lambda / (1 - beta2^t) + cov_eps^2))``. On a refresh step it equals the
    exact step; ``T = 1`` is the exact algorithm, bit for bit.

    The inverse root is applied as ``Q diag((w / (1 - beta2^t) + cov_eps^2)^-1/2) Q^T m_hat`` from
    one batched eigendecomposition ``C_s = Q diag(w) Q^T`` per kernel size, over all tensors at once;
    eigenvalues are clamped at 0 before the root.

    Args:
        params: tensors or param groups.
        lr: learning rate ``alpha``, a float or a 1-element tensor (default 1e-3).
        betas: ``(beta1, beta2)`` of the moment averages (default (0.9, 0.999)).
        eps: ``epsilon`` inside the square root for tensors without blocks (default 1e-8).
        cov_eps: ``epsilon`` for kernel blocks (default 1e-5, the paper's choice).
        offdiag_warmup: time constant, in steps, of ``s(t)`` (default 390, about one CIFAR epoch at
            batch 128).
        weight_decay: decoupled weight decay (default 0).
        basis_refresh_every: steps between eigendecompositions (default 1: the exact algorithm).
        basis_refresh_warmup: steps at the start that always refresh (default 390, one CIFAR epoch at
            batch 128: while ``s(t)`` rises from 0 to 0.9 and the average holds few gradients, the
            covariance and its basis change fastest; this is 1/20 of the paper's training).
        maximize: maximize the objective instead of minimizing it (default False).

    State per tensor: ``step``; ``exp_avg`` (m, shaped as the tensor); ``exp_cov`` (``[O*I, d, d]``)
    for kernel blocks or ``exp_avg_sq`` (v) otherwise; in fast mode also ``basis``,
    ``basis_eig_cov`` and ``basis_eig_diag``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        cov_eps: float = 1e-5,
        offdiag_warmup: float = 390.0,
        weight_decay: float = 0.0,
        basis_refresh_every: int = 1,
        basis_refresh_warmup: int = 390,
        *,
        maximize: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            cov_eps=cov_eps,
            offdiag_warmup=offdiag_warmup,
            weight_decay=weight_decay,
            basis_refresh_every=basis_refresh_every,
            basis_refresh_warmup=basis_refresh_warmup,
            maximize=maximize,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        _validate(group)
        check_dtypes("AdaCov", group["params"])

    def _init_buffers(self) -> None:
        self._workspace = EighWorkspace()
        self._basis_cache = BasisCache()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held now: each state entry summed over tensors, plus the buffers that are not state.

        ``"basis caches"`` is fast mode's ``Q o Q`` (derived from ``basis``, rebuilt after loading);
        ``"eigh workspace"`` is the reused input and output of the batched ``eigh``.
        """
        held: dict[str, int] = defaultdict(int)
        for state in self.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    held[key] += value.numel() * value.element_size()
        held["basis caches"] = self._basis_cache.nbytes()
        held["eigh workspace"] = self._workspace.nbytes()
        return dict(held)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdaCov step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        blocks_by_size: dict[tuple, list[tuple[Tensor, Tensor, dict, dict]]] = defaultdict(list)
        for group in self.param_groups:
            diagonal: list[tuple[Tensor, Tensor, dict, float]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaCov does not support sparse gradients; use dense gradients")
                state = self.state[p]
                if not state:
                    _init_state(p, state)
                state[STEP] += 1
                if EXP_COV in state:
                    d = state[EXP_COV].shape[-1]
                    blocks_by_size[(d, p.dtype, p.device)].append((p, step_grad(p, group), state, group))
                else:
                    eps = group["cov_eps"] if p.dim() >= 3 else group["eps"]
                    diagonal.append((p, step_grad(p, group), state, eps))
            if diagonal:
                _diagonal_step(group, diagonal)
        for jobs in blocks_by_size.values():
            refresh, cached = [], []
            for job in jobs:
                (refresh if _refresh_due(job[2], job[3]) else cached).append(job)
            _update_moments(jobs)
            if refresh:
                _refresh_step(refresh, self._workspace, self._basis_cache)
            for job in cached:
                _cached_basis_step(*job, self._basis_cache)
        return loss


def _validate(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"])
    check_positive("eps", h["eps"])
    check_positive("cov_eps", h["cov_eps"])
    check_positive("offdiag_warmup", h["offdiag_warmup"])
    check_nonnegative("weight_decay", h["weight_decay"])
    check_positive_int("basis_refresh_every", h["basis_refresh_every"])
    check_nonnegative_int("basis_refresh_warmup", h["basis_refresh_warmup"])
    check_bool("maximize", h["maximize"])


def _init_state(p: Tensor, state: dict[str, Tensor]) -> None:
    state[STEP] = new_counter(p)
    state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    if uses_covariance(p):
        d = math.prod(p.shape[2:])
        state[EXP_COV] = p.new_zeros(p.shape[0] * p.shape[1], d, d)
    else:
        state[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _diagonal_step(group: dict[str, Any], items: list[tuple[Tensor, Tensor, dict, float]]) -> None:
    """``theta <- theta * (1 - lr wd) - lr * m_hat / sqrt(v_hat + eps^2)`` for a list of tensors."""
    lr, (beta1, beta2), wd = lr_value(group), group["betas"], group["weight_decay"]
    params = [p for p, _, _, _ in items]
    grads = [g for _, g, _, _ in items]
    exp_avgs = [s[EXP_AVG] for _, _, s, _ in items]
    exp_avg_sqs = [s[EXP_AVG_SQ] for _, _, s, _ in items]
    steps = [int(s[STEP].item()) for _, _, s, _ in items]
    if wd != 0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, [1.0 - beta2**t for t in steps])
    torch._foreach_add_(denom, [eps * eps for _, _, _, eps in items])
    torch._foreach_sqrt_(denom)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])


class EighWorkspace:
    """Buffers ``(A, w, Q)`` per block shape, reused from step to step (not optimizer state).

    A fresh 80 MB buffer each step costs more in page faults than the arithmetic on it
    (31,840 5x5 blocks: 37 ms to fill a new one, 5.5 ms to refill an old one, 2 CPU cores).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def get(self, blocks: int, d: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = (blocks, d, like.dtype, like.device)
        if key not in self._buffers:
            self._buffers = {k: v for k, v in self._buffers.items() if k[1:] != key[1:]}
            self._buffers[key] = (like.new_empty(blocks, d, d), like.new_empty(blocks, d), like.new_empty(blocks, d, d))
        return self._buffers[key]

    def nbytes(self) -> int:
        """Bytes of every buffer held."""
        return sum(b.numel() * b.element_size() for buffers in self._buffers.values() for b in buffers)


class BasisCache:
    """``Q o Q`` of each tensor's cached basis, for ``lambda_D``: derived from state, never saved.

    Rebuilt from ``state["basis"]`` when missing, e.g. after ``load_state_dict``. ``Q^T`` needs no
    copy: a row vector times the transposed view ``Q.mT`` is as fast as times a contiguous ``Q^T``
    (31,840 5x5 blocks: 3.4 ms and 3.8 ms, 2 CPU cores), while ``Q`` times a column takes 6.6 ms.
    """

    def __init__(self) -> None:
        self._derived: dict[int, tuple[Tensor, Tensor]] = {}

    def refresh(self, p: Tensor, Q: Tensor) -> Tensor:
        old = self._derived.get(id(p))
        Q_sq = old[1] if old is not None and old[1].shape == Q.shape else torch.empty_like(Q)
        torch.mul(Q, Q, out=Q_sq)
        self._derived[id(p)] = (Q, Q_sq)
        return Q_sq

    def nbytes(self) -> int:
        """Bytes of the ``Q o Q`` copies (``Q`` itself is optimizer state)."""
        return sum(Q_sq.numel() * Q_sq.element_size() for _, Q_sq in self._derived.values())

    def get(self, p: Tensor, Q: Tensor) -> Tensor:
        cached = self._derived.get(id(p))
        if cached is None or cached[0] is not Q:
            return self.refresh(p, Q)
        return cached[1]


def _refresh_due(state: dict, group: dict) -> bool:
    """Exact path (T = 1), no basis yet, the warm-up, or every T-th step after it."""
    every = group["basis_refresh_every"]
    if every == 1 or BASIS not in state:
        return True
    t, warmup = int(state[STEP].item()), group["basis_refresh_warmup"]
    return t <= warmup or (t - warmup - 1) % every == 0


def _update_moments(jobs: list[tuple[Tensor, Tensor, dict, dict]]) -> None:
    """``m <- beta1 m + (1 - beta1) g`` and ``C <- beta2 C + (1 - beta2) g g^T`` for every kernel block."""
    with record_function("adacov::covariance_update"):
        for _, grad, state, group in jobs:
            beta1, beta2 = group["betas"]
            state[EXP_AVG].lerp_(grad, 1.0 - beta1)
            update_covariance(state[EXP_COV], grad.reshape(-1, state[EXP_COV].shape[-1]), beta2)


def update_covariance(C: Tensor, g: Tensor, beta2: float) -> None:
    """``C <- beta2 C + (1 - beta2) g g^T`` for ``C`` ``[B, d, d]`` and ``g`` ``[B, d]``.

    In place, with the outer product broadcast inside ``addcmul_`` (no ``[B, d, d]`` temporary).
    """
    C.mul_(beta2).addcmul_(g.unsqueeze(-1), g.unsqueeze(-2), value=1.0 - beta2)


def _refresh_step(jobs: list[tuple[Tensor, Tensor, dict, dict]], workspace: EighWorkspace, cache: BasisCache) -> None:
    """The exact step for tensors sharing one block size ``d``: one batched ``eigh`` for all of them.

    Tensors in fast mode also keep the new basis and the Rayleigh quotients that it starts from.
    """
    d = jobs[0][2][EXP_COV].shape[-1]
    sizes = [state[EXP_COV].shape[0] for _, _, state, _ in jobs]
    stacked, w, Q = workspace.get(sum(sizes), d, like=jobs[0][2][EXP_COV])
    for (_, _, state, group), block in zip(jobs, stacked.split(sizes)):
        blend_offdiagonal(state[EXP_COV], _scale(state, group), out=block)
    with record_function("adacov::eigh"):
        symmetric_eigh(stacked, out=(w, Q))
    with record_function("adacov::apply_inverse_root"):
        for (p, _, state, group), w_p, Q_p in zip(jobs, w.split(sizes), Q.split(sizes)):
            t = int(state[STEP].item())
            direction = apply_inverse_root(
                Q_p, w_p, state[EXP_AVG].view(-1, d), shift=group["cov_eps"] ** 2, scale=1.0 / (1.0 - group["betas"][1] ** t)
            )
            _apply(p, direction, t, group)
    with record_function("adacov::store_basis"):
        for (p, _, state, group), Q_p in zip(jobs, Q.split(sizes)):
            if group["basis_refresh_every"] > 1:
                _store_basis(p, state, Q_p, cache)


def _store_basis(p: Tensor, state: dict, Q: Tensor, cache: BasisCache) -> None:
    """Keep ``Q`` with ``lambda_C = diag(Q^T C Q)`` and ``lambda_D = (Q o Q)^T diag(C)``."""
    C = state[EXP_COV]
    if BASIS not in state:
        state[BASIS] = torch.empty_like(Q)
        state[BASIS_EIG_COV] = Q.new_empty(Q.shape[:-1])
        state[BASIS_EIG_DIAG] = Q.new_empty(Q.shape[:-1])
    state[BASIS].copy_(Q)
    torch.sum(torch.bmm(C, Q).mul_(Q), dim=-2, out=state[BASIS_EIG_COV])
    Q_sq = cache.refresh(p, state[BASIS])
    diagonal = C.diagonal(dim1=-2, dim2=-1).contiguous()  # a strided operand sends bmm down a per-block path
    state[BASIS_EIG_DIAG].copy_(torch.bmm(diagonal.unsqueeze(1), Q_sq).squeeze(1))


def _cached_basis_step(p: Tensor, grad: Tensor, state: dict, group: dict, cache: BasisCache) -> None:
    """Fast-mode step in the cached basis: track ``lambda_C``, ``lambda_D`` and precondition with them."""
    with record_function("adacov::cached_basis_step"):
        Q = state[BASIS]
        d = Q.shape[-1]
        beta2 = group["betas"][1]
        Q_sq = cache.get(p, Q)
        g = grad.reshape(-1, d)
        rotated = torch.bmm(torch.stack([g, state[EXP_AVG].view(-1, d)], 1), Q)  # rows g^T Q and m^T Q
        g_rot, m_rot = rotated.unbind(1)
        state[BASIS_EIG_COV].mul_(beta2).addcmul_(g_rot, g_rot, value=1.0 - beta2)
        g_sq_rot = torch.bmm(g.square().unsqueeze(1), Q_sq).squeeze(1)
        state[BASIS_EIG_DIAG].mul_(beta2).add_(g_sq_rot, alpha=1.0 - beta2)
        s = _scale(state, group)
        t = int(state[STEP].item())
        eig = torch.lerp(state[BASIS_EIG_DIAG], state[BASIS_EIG_COV], s)  # s lambda_C + (1 - s) lambda_D
        root = eig.clamp_min_(0.0).div_(1.0 - beta2**t).add_(group["cov_eps"] ** 2).rsqrt_()
        direction = torch.bmm(m_rot.mul_(root).unsqueeze(1), Q.mT).squeeze(1)  # (Q y)^T = y^T Q^T
        _apply(p, direction, t, group)


def _scale(state: dict, group: dict) -> float:
    return offdiagonal_scale(int(state[STEP].item()), group["offdiag_warmup"])


def _apply(p: Tensor, direction: Tensor, t: int, group: dict) -> None:
    """``theta <- theta (1 - lr wd) - lr / (1 - beta1^t) * direction``."""
    lr, wd = lr_value(group), group["weight_decay"]
    if wd != 0:
        p.mul_(1.0 - lr * wd)
    p.add_(direction.view(p.shape), alpha=-lr / (1.0 - group["betas"][0] ** t))
