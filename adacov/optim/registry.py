"""The database of the repo's optimizers: how to build each one and which torch.optim features it supports.

One :class:`OptimizerInfo` per optimizer drives the conformance tests (``tests/test_conformance.py``), the
step-time benchmark (``benchmarks/optimizer_step.py``) and the support table of ``docs/optimizers.md``
(:func:`support_table`), so a new optimizer is added here, once. Modelled on torch's own ``OptimizerInfo`` /
``optim_db`` (``torch/testing/_internal/common_optimizers.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from adacov.optim.kfac import kfac_param_groups
from adacov.optim.mbf import mbf_param_groups

__all__ = ["FEATURES", "OPTIMIZERS", "OptimizerInfo", "support_table"]

# The torch.optim behaviours the conformance suite checks, by the names the support table and limitations use.
COPY = "deepcopy / pickle"
STATE_DICT = "state_dict"
NAMED = "named parameters"
OLD_STATE_DICT = "step saved as a number"
TENSOR_LR = "tensor lr"
SCHEDULER = "LR schedulers"
FROZEN = "frozen parameters"
NO_GRAD = "grad None on some steps"
FLOAT64 = "float64 state"
CLOSURE = "closure"
ZERO_GRAD = "zero_grad"
HOOKS = "hooks"
ERRORS = "bad hyperparameters"
MAXIMIZE = "maximize"
FOREACH = "foreach"
FEATURES = (COPY, STATE_DICT, NAMED, OLD_STATE_DICT, TENSOR_LR, SCHEDULER, FROZEN, NO_GRAD, FLOAT64, CLOSURE,
            ZERO_GRAD, HOOKS, ERRORS, MAXIMIZE, FOREACH)  # fmt: skip

TensorsOrNamed = Iterable[Tensor] | Iterable[tuple[str, Tensor]]


def model_params(model: nn.Module, named: bool = False) -> list[Tensor] | list[tuple[str, Tensor]]:
    """``model.parameters()`` (or ``named_parameters()``) as a list: one group with every tensor."""
    return list(model.named_parameters()) if named else list(model.parameters())


def one_group_per_tensor(tensors: TensorsOrNamed) -> list[dict[str, Any]]:
    """Plain tensors for MBF: one group each, whose block MBF infers from the tensor's rank."""
    return [{"params": [t]} for t in tensors]


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer: its class, how to build its param groups, what it supports.

    ``kwargs`` are the settings that define the entry (fast AdaCov's refresh); ``short_run`` the settings under
    which a few steps on a tiny model pass every code path (curvature, inverses, cached bases); ``invalid`` the
    ``(hyperparameter, bad value, name the error gives it)`` its constructor rejects with a ValueError;
    ``limitations`` maps a feature of :data:`FEATURES` to why the optimizer lacks it (library code we do not
    change: the conformance suite expects those checks to fail).
    """

    name: str
    target: str
    param_groups: Callable[..., Any] = model_params
    tensor_groups: Callable[[TensorsOrNamed], Any] | None = list
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    short_run: Mapping[str, Any] = field(default_factory=dict)
    invalid: tuple[tuple[str, Any, str], ...] = ()
    maximize: bool = True
    foreach: bool = False
    create_graph: bool = False
    joint_layers: bool = False
    limitations: Mapping[str, str] = field(default_factory=dict)

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        """The optimizer class, imported on first use (the library baselines are an optional extra)."""
        module, _, name = self.target.rpartition(".")
        return getattr(importlib.import_module(module), name)

    @property
    def builder(self) -> str | None:
        """The function that builds the param groups this optimizer needs, if plain parameters will not do."""
        return None if self.param_groups is model_params else self.param_groups.__name__

    def build(self, model: nn.Module, named: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer for ``model``: its param groups, the entry's settings, then ``kwargs``."""
        return self.cls(self.param_groups(model, named=named), **{**self.kwargs, **kwargs})

    def build_for_tensors(self, tensors: TensorsOrNamed, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer for plain tensors (or ``(name, tensor)`` pairs); only where ``tensor_groups`` is set."""
        if self.tensor_groups is None:
            raise ValueError(f"Invalid params: {self.name} takes a model's param groups, not plain tensors")
        return self.cls(self.tensor_groups(tensors), **{**self.kwargs, **kwargs})


def _invalid(*names_and_values: tuple[str, Any]) -> tuple[tuple[str, Any, str], ...]:
    """Bad values whose errors name the hyperparameter as the keyword does."""
    return tuple((name, value, name) for name, value in names_and_values)


_ADACOV_INVALID = _invalid(
    ("lr", -1e-3), ("betas", (1.0, 0.999)), ("eps", 0.0), ("cov_eps", -1e-5), ("offdiag_warmup", 0),
    ("weight_decay", -0.1), ("basis_refresh_every", 0), ("basis_refresh_warmup", -1), ("basis_drift_threshold", -0.1),
    ("maximize", "yes"), ("shard_decompositions", 1),
)  # fmt: skip
_KFAC_SHORT = dict(curvature_every=1, inverse_every=2, kl_clip=1e-2)
_KFAC_INVALID = _invalid(
    ("lr", -1.0), ("momentum", 1.0), ("stat_decay", -0.1), ("damping", 0.0), ("conv_damping", 0.0),
    ("weight_decay", -1.0), ("curvature_every", 0), ("inverse_every", 2.5), ("kl_clip", 0.0),
    ("adam_betas", (0.9, 1.0)), ("adam_eps", 0.0), ("maximize", 1),
)  # fmt: skip


_KFAC_COMMON_INVALID = tuple(entry for entry in _KFAC_INVALID if entry[0] != "conv_damping")
# The low-rank K-FACs at ranks below the test net's factor sizes (19 and 28 inputs, 3 and 4 outputs).
_LOW_RANK_SHORT = dict(_KFAC_SHORT, rank_fraction=0.25, min_rank=2)
_LOW_RANK_INVALID = _KFAC_COMMON_INVALID + _invalid(
    ("rank_fraction", 0.0), ("min_rank", 0), ("oversample", -1), ("niter", 1.5), ("seed", -1),
)  # fmt: skip


def _kfac(name: str, cls: str, module: str = "kfac", **entry: Any) -> OptimizerInfo:
    """A K-FAC-family entry: ``kfac_param_groups``, K-FAC's short run and bad values unless ``entry`` says otherwise."""
    entry = {"short_run": _KFAC_SHORT, "invalid": _KFAC_INVALID, **entry}
    return OptimizerInfo(
        name, f"adacov.optim.{module}.{cls}", param_groups=kfac_param_groups, tensor_groups=None, joint_layers=True,
        **entry,
    )  # fmt: skip


def _low_rank(name: str, cls: str, **entry: Any) -> OptimizerInfo:
    return _kfac(name, cls, "low_rank_kfac", **{"short_run": _LOW_RANK_SHORT, "invalid": _LOW_RANK_INVALID, **entry})


_LIBRARY_LR = (("lr", -1.0, "learning rate"),)
# What the pytorch-optimizer 4.1.0 baselines lack, found by the conformance suite (library code, not changed here).
_LIBRARY = {
    COPY: "keeps settings (maximize, ...) in attributes that torch's __getstate__ does not save: a deepcopy or "
    "unpickled copy raises AttributeError in step()",
    f"{TENSOR_LR}: 1-element": "a tensor lr of shape [1] fails in step() (add_ or addcdiv_ needs a number or a 0-d "
    "tensor)",
    f"{TENSOR_LR}: 2-element": "a tensor lr of several elements is not rejected when built; step() fails",
    f"{NO_GRAD}: every-tensor": "counts a step in its param group (group['step']) even when no tensor has a gradient",
    f"{ERRORS}: lr": "a negative lr raises pytorch_optimizer's NegativeLRError, which is not a ValueError",
}

_ENTRIES = [
    OptimizerInfo(
        "adam", "torch.optim.Adam", foreach=True,
        limitations={FLOAT64: "keeps its step counter in float32 for float64 parameters (torch's scalar dtype); its "
                     "moments are float64"},
        invalid=(("lr", -1.0, "learning rate"), ("eps", -1.0, "epsilon"), ("betas", (1.0, 0.999), "beta")),
    ),  # fmt: skip
    OptimizerInfo("adacov", "adacov.optim.adacov.AdaCov", short_run=dict(offdiag_warmup=2.0), invalid=_ADACOV_INVALID),
    OptimizerInfo(
        "adacov_fast", "adacov.optim.adacov.AdaCov",
        kwargs=dict(basis_refresh_every=50, basis_refresh_warmup=390, basis_drift_threshold=0.0),
        short_run=dict(offdiag_warmup=2.0, basis_refresh_every=2, basis_refresh_warmup=1), invalid=_ADACOV_INVALID,
    ),  # fmt: skip
    OptimizerInfo(
        "eadam", "adacov.optim.eadam.EAdam",
        invalid=_invalid(("lr", -1.0), ("betas", (0.9, 1.0)), ("eps", 0.0), ("weight_decay", -1.0), ("maximize", None)),
    ),  # fmt: skip
    OptimizerInfo(
        "mbf", "adacov.optim.mbf.MBF", param_groups=mbf_param_groups, tensor_groups=one_group_per_tensor,
        short_run=dict(lr=1e-3, inverse_every=2, weight_decay=0.1), joint_layers=True,
        invalid=_invalid(
            ("lr", -1.0), ("betas", (0.9, 1.0)), ("damping", 0.0), ("eps", 0.0), ("weight_decay", -1.0),
            ("curvature_every", 0), ("inverse_every", 0), ("warm_start_batches", -1), ("maximize", "no"),
        ),
    ),  # fmt: skip
    _kfac("kfac", "KFAC"),
    _kfac("ekfac", "EKFAC"),
    _kfac("tkfac", "TKFAC"),
    _kfac("tekfac", "TEKFAC"),
    _low_rank("rs_kfac", "RSKFAC"),
    _low_rank("sre_kfac", "SREKFAC"),
    _low_rank("b_kfac", "BKFAC"),
    _low_rank(
        "b_r_kfac", "BKFAC", kwargs=dict(brand_refresh_every=5), short_run=dict(_LOW_RANK_SHORT, brand_refresh_every=1),
        invalid=(*_LOW_RANK_INVALID, *_invalid(("brand_refresh_every", 0))),
    ),  # fmt: skip
    _low_rank(
        "b_kfac_c", "BKFAC", kwargs=dict(brand_correction=0.2), invalid=(*_LOW_RANK_INVALID, *_invalid(("brand_correction", 1.5))),
    ),  # fmt: skip
    _kfac("kld_wrm_so", "KLDWRM", "kld_wrm", kwargs=dict(form="so"), invalid=(*_KFAC_COMMON_INVALID, *_invalid(("form", "qe")))),
    _kfac("kld_wrm_q", "KLDWRM", "kld_wrm", kwargs=dict(form="q"), invalid=(*_KFAC_COMMON_INVALID, *_invalid(("form", "qe")))),
    _kfac(
        "seng", "SENG", "seng", short_run=dict(update_freq=2, kl_clip=1e-2, sketch_positions=4),
        invalid=_invalid(
            ("lr", -1.0), ("momentum", 1.0), ("damping", 0.0), ("weight_decay", -1.0), ("update_freq", 0), ("kl_clip", 0.0),
            ("sketch_positions", 0), ("output_rank", 0), ("seed", -1), ("adam_eps", 0.0), ("maximize", 1),
        ),
    ),  # fmt: skip
    *(
        _kfac(
            name, "Whitening", "whitening", kwargs=dict(recursive=recursive), short_run=dict(curvature_every=1, inverse_every=2),
            invalid=_invalid(
                ("lr", -1.0), ("momentum", 1.0), ("stat_decay", -0.1), ("damping", 0.0), ("weight_decay", -1.0),
                ("curvature_every", 0), ("inverse_every", 2.5), ("recursive", "yes"), ("power_iterations", 0), ("seed", -1),
                ("adam_eps", 0.0), ("maximize", 1),
            ),
        )
        for name, recursive in (("whitening", False), ("whitening_recursive", True))
    ),  # fmt: skip
    OptimizerInfo(
        "sgd", "torch.optim.SGD", foreach=True, short_run=dict(lr=1e-2, momentum=0.9),
        invalid=(("lr", -1.0, "learning rate"), ("momentum", -0.5, "momentum"), ("weight_decay", -1.0, "weight_decay")),
    ),  # fmt: skip
    OptimizerInfo(
        "soap", "pytorch_optimizer.SOAP", short_run=dict(precondition_frequency=2),
        limitations={
            **_LIBRARY,
            f"{TENSOR_LR}: 0-d": "multiplies the group's tensor lr in place by the bias corrections every step "
            "(step_size = group['lr']; step_size *= ...), so the lr drifts",
            f"{SCHEDULER}: StepLR-tensor": "a tensor lr drifts (see tensor lr)",
        },
        invalid=(*_LIBRARY_LR, ("betas", (1.0, 0.95), "beta1"), ("weight_decay", -1.0, "weight_decay")),
    ),  # fmt: skip
    OptimizerInfo(
        "shampoo", "pytorch_optimizer.ScalableShampoo",
        short_run=dict(start_preconditioning_step=2, preconditioning_compute_steps=2, graft_type=3),
        limitations={
            **_LIBRARY,
            f"{STATE_DICT}: weights_only": "keeps PreConditioner objects in its state, which "
            "torch.load(weights_only=True) refuses",
            f"{NAMED}: named-weights_only": "keeps PreConditioner objects in its state (see state_dict)",
        },
        invalid=(*_LIBRARY_LR, ("betas", (0.9, 1.5), "beta2"), ("weight_decay", -1.0, "weight_decay")),
    ),  # fmt: skip
    OptimizerInfo(
        "kron", "pytorch_optimizer.Kron", invalid=(*_LIBRARY_LR, ("weight_decay", -1.0, "weight_decay")),
        limitations={
            **_LIBRARY, FLOAT64: "keeps its preconditioners in float32 (precondition_dtype=torch.float32 by default)"
        },
    ),
    OptimizerInfo(
        "adahessian", "pytorch_optimizer.AdaHessian", foreach=True, create_graph=True,
        invalid=(*_LIBRARY_LR, ("betas", (1.0, 0.999), "beta1"), ("hessian_power", 2.0, "Hessian Power")),
        limitations=_LIBRARY,
    ),  # fmt: skip
    OptimizerInfo(
        "sophia", "pytorch_optimizer.SophiaH", foreach=True, create_graph=True, short_run=dict(update_period=2),
        limitations={
            **_LIBRARY,
            MAXIMIZE: "negates the gradient but not its Hessian estimate, which it clamps at eps: maximizing f "
            "takes other steps than minimizing -f",
        },
        invalid=(*_LIBRARY_LR, ("betas", (0.96, 1.0), "beta2"), ("weight_decay", -1.0, "weight_decay")),
    ),  # fmt: skip
]

OPTIMIZERS: Mapping[str, OptimizerInfo] = MappingProxyType({info.name: info for info in _ENTRIES})


def support_table() -> str:
    """The markdown table of docs/optimizers.md: for each feature (row) and optimizer (column), ``yes``, ``no``,
    ``partly`` (some variants of the check fail) or ``-`` (no such flag), then why each ``no`` or ``partly``."""
    infos = list(OPTIMIZERS.values())
    lines = ["| | " + " | ".join(info.name for info in infos) + " |", "|---" * (len(infos) + 1) + "|"]
    builders = (f"`{info.builder}`" if info.builder else "any" for info in infos)
    lines.append("| param groups | " + " | ".join(builders) + " |")
    for feature in FEATURES:
        cells = []
        for info in infos:
            if feature in info.limitations:
                cells.append("no")
            elif any(key.startswith(f"{feature}: ") for key in info.limitations):
                cells.append("partly")
            elif (feature == MAXIMIZE and not info.maximize) or (feature == FOREACH and not info.foreach):
                cells.append("-")
            else:
                cells.append("yes")
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    reasons: dict[tuple[str, str], list[str]] = {}
    for info in infos:
        for key, reason in info.limitations.items():
            reasons.setdefault((key, reason), []).append(info.name)
    notes = [f"- {', '.join(names)}, {key.replace(': ', ' (', 1) + ')' if ': ' in key else key}: {reason}."
             for (key, reason), names in reasons.items()]  # fmt: skip
    return "\n".join([*lines, "", *notes])
