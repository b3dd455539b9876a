"""The conformance suite's problems and driver: a tiny conv net and plain tensors, trained a few steps."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from adacov.optim.registry import OPTIMIZERS, OptimizerInfo
from adacov.training.loop import backward

STEPS = 4  # every check trains this many steps: enough for curvature, inverses and cached bases to run twice


class ConvNet(nn.Module):
    """``Conv2d(2, 3, 3) -> tanh -> Linear(27, 4)`` on 2x5x5 inputs, cross-entropy over 4 classes: the covariance
    path of AdaCov and MBF lives in the conv kernel, K-FAC's factors in both layers."""

    frozen = ("conv.bias", "linear.weight")
    dropped = {"conv": ("conv.weight", "conv.bias"), "linear.bias": ("linear.bias",)}

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv, self.linear = nn.Conv2d(2, 3, 3), nn.Linear(27, 4)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.linear(torch.tanh(self.conv(x)).flatten(1)), y)

    def batches(self, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(STEPS, 6, 2, 5, 5, generator=g, dtype=dtype)
        y = torch.randint(0, 4, (STEPS, 6), generator=g)
        return list(zip(x, y))


class Tensors(nn.Module):
    """Plain tensors, a conv-shaped ``kernel`` [3, 2, 3, 3], a ``matrix`` [4, 5] and a ``vector`` [4], with the loss
    ``sum_k (<x_k, d_k> - 1)^2 + mean((x_k - d_k)^2) / 2`` for a batch ``d`` of random tensors shaped alike
    (entries of standard deviation 1/8, so that MBF's float32 blocks factor without its float64 fallback)."""

    frozen = ("vector",)
    dropped = {"kernel": ("kernel",)}

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kernel = nn.Parameter(torch.randn(3, 2, 3, 3, generator=g))
        self.matrix = nn.Parameter(torch.randn(4, 5, generator=g))
        self.vector = nn.Parameter(torch.randn(4, generator=g))

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        return sum(((x * d).sum() - 1).square() + (x - d).square().mean() / 2 for x, d in zip(self.parameters(), batch))

    def batches(self, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, ...]]:
        g = torch.Generator().manual_seed(1)
        shapes = [p.shape for p in self.parameters()]
        return [tuple(torch.randn(shape, generator=g, dtype=dtype) / 8 for shape in shapes) for _ in range(STEPS)]


PROBLEMS: dict[str, type[nn.Module]] = {"conv": ConvNet, "tensors": Tensors}
LIBRARY_MISSING = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_optimizer") is None,
    reason="the library baselines need pip install -e '.[baselines]'",
)


def cases(
    feature: str,
    variants: Callable[[OptimizerInfo, str], tuple] | None = None,
    when: Callable[[OptimizerInfo], bool] = lambda info: True,
    problems: tuple[str, ...] = tuple(PROBLEMS),
) -> list:
    """``(info, problem[, variant])`` for every optimizer, on plain tensors too where it takes them. A check that an
    optimizer's ``limitations`` name (as ``"feature: variant"``, ``"feature: problem"`` or ``feature``) is expected
    to fail, strictly."""
    params = []
    for info in OPTIMIZERS.values():
        for problem in problems if when(info) else ():
            if problem == "tensors" and info.tensor_groups is None:
                continue
            for variant in variants(info, problem) if variants else (None,):
                keys = (f"{feature}: {variant}", f"{feature}: {problem}", feature)
                reason = next((info.limitations[k] for k in keys if k in info.limitations), None)
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                if info.target.startswith("pytorch_optimizer."):
                    marks.append(LIBRARY_MISSING)
                args = (info, problem) if variants is None else (info, problem, variant)
                name = "-".join(str(a) for a in (info.name, problem, variant) if a)
                params.append(pytest.param(*args, marks=marks, id=name))
    return params


def build(info: OptimizerInfo, model: nn.Module, named: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
    """``info``'s optimizer with its short-run settings: from the model's param groups, or its plain tensors."""
    kwargs = {**info.short_run, **kwargs}
    if isinstance(model, Tensors):
        return info.build_for_tensors(list(model.named_parameters()) if named else list(model.parameters()), **kwargs)
    return info.build(model, named=named, **kwargs)


def seed_global_streams(t: int) -> None:
    """Hutchinson probes (AdaHessian, Sophia) and Kron draw from torch's and NumPy's global streams in ``step``."""
    torch.manual_seed(t)
    np.random.seed(t)


def step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: OptimizerInfo,
    batch: tuple[Tensor, ...],
    t: int,
    *,
    closure: bool = False,
    set_to_none: bool = True,
    sign: float = 1.0,
    drop: tuple[str, ...] = (),
) -> Tensor:
    """One training step at step number ``t``; ``drop`` names the tensors whose gradients are set to None first."""
    seed_global_streams(t)

    def compute() -> Tensor:
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = sign * model.loss(batch)
        backward(loss, info.create_graph)
        for name in drop:
            model.get_parameter(name).grad = None
        return loss

    if closure:
        return optimizer.step(compute)
    loss = compute()
    optimizer.step()
    return loss


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, info: OptimizerInfo, batches: list, first: int = 1, **kw: Any
) -> list[Tensor]:
    """Steps ``first, first + 1, ...`` on ``batches``; the losses."""
    return [step(model, optimizer, info, batch, t, **kw) for t, batch in enumerate(batches, first)]


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested state: tensors (values and dtype), numbers, containers and helper objects."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), f"{where}.{type(a).__name__}")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def assert_same_run(
    model_a: nn.Module, opt_a: torch.optim.Optimizer, model_b: nn.Module, opt_b: torch.optim.Optimizer
) -> None:
    """The two runs hold bitwise the same parameters and optimizer state."""
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    assert_same(opt_a.state_dict()["state"], opt_b.state_dict()["state"], "state")


def state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every tensor in the optimizer's state, also inside lists, dicts and helper objects, each once."""
    found, seen = [], set()
    pending = [v for state in optimizer.state.values() for v in state.values()]
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if torch.is_tensor(value):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            pending.extend(vars(value).values())
    return found


def clone_state(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Any]:
    """A deep copy of the state of ``params``."""
    return [copy.deepcopy(dict(optimizer.state.get(p, {}))) for p in params]
