"""AdaCov: Adam with a full covariance estimate inside each convolution kernel."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.profiler import record_function

from adacov.optim.base import STEP, BaseOptimizer, lr_value, new_counter, step_grad
from adacov.optim.compiled_step import cached_basis_steps, compiled, has_cxx_compiler, moment_updates
from adacov.optim.distributor import Distributor, Job, Rows
from adacov.optim.matrix_functions import (
    add_folded_outer,
    apply_inverse_root,
    blend_offdiagonal,
    fold_symmetric,
    folded_width,
    offdiagonal_mass,
    symmetric_eigh,
    unfold_symmetric,
)
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

__all__ = [
    "AdaCov", "STEP", "EXP_AVG", "EXP_AVG_SQ", "EXP_COV", "EXP_COV_FOLDED", "EXP_COV_SCALE", "BASIS", "BASIS_EIG_COV",
    "BASIS_EIG_DIAG", "folded_covariance", "update_covariance", "uses_covariance",
]  # fmt: skip

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
EXP_COV = "exp_cov"  # exact mode: C, [O*I, d, d]
EXP_COV_FOLDED = "exp_cov_folded"  # fast mode: C / c folded (matrix_functions.fold_symmetric), [O*I, d // 2 + 1, d]
EXP_COV_SCALE = "exp_cov_scale"  # fast mode: c, a Python float (load_state_dict would cast a tensor to the dtype of p)
BASIS = "basis"  # fast mode: Q of the kernel's last eigendecomposition, [O*I, d, d]
BASIS_EIG_COV = "basis_eig_cov"  # fast mode: lambda_C = diag(Q^T C Q), tracked every step, [O*I, d]
BASIS_EIG_DIAG = "basis_eig_diag_hat"  # fast mode: diag(Q^T diag(C) Q) / (1 - beta2^t) at the refresh, [O*I, d]
# Fast mode before issue 23 kept C unfolded and tracked diag(Q^T diag(C) Q) every step under this key.
_TRACKED_EIG_DIAG = "basis_eig_diag"
# Fast mode folds the decay beta2 of C into the scale c, so that a step reads and writes the folded blocks once;
# c multiplies into them when it falls below this.
_SMALLEST_SCALE = 2.0**-20


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

    Fast mode (``basis_refresh_every = T > 1``) keeps each kernel's eigenbasis ``Q`` of ``C_s`` between
    decompositions and steps with the Rayleigh quotients of the current ``C_s`` in it,
    ``lambda = s(t) lambda_C + (1 - s(t)) lambda_D``: ``lambda_C = diag(Q^T C Q)`` tracked exactly,
    ``lambda_C <- beta2 lambda_C + (1 - beta2) (Q^T g)^2`` (SOAP / EKFAC style), and ``lambda_D = diag(Q^T
    diag(C) Q) / (1 - beta2^t)`` as it was at the kernel's last decomposition (it enters with weight
    ``1 - s(t) <= 0.1`` after one ``offdiag_warmup``, and the diagonal of C moves by about ``T (1 - beta2)``
    relative in ``T`` steps). The step is ``Q ((Q^T m_hat) / sqrt(s lambda_C / (1 - beta2^t) + (1 - s)
    lambda_D + cov_eps^2))``; right after a decomposition it is the exact step. Every kernel is decomposed
    every step during the first ``basis_refresh_warmup`` steps. After that, each step checks ``1/T`` of each
    tensor's kernels (a contiguous range, so every kernel is checked every ``T`` steps and no step spikes) and
    decomposes those whose basis has drifted: ``offdiagonal_mass(Q^T C_s Q) > basis_drift_threshold``, the
    off-diagonal entries of ``C_s`` in the cached basis relative to its diagonal as the inverse root weighs
    them (``matrix_functions.offdiagonal_mass``; 0 decomposes every checked kernel). C is stored folded
    (``d // 2 + 1`` circular diagonals: each distinct entry of the symmetric block once for odd ``d``) as
    ``C = c F``, so the step's ``C <- beta2 C + (1 - beta2) g g^T`` is ``c <- beta2 c``,
    ``F <- F + (1 - beta2) / c g g^T``: one pass over F.
    ``T = 1`` is the exact algorithm, bit for bit.

    The inverse root is applied as ``Q diag((w / (1 - beta2^t) + cov_eps^2)^-1/2) Q^T m_hat`` from
    one batched eigendecomposition ``C_s = Q diag(w) Q^T`` per kernel size, over all tensors at once;
    eigenvalues are clamped at 0 before the root. Under ``torch.distributed`` with more than one rank (DDP:
    every rank holds the same state and sees the same averaged gradient), the ranks share each step's
    decompositions: each decomposes its share of the kernels, balanced by cost, and the results are
    all-gathered (``adacov.optim.distributor``), so the state stays identical on every rank.

    Args:
        params: tensors or param groups.
        lr: learning rate ``alpha``, a float or a 1-element tensor (default 1e-3).
        betas: ``(beta1, beta2)`` of the moment averages (default (0.9, 0.999)).
        eps: ``epsilon`` inside the square root for tensors without blocks (default 1e-8).
        cov_eps: ``epsilon`` for kernel blocks (default 1e-5, the paper's choice).
        offdiag_warmup: time constant, in steps, of ``s(t)`` (default 390, about one CIFAR epoch at
            batch 128).
        weight_decay: decoupled weight decay (default 0).
        basis_refresh_every: steps between checks of a kernel's cached basis (default 1: the exact algorithm).
        basis_refresh_warmup: steps at the start that decompose every kernel (default 390, one CIFAR epoch at
            batch 128: while ``s(t)`` rises from 0 to 0.9 and the average holds few gradients, the
            covariance and its basis change fastest; this is 1/20 of the paper's training).
        basis_drift_threshold: a checked kernel is decomposed again when its ``offdiagonal_mass`` exceeds this
            (default 0: every checked kernel, so each basis is renewed every ``T`` steps; 0.2 skips most
            bases that stayed put, at the price of the check).
        maximize: maximize the objective instead of minimizing it (default False).
        compile_step: run fast mode's update of m and C and its cached-basis step as two functions compiled by
            ``torch.compile`` (``adacov.optim.compiled_step``; default False). The same step up to float rounding,
            fused into loops over the kernels; the first step of each block size compiles them. Needs a C++
            compiler on the CPU. Exact mode has no cached step and ignores it.
        shard_decompositions: share the decompositions among the ranks of an initialized process group
            with more than one rank (default True). Turn it off when the ranks' gradients differ (no DDP).

    State per tensor: ``step``; ``exp_avg`` (m, shaped as the tensor); for kernel blocks ``exp_cov``
    (``[O*I, d, d]``) in exact mode, or in fast mode ``exp_cov_folded`` (``[O*I, d // 2 + 1, d]``),
    ``exp_cov_scale``, ``basis``, ``basis_eig_cov`` and ``basis_eig_diag_hat``; ``exp_avg_sq`` (v) for other tensors. A checkpoint of the
    other mode, or of fast mode's earlier layout (C unfolded, ``basis_eig_diag`` tracked), is converted on
    the next step.
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
        basis_drift_threshold: float = 0.0,
        *,
        maximize: bool = False,
        compile_step: bool = False,
        shard_decompositions: bool = True,
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
            basis_drift_threshold=basis_drift_threshold,
            maximize=maximize,
            compile_step=compile_step,
            shard_decompositions=shard_decompositions,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        _validate(group)
        check_dtypes("AdaCov", group["params"])

    def _init_buffers(self) -> None:
        self._workspace = EighWorkspace()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held now: each state entry summed over tensors, plus ``"eigh workspace"``, the reused input and
        output of the batched ``eigh`` (not state)."""
        held: dict[str, int] = defaultdict(int)
        for state in self.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    held[key] += value.numel() * value.element_size()
        held["eigh workspace"] = self._workspace.nbytes()
        return dict(held)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdaCov step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        kernels: dict[tuple, list[Kernel]] = defaultdict(list)
        for group in self.param_groups:
            diagonal: list[tuple[Tensor, Tensor, dict, float]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaCov does not support sparse gradients; use dense gradients")
                state = self.state[p]
                if not state:
                    _init_state(p, state, group)
                elif uses_covariance(p):
                    _match_layout(state, group)
                state[STEP] += 1
                if uses_covariance(p):
                    fast = group["basis_refresh_every"] > 1
                    key = (fast, math.prod(p.shape[2:]), p.dtype, p.device, group["shard_decompositions"],
                           fast and group["compile_step"])
                    kernels[key].append(Kernel(p, step_grad(p, group), state, group))
                else:
                    eps = group["cov_eps"] if p.dim() >= 3 else group["eps"]
                    diagonal.append((p, step_grad(p, group), state, eps))
            if diagonal:
                _diagonal_step(group, diagonal)
        for (fast, *_, shared, compile_step), jobs in kernels.items():
            if fast:
                _fast_step(jobs, self._workspace, Distributor(shared), compile_step)
            else:
                _exact_step(jobs, self._workspace, Distributor(shared))
        return loss


class Kernel(NamedTuple):
    """A tensor of kernel blocks in this step: the parameter, the gradient it descends, its state and group."""

    p: Tensor
    grad: Tensor
    state: dict
    group: dict


def _validate(h: dict[str, Any]) -> None:
    check_lr(h["lr"])
    check_betas(h["betas"])
    check_positive("eps", h["eps"])
    check_positive("cov_eps", h["cov_eps"])
    check_positive("offdiag_warmup", h["offdiag_warmup"])
    check_nonnegative("weight_decay", h["weight_decay"])
    check_positive_int("basis_refresh_every", h["basis_refresh_every"])
    check_nonnegative_int("basis_refresh_warmup", h["basis_refresh_warmup"])
    check_nonnegative("basis_drift_threshold", h["basis_drift_threshold"])
    check_bool("maximize", h["maximize"])
    check_bool("compile_step", h["compile_step"])
    if h["compile_step"] and not has_cxx_compiler():
        raise ValueError("Invalid compile_step: True needs a C++ compiler (g++, c++ or clang++ on PATH, or CXX), with which "
                         "torch.compile builds CPU kernels; set compile_step=False")
    check_bool("shard_decompositions", h["shard_decompositions"])


def _init_state(p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
    state[STEP] = new_counter(p)
    state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    if uses_covariance(p):
        d = math.prod(p.shape[2:])
        blocks = p.shape[0] * p.shape[1]
        if group["basis_refresh_every"] > 1:
            state[EXP_COV_FOLDED] = p.new_zeros(blocks, folded_width(d), d)
            state[EXP_COV_SCALE] = 1.0
        else:
            state[EXP_COV] = p.new_zeros(blocks, d, d)
    else:
        state[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _match_layout(state: dict[str, Tensor], group: dict[str, Any]) -> None:
    """Put a kernel tensor's state in its group's layout: C folded with a basis in fast mode, C full in exact mode.

    Converts state loaded from the other mode, or from fast mode before issue 23 (C full, ``lambda_D`` tracked
    every step, which becomes the frozen ``lambda_D`` of the last step). A kernel without a basis is decomposed at
    its next step.
    """
    if group["basis_refresh_every"] > 1 and EXP_COV in state:
        state[EXP_COV_FOLDED] = fold_symmetric(state.pop(EXP_COV))
        state[EXP_COV_SCALE] = 1.0
        tracked = state.pop(_TRACKED_EIG_DIAG, None)
        if tracked is None:
            state.pop(BASIS, None)
            state.pop(BASIS_EIG_COV, None)
        else:
            state[BASIS_EIG_DIAG] = tracked / (1.0 - group["betas"][1] ** int(state[STEP].item()))
    elif group["basis_refresh_every"] == 1 and EXP_COV_FOLDED in state:
        state[EXP_COV] = folded_covariance(state)
        for key in (EXP_COV_FOLDED, EXP_COV_SCALE, BASIS, BASIS_EIG_COV, BASIS_EIG_DIAG):
            state.pop(key, None)


def folded_covariance(state: dict[str, Tensor], rows: Tensor | slice = slice(None), out: Tensor | None = None) -> Tensor:
    """Fast mode's ``C`` of the kernels ``rows`` as full blocks ``[n, d, d]`` (into ``out`` if given)."""
    folded = state[EXP_COV_FOLDED][rows]
    d = folded.shape[-1]
    out = folded.new_empty(folded.shape[0], d, d) if out is None else out
    return unfold_symmetric(folded, out).mul_(float(state[EXP_COV_SCALE]))


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
    """Buffers ``(A, w, Q)`` per block size, reused from step to step (not optimizer state).

    A fresh 80 MB buffer each step costs more in page faults than the arithmetic on it
    (31,840 5x5 blocks: 37 ms to fill a new one, 5.5 ms to refill an old one, 2 CPU cores). A request gets
    views of the first ``blocks`` rows; the buffers grow to fit and shrink to fit a request below a quarter of
    them (fast mode decomposes every kernel during its warm-up, then a few per step).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def get(self, blocks: int, d: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = (d, like.dtype, like.device)
        held = self._buffers.get(key)
        if held is None or not blocks <= held[1].shape[0] <= 4 * blocks:
            held = (like.new_empty(blocks, d, d), like.new_empty(blocks, d), like.new_empty(blocks, d, d))
            self._buffers[key] = held
        return held[0][:blocks], held[1][:blocks], held[2][:blocks]

    def nbytes(self) -> int:
        """Bytes of every buffer held."""
        return sum(b.numel() * b.element_size() for buffers in self._buffers.values() for b in buffers)


def _segments(sizes: list[int], rows: Rows) -> list[tuple[int, Rows, int, int]]:
    """``(i, local, at, count)``: of the items ``sizes`` laid end to end, the ``rows`` (a range, or ascending
    indices) that fall in item ``i`` are its rows ``local`` (of the same kind), and rows ``at:at + count`` of
    ``rows``."""
    offsets = [0, *itertools.accumulate(sizes)]
    if isinstance(rows, slice):
        bounds = [min(max(o, rows.start), rows.stop) - rows.start for o in offsets]
    else:
        bounds = torch.searchsorted(rows, torch.tensor(offsets, device=rows.device)).tolist()
    found = []
    for i, offset in enumerate(offsets[:-1]):
        at, stop = bounds[i], bounds[i + 1]
        if at < stop:
            if isinstance(rows, slice):
                local = slice(rows.start + at - offset, rows.start + stop - offset)
            else:
                local = rows[at:stop] - offset
            found.append((i, local, at, stop - at))
    return found


def update_covariance(C: Tensor, g: Tensor, beta2: float) -> None:
    """``C <- beta2 C + (1 - beta2) g g^T`` for ``C`` ``[B, d, d]`` and ``g`` ``[B, d]``.

    In place, with the outer product broadcast inside ``addcmul_`` (no ``[B, d, d]`` temporary).
    """
    C.mul_(beta2).addcmul_(g.unsqueeze(-1), g.unsqueeze(-2), value=1.0 - beta2)


def _exact_step(kernels: list[Kernel], workspace: EighWorkspace, distributor: Distributor) -> None:
    """The paper's step for tensors sharing one block size ``d``: one batched ``eigh`` of every block's ``C_s``,
    its share of the blocks on each rank, and the directions gathered."""
    d = kernels[0].state[EXP_COV].shape[-1]
    with record_function("adacov::covariance_update"):
        for k in kernels:
            k.state[EXP_AVG].lerp_(k.grad, 1.0 - k.group["betas"][0])
            update_covariance(k.state[EXP_COV], k.grad.reshape(-1, d), k.group["betas"][1])
    sizes = [k.state[EXP_COV].shape[0] for k in kernels]

    def directions(rows: Rows) -> Tensor:
        pieces = _segments(sizes, rows)
        stacked, w, Q = workspace.get(sum(count for *_, count in pieces), d, like=kernels[0].state[EXP_COV])
        for i, local, at, count in pieces:
            blend_offdiagonal(kernels[i].state[EXP_COV][local], _scale(kernels[i]), out=stacked[at : at + count])
        with record_function("adacov::eigh"):
            symmetric_eigh(stacked, out=(w, Q))
        found = stacked.new_empty(stacked.shape[0], d)
        with record_function("adacov::apply_inverse_root"):
            for i, local, at, count in pieces:
                k = kernels[i]
                found[at : at + count] = apply_inverse_root(
                    Q[at : at + count], w[at : at + count], k.state[EXP_AVG].view(-1, d)[local], shift=k.group["cov_eps"] ** 2,
                    scale=_bias_correction(k),
                )  # fmt: skip
        return found

    job = Job(sum(sizes), d**3, d, kernels[0].p.dtype, kernels[0].p.device, directions)
    (found,) = distributor.run([job])
    for k, direction in zip(kernels, found.split(sizes)):
        _apply(k, direction)


def _due_range(k: Kernel) -> tuple[int, int] | None:
    """The kernels of ``k`` to check this step (all of them: ``None``): every kernel until the tensor has a basis
    and through the warm-up, then the ``c``-th of ``T`` contiguous ranges, ``c = (t - warmup - 1) mod T``."""
    every, warmup = k.group["basis_refresh_every"], k.group["basis_refresh_warmup"]
    t = int(k.state[STEP].item())
    if BASIS not in k.state or t <= warmup:
        return None
    blocks, c = k.state[EXP_COV_FOLDED].shape[0], (t - warmup - 1) % every
    return c * blocks // every, (c + 1) * blocks // every


def _drifted(k: Kernel, start: int, stop: int) -> Tensor:
    """Indices in ``start:stop`` of the kernels whose cached basis has drifted past the group's threshold."""
    state, threshold = k.state, k.group["basis_drift_threshold"]
    if threshold == 0 or start == stop:
        return torch.arange(start, stop, device=k.p.device)
    Q = state[BASIS][start:stop]
    C_s = _blended(state, slice(start, stop), _scale(k), Q.new_empty(Q.shape))
    mass = offdiagonal_mass(torch.bmm(Q.mT, torch.bmm(C_s, Q)), _bias_correction(k), k.group["cov_eps"] ** 2)
    return start + torch.nonzero(mass > threshold).flatten()


def _blended(state: dict[str, Tensor], rows: Tensor | slice, s: float, out: Tensor) -> Tensor:
    """``C_s = s C + (1 - s) diag(C)`` of the kernels ``rows`` as full blocks in ``out``, from the folded ``C``."""
    folded, scale = state[EXP_COV_FOLDED][rows], float(state[EXP_COV_SCALE])
    unfold_symmetric(folded, out).mul_(s * scale)
    torch.mul(folded[:, 0], scale, out=out.diagonal(dim1=-2, dim2=-1))
    return out


def _fast_step(kernels: list[Kernel], workspace: EighWorkspace, distributor: Distributor, compile_step: bool) -> None:
    """Fast mode for tensors sharing one block size ``d``: the cached-basis step for every kernel, after
    decomposing the kernels that are due (the warm-up) or checked and drifted, shared among the ranks.

    Eager, the rotations ``[g, m]^T Q`` run before the decompositions and ``m^T Q`` again for the kernels decomposed;
    with ``compile_step``, the moments' update and the cached-basis step of every tensor are one compiled call each
    (``compiled_step``), and the decompositions run between them.
    """
    if compile_step:
        _compiled_fast_step(kernels, workspace, distributor)
        return
    d = math.prod(kernels[0].p.shape[2:])
    with record_function("adacov::covariance_update"):
        for k in kernels:
            k.state[EXP_AVG].lerp_(k.grad, 1.0 - k.group["betas"][0])
            _update_folded(k.state, k.grad.reshape(-1, d), k.group["betas"][1])
    due = [_due_range(k) for k in kernels]
    with record_function("adacov::cached_basis_step"):
        rotated = [None if span is None else _track_rotated(k, d) for k, span in zip(kernels, due)]
    chosen = _decompose_due(kernels, due, workspace, distributor)
    with record_function("adacov::cached_basis_step"):
        for k, rot, picked in zip(kernels, rotated, chosen):
            Q = k.state[BASIS]
            m = k.state[EXP_AVG].view(-1, d)
            if rot is None:
                m_rot = torch.bmm(m.unsqueeze(1), Q).squeeze(1)
            else:
                m_rot = rot[:, 1]
                if picked.numel():
                    m_rot.index_copy_(0, picked, torch.bmm(m[picked].unsqueeze(1), Q[picked]).squeeze(1))
            _apply(k, _cached_direction(k, Q, m_rot))


def _compiled_fast_step(kernels: list[Kernel], workspace: EighWorkspace, distributor: Distributor) -> None:
    """``_fast_step`` with ``compiled_step``'s two functions; ``lambda_C`` of the kernels decomposed in this step
    stays as their decomposition set it. A parameter that is not contiguous steps as a contiguous copy."""
    d = math.prod(kernels[0].p.shape[2:])
    grads = [k.grad.reshape(-1, d) for k in kernels]
    like = dict(dtype=kernels[0].p.dtype, device=kernels[0].p.device)
    with record_function("adacov::covariance_update"):
        scales = [float(k.state[EXP_COV_SCALE]) * k.group["betas"][1] for k in kernels]
        weights = [[1.0 - k.group["betas"][0], (1.0 - k.group["betas"][1]) / c] for k, c in zip(kernels, scales)]
        compiled(moment_updates, grads, [k.state[EXP_AVG].view(-1, d) for k in kernels],
                 [k.state[EXP_COV_FOLDED] for k in kernels], torch.tensor(weights, **like))  # fmt: skip
        for k, scale in zip(kernels, scales):
            _store_scale(k.state, scale)
    due = [_due_range(k) for k in kernels]
    chosen = _decompose_due(kernels, due, workspace, distributor)
    with record_function("adacov::cached_basis_step"):
        fresh, scalars = [], []
        for k, span, picked in zip(kernels, due, chosen):
            is_fresh = torch.full((k.state[BASIS].shape[0], 1), span is None, dtype=torch.bool, device=k.p.device)
            fresh.append(is_fresh.index_fill_(0, picked, True))
            (beta1, beta2), t, lr, s = k.group["betas"], int(k.state[STEP].item()), lr_value(k.group), _scale(k)
            scalars.append([beta2, s * _bias_correction(k), 1.0 - s, k.group["cov_eps"] ** 2, lr / (1.0 - beta1**t),
                            1.0 - lr * k.group["weight_decay"]])  # fmt: skip
        params = [k.p.contiguous() for k in kernels]
        compiled(cached_basis_steps, [p.view(-1, d) for p in params], grads,
                 [k.state[EXP_AVG].view(-1, d) for k in kernels], [k.state[BASIS] for k in kernels],
                 [k.state[BASIS_EIG_COV] for k in kernels], [k.state[BASIS_EIG_DIAG] for k in kernels], fresh,
                 torch.tensor(scalars, **like))  # fmt: skip
        for k, p in zip(kernels, params):
            if p is not k.p:
                k.p.copy_(p)


def _decompose_due(kernels: list[Kernel], due: list[tuple[int, int] | None], workspace: EighWorkspace,
                   distributor: Distributor) -> list[Tensor]:  # fmt: skip
    """Decompose every kernel of the tensors in their warm-up (``None``) and the drifted ones of each due range;
    returns the indices decomposed, per tensor."""
    with record_function("adacov::drift_check"):
        chosen = [torch.arange(k.p.shape[0] * k.p.shape[1], device=k.p.device) if span is None else _drifted(k, *span)
                  for k, span in zip(kernels, due)]  # fmt: skip
    _refresh(kernels, chosen, workspace, distributor)
    return chosen


def _update_folded(state: dict[str, Tensor], g: Tensor, beta2: float) -> None:
    """``C <- beta2 C + (1 - beta2) g g^T`` for ``C = c F``: ``c <- beta2 c``, ``F <- F + (1 - beta2) / c g g^T``;
    ``c`` multiplies into ``F`` once it falls below ``_SMALLEST_SCALE``."""
    scale = float(state[EXP_COV_SCALE]) * beta2
    add_folded_outer(state[EXP_COV_FOLDED], g, (1.0 - beta2) / scale)
    _store_scale(state, scale)


def _store_scale(state: dict[str, Tensor], scale: float) -> None:
    """Keep ``c`` as the state's scale, or multiply it into ``F`` once it falls below ``_SMALLEST_SCALE``."""
    if scale < _SMALLEST_SCALE:
        state[EXP_COV_FOLDED].mul_(scale)
        scale = 1.0
    state[EXP_COV_SCALE] = scale


def _track_rotated(k: Kernel, d: int) -> Tensor:
    """``[B, 2, d]``, rows ``g^T Q`` and ``m^T Q`` in one product; ``lambda_C <- beta2 lambda_C + (1 - beta2) (Q^T g)^2``."""
    beta2 = k.group["betas"][1]
    rotated = torch.bmm(torch.stack([k.grad.reshape(-1, d), k.state[EXP_AVG].view(-1, d)], 1), k.state[BASIS])
    g_rot = rotated[:, 0]
    k.state[BASIS_EIG_COV].mul_(beta2).addcmul_(g_rot, g_rot, value=1.0 - beta2)
    return rotated


def _cached_direction(k: Kernel, Q: Tensor, m_rot: Tensor) -> Tensor:
    """``Q ((Q^T m) / sqrt(s lambda_C / (1 - beta2^t) + (1 - s) lambda_D + cov_eps^2))``, ``[B, d]``."""
    s = _scale(k)
    eig = k.state[BASIS_EIG_COV].mul(s * _bias_correction(k)).add_(k.state[BASIS_EIG_DIAG], alpha=1.0 - s)
    root = eig.clamp_min_(0.0).add_(k.group["cov_eps"] ** 2).rsqrt_()
    return torch.bmm(m_rot.mul(root).unsqueeze(1), Q.mT).squeeze(1)  # (Q y)^T = y^T Q^T


def _refresh(kernels: list[Kernel], chosen: list[Tensor], workspace: EighWorkspace, distributor: Distributor) -> None:
    """Decompose the chosen kernels' ``C_s`` (shared among the ranks) and store each new basis with its
    ``lambda_C = diag(Q^T C Q)`` and ``lambda_D = diag(Q^T diag(C) Q) / (1 - beta2^t)``."""
    sizes = [int(c.numel()) for c in chosen]
    if not sum(sizes):
        return
    d = math.prod(kernels[0].p.shape[2:])
    like = kernels[0].state[EXP_COV_FOLDED]

    def decompose(rows: Rows) -> Tensor:
        pieces = _segments(sizes, rows)
        stacked, w, Q = workspace.get(sum(count for *_, count in pieces), d, like=like)
        for i, local, at, count in pieces:
            _blended(kernels[i].state, chosen[i][local], _scale(kernels[i]), stacked[at : at + count])
        with record_function("adacov::eigh"):
            symmetric_eigh(stacked, out=(w, Q))
        with record_function("adacov::store_basis"):
            for i, local, at, count in pieces:  # C itself, now that eigh is done with C_s
                folded_covariance(kernels[i].state, chosen[i][local], out=stacked[at : at + count])
            eig_cov = torch.bmm(stacked, Q).mul_(Q).sum(-2)
            eig_diag = stacked.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).mul(Q.square()).sum(-2)
            for i, local, at, count in pieces:
                eig_diag[at : at + count] *= _bias_correction(kernels[i])
            return torch.cat([Q.flatten(1), eig_cov, eig_diag], 1)

    job = Job(sum(sizes), d**3, d * d + 2 * d, like.dtype, like.device, decompose)
    (found,) = distributor.run([job])
    with record_function("adacov::store_basis"):
        for k, picked, rows in zip(kernels, chosen, found.split(sizes)):
            if not rows.shape[0]:
                continue
            state = k.state
            if BASIS not in state:
                blocks = k.p.shape[0] * k.p.shape[1]
                state[BASIS] = like.new_zeros(blocks, d, d)
                state[BASIS_EIG_COV] = like.new_zeros(blocks, d)
                state[BASIS_EIG_DIAG] = like.new_zeros(blocks, d)
            state[BASIS].index_copy_(0, picked, rows[:, : d * d].view(-1, d, d))
            state[BASIS_EIG_COV].index_copy_(0, picked, rows[:, d * d : d * d + d])
            state[BASIS_EIG_DIAG].index_copy_(0, picked, rows[:, d * d + d :])


def _scale(k: Kernel) -> float:
    return offdiagonal_scale(int(k.state[STEP].item()), k.group["offdiag_warmup"])


def _bias_correction(k: Kernel) -> float:
    """``1 / (1 - beta2^t)``."""
    return 1.0 / (1.0 - k.group["betas"][1] ** int(k.state[STEP].item()))


def _apply(k: Kernel, direction: Tensor) -> None:
    """``theta <- theta (1 - lr wd) - lr / (1 - beta1^t) * direction``."""
    group, p = k.group, k.p
    lr, wd, t = lr_value(group), group["weight_decay"], int(k.state[STEP].item())
    if wd != 0:
        p.mul_(1.0 - lr * wd)
    p.add_(direction.view(p.shape), alpha=-lr / (1.0 - group["betas"][0] ** t))
