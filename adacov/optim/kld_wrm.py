"""KLD-WRM (Puiu 2022): K-FAC with the gradient of a wake of KL-regularized models, in its SO and Q forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adacov.optim.base import lr_value
from adacov.optim.kfac import FACTOR_IN, FACTOR_OUT, KFAC

__all__ = ["FORMS", "KLDWRM"]

FORMS = ("so", "q")
PREVIOUS_GRAD, PREVIOUS_LR = "previous_grad", "previous_lr"  # g_{k-1} (raw) and alpha_{k-1} (a float)
PREVIOUS_STEP = "previous_step"  # Q: s_{k-1} = theta_k - theta_{k-1}, [o, i]
BATCH_IN, BATCH_OUT = "batch_in", "batch_out"  # Q: the last curvature batch's factors A_k, G_k


class KLDWRM(KFAC):
    r"""KLD-WRM: K-FAC's damped, KL-clipped direction of a modified gradient (Puiu 2022, "Rethinking exponential
    averaging of the Fisher").

    An exponential average of curvatures with decay ``rho`` is what a wake of models regularized towards every
    past iterate by ``rho^{k-j} KL(p_theta || p_{theta_j})`` gives; solving that wake exactly, with the previous
    step's solution, changes the gradient (``rho`` is ``stat_decay``, ``alpha_k`` the step's ``lr``):

    .. math::
        \text{SO:}\quad \hat g_k &= g_k - \rho \tfrac{\alpha_{k-1}}{\alpha_k} g_{k-1} \\
        \text{Q:}\quad \hat g_k &= g_k - \rho \tfrac{\alpha_{k-1}}{\alpha_k} (g_{k-1} + G_{k-1} S_{k-1} A_{k-1}),
        \quad \bar A_\text{aug} = \hat A_k + \alpha_k A_k, \quad \bar G_\text{aug} = \hat G_k + \alpha_k G_k

    SO's modified gradient enters :class:`~adacov.optim.kfac.KFAC`'s step (factored damping, Cholesky inverses,
    KL clipping with ``<D, g_hat>``, momentum, weight decay). Q models the loss itself quadratically too: the
    previous step ``S_{k-1} = theta_k - theta_{k-1}`` ``[o, i]`` enters through its curvature, the last curvature
    batch's Kronecker-factored Fisher ``A_k kron G_k``, and the inverted factors are augmented with that batch's
    factors, ``(A_k - rho A_{k-1}) / (1 - rho) = A_k`` for this repository's normalized averages. The first step
    has no ``g_{k-1}``: ``g_hat = g``. With ``rho = 0`` (``stat_decay=0``) SO is K-FAC on each batch's factors.
    The paper's third form, QE, needs inner SGD steps on a KL divergence to stored copies of the network, i.e.
    forward passes of the model on the batch inside ``step``, which a ``torch.optim`` optimizer does not have.

    Args:
        form: ``"so"`` or ``"q"`` (default "so").
        others: as :class:`~adacov.optim.kfac.KFAC`, whose factored damping rule this uses (no ``conv_damping``).
    """

    variant = "kld_wrm"

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        curvature_every: int = 10,
        inverse_every: int = 100,
        kl_clip: float | None = None,
        form: str = "so",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        maximize: bool = False,
    ) -> None:
        self._build(params, {
            "lr": lr, "momentum": momentum, "stat_decay": stat_decay, "damping": damping, "weight_decay": weight_decay,
            "curvature_every": curvature_every, "inverse_every": inverse_every, "kl_clip": kl_clip, "form": form,
            "adam_betas": adam_betas, "adam_eps": adam_eps, "maximize": maximize,
        })  # fmt: skip

    def _validate(self, h: dict[str, Any]) -> None:
        super()._validate(h)
        if h["form"] not in FORMS:
            raise ValueError(f"Invalid form: {h['form']!r} (use one of {', '.join(FORMS)})")

    def _layer_gradient(self, group: dict, state: dict, grad: Tensor) -> Tensor:
        """``g_hat`` from this step's ``g`` and the previous step's; remembers ``g`` and ``alpha``."""
        lr = lr_value(group)
        modified = grad
        if PREVIOUS_GRAD in state:
            ratio = float(state[PREVIOUS_LR]) / lr if lr > 0 else 1.0
            wake = state[PREVIOUS_GRAD]
            if group["form"] == "q":
                wake = wake + state[BATCH_OUT] @ state[PREVIOUS_STEP] @ state[BATCH_IN]
            modified = grad - group["stat_decay"] * ratio * wake
        state[PREVIOUS_GRAD] = grad.clone()
        state[PREVIOUS_LR] = lr
        return modified

    def _update_factors(self, jobs: list[tuple[dict, dict, tuple[Tensor, Tensor]]]) -> None:
        """K-FAC's averages; Q also keeps the batch's factors, ``A_k = (A_bar_k - rho A_bar_{k-1}) / (1 - rho)``
        (the statistics all ranks averaged)."""
        q_form = [(group, state) for group, state, _ in jobs if group["form"] == "q"]
        previous = [[state[key].clone() if key in state else 0.0 for key in (FACTOR_IN, FACTOR_OUT)] for _, state in q_form]
        super()._update_factors(jobs)
        for (group, state), before in zip(q_form, previous):
            rho = group["stat_decay"]
            for key, batch_key, old in zip((FACTOR_IN, FACTOR_OUT), (BATCH_IN, BATCH_OUT), before):
                state[batch_key] = (state[key] - rho * old) / (1.0 - rho)

    def _factors(self, group: dict, state: dict) -> tuple[Tensor, Tensor]:
        factor_in, factor_out = super()._factors(group, state)
        if group["form"] != "q":
            return factor_in, factor_out
        lr = lr_value(group)
        return factor_in + lr * state[BATCH_IN], factor_out + lr * state[BATCH_OUT]

    def _apply(self, group: dict, state: dict, direction: Tensor) -> None:
        if group["form"] != "q":
            super()._apply(group, state, direction)
            return
        before = _layer_matrix(group).clone()
        super()._apply(group, state, direction)
        state[PREVIOUS_STEP] = _layer_matrix(group) - before


def _layer_matrix(group: dict) -> Tensor:
    """The layer's parameters as ``[o, i]``: the weight reshaped, the bias (if any) as the last column."""
    weight = group["params"][0].detach()
    matrix = weight.reshape(weight.shape[0], -1)
    return torch.cat([matrix, group["params"][1].detach().unsqueeze(1)], 1) if len(group["params"]) > 1 else matrix
