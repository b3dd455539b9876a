"""Every optimizer in adacov.optim.registry behaves as torch.optim users expect (modelled on torch's test_optim.py).

Each check runs over every registry entry, on a tiny conv net and, where the optimizer takes them, on plain tensors,
and compares against an independent expectation: the same optimizer's uninterrupted run, a manual schedule, the
negated loss. What a library baseline lacks is listed in its entry's ``limitations`` and expected to fail here.
"""

from __future__ import annotations

import copy
import importlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import adacov
from adacov.optim.registry import (
    CLOSURE,
    COPY,
    ERRORS,
    FLOAT64,
    FOREACH,
    FROZEN,
    HOOKS,
    MAXIMIZE,
    NAMED,
    NO_GRAD,
    OLD_STATE_DICT,
    OPTIMIZERS,
    SCHEDULER,
    STATE_DICT,
    TENSOR_LR,
    ZERO_GRAD,
    model_params,
    support_table,
)
from tests.conformance import (
    LIBRARY_MISSING,
    PROBLEMS,
    STEPS,
    assert_same,
    assert_same_run,
    build,
    cases,
    clone_state,
    state_tensors,
    step,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
HALF = STEPS // 2


@pytest.fixture(autouse=True)
def _keep_global_streams():
    """The checks seed torch's and NumPy's global streams step by step; give them back as they were."""
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)


def _setup(info, problem, **kwargs):
    model = PROBLEMS[problem]()
    return model, build(info, model, **kwargs), model.batches()


def _public(obj) -> set[str]:
    return {k for k in vars(obj) if not k.startswith("_")}


COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize(("info", "problem", "copier"), cases(COPY, lambda *_: tuple(COPIERS)))
def test_a_copy_steps_like_the_original(info, problem, copier):
    """``copy.deepcopy((model, optimizer))`` or a pickle round trip mid-run, then both go on: bitwise the same, and
    the copy has every public attribute of the original (torch's test_deepcopy_copies_all_public_attrs)."""
    model, optimizer, batches = _setup(info, problem)
    train(model, optimizer, info, batches[:HALF])
    model_copy, optimizer_copy = COPIERS[copier]((model, optimizer))
    assert _public(optimizer) == _public(optimizer_copy)
    train(model, optimizer, info, batches[HALF:], first=HALF + 1)
    train(model_copy, optimizer_copy, info, batches[HALF:], first=HALF + 1)
    assert_same_run(model, optimizer, model_copy, optimizer_copy)


def _saved(optimizer) -> dict:
    """``state_dict()`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _fresh(info, problem, model, named=False):
    """A new model with ``model``'s weights and a new optimizer for it, built with another lr."""
    fresh = PROBLEMS[problem](seed=1)
    fresh.load_state_dict(model.state_dict())
    return fresh, build(info, fresh, named=named, lr=0.125)


@pytest.mark.parametrize(
    ("info", "problem", "how"),
    [
        *cases(STATE_DICT, lambda *_: ("plain", "weights_only")),
        *cases(NAMED, lambda *_: ("named", "named-weights_only")),
    ],
)
def test_state_dict_loads_into_a_fresh_instance(info, problem, how):
    """Saved (a deep copy, or with torch.save and loaded with weights_only=True), loaded into a fresh model and
    optimizer: the same state and groups (lr and names included), then the steps of the run not interrupted."""
    named = how.startswith("named")
    model, optimizer, batches = _setup(info, problem, named=named)
    train(model, optimizer, info, batches[:HALF])
    fresh, fresh_optimizer = _fresh(info, problem, model, named)
    # state_dict() holds references to the live state, and load_state_dict keeps them: copy, as torch's tests do
    saved = _saved(optimizer) if how.endswith("weights_only") else copy.deepcopy(optimizer.state_dict())
    fresh_optimizer.load_state_dict(saved)
    assert_same(fresh_optimizer.state_dict(), optimizer.state_dict())
    if named:
        names = [g["param_names"] for g in optimizer.param_groups]
        assert [g["param_names"] for g in fresh_optimizer.param_groups] == names
        assert fresh_optimizer.param_groups[0]["param_names"][0] in dict(model.named_parameters())
    train(model, optimizer, info, batches[HALF:], first=HALF + 1)
    train(fresh, fresh_optimizer, info, batches[HALF:], first=HALF + 1)
    assert_same_run(model, optimizer, fresh, fresh_optimizer)


@pytest.mark.parametrize(("info", "problem"), cases(OLD_STATE_DICT))
def test_an_older_state_dict_loads(info, problem):
    """A state dict as older torch saved it, ``step`` a plain number and ``maximize`` missing from the groups
    (torch's test_load_nontensor_step and test_can_load_older_state_dict): loads and steps as the original."""
    model, optimizer, batches = _setup(info, problem)
    train(model, optimizer, info, batches[:HALF])
    saved = copy.deepcopy(optimizer.state_dict())
    numbers = 0
    for state in saved["state"].values():
        if torch.is_tensor(state.get("step")):
            state["step"], numbers = state["step"].item(), numbers + 1
    for group in saved["param_groups"]:
        group.pop("maximize", None)
    fresh, fresh_optimizer = _fresh(info, problem, model)
    fresh_optimizer.load_state_dict(saved)
    train(model, optimizer, info, batches[HALF:], first=HALF + 1)
    train(fresh, fresh_optimizer, info, batches[HALF:], first=HALF + 1)
    assert_same_run(model, optimizer, fresh, fresh_optimizer)
    assert numbers > 0 or not any("step" in s for s in optimizer.state.values())


LR = 2.0**-9  # exact in float32: a float32 tensor lr and this float are the same number


def assert_same_steps(model, twin) -> None:
    """The same parameters up to float32 rounding of the step size (a tensor lr may enter it in float32)."""
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("info", "problem", "shape"), cases(TENSOR_LR, lambda *_: ("0-d", "1-element")))
def test_a_tensor_lr_steps_as_the_float(info, problem, shape):
    lr = torch.tensor(LR) if shape == "0-d" else torch.tensor([LR])
    model, optimizer, batches = _setup(info, problem, lr=lr)
    twin, twin_optimizer, _ = _setup(info, problem, lr=LR)
    other, other_optimizer, _ = _setup(info, problem, lr=LR / 2)
    for run in ((model, optimizer), (twin, twin_optimizer), (other, other_optimizer)):
        train(*run[:2], info, batches)
    assert_same_steps(model, twin)
    assert torch.equal(optimizer.param_groups[0]["lr"], lr) and optimizer.param_groups[0]["lr"] == LR
    assert not torch.equal(next(model.parameters()), next(other.parameters()))  # the lr is used


@pytest.mark.parametrize(("info", "problem", "shape"), cases(TENSOR_LR, lambda *_: ("2-element",), problems=("conv",)))
def test_a_tensor_lr_of_several_elements_is_a_value_error(info, problem, shape):
    with pytest.raises(ValueError, match="lr"):
        _setup(info, problem, lr=torch.tensor([LR, LR]))


SCHEDULES = {  # the lr (a new tensor each time: schedulers fill it in place) and the scheduler
    "LambdaLR-float": (lambda: LR, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)),
    "StepLR-tensor": (lambda: torch.tensor(LR), lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)),
}


@pytest.mark.parametrize(("info", "problem", "schedule"), cases(SCHEDULER, lambda *_: tuple(SCHEDULES)))
def test_an_lr_scheduler_steps_as_a_hand_set_lr(info, problem, schedule):
    """A scheduler that halves the lr every step, against the groups' lr set by hand before each step."""
    make_lr, make_scheduler = SCHEDULES[schedule]
    lr = make_lr()
    model, optimizer, batches = _setup(info, problem, lr=lr)
    scheduler = make_scheduler(optimizer)
    twin, twin_optimizer, _ = _setup(info, problem, lr=LR)
    constant, constant_optimizer, _ = _setup(info, problem, lr=LR)
    for t, batch in enumerate(batches, 1):
        step(model, optimizer, info, batch, t)
        scheduler.step()
        for group in twin_optimizer.param_groups:
            group["lr"] = LR * 0.5 ** (t - 1)
        step(twin, twin_optimizer, info, batch, t)
        step(constant, constant_optimizer, info, batch, t)
    assert_same_steps(model, twin)
    assert not torch.equal(next(model.parameters()), next(constant.parameters()))  # the schedule is used
    assert float(optimizer.param_groups[0]["lr"]) == LR * 0.5**STEPS
    assert isinstance(optimizer.param_groups[0]["lr"], type(lr))


@pytest.mark.parametrize(("info", "problem", "frozen"), cases(FROZEN, lambda _, problem: PROBLEMS[problem].frozen))
def test_frozen_tensors_stay_as_they_are(info, problem, frozen):
    """A tensor with ``requires_grad=False`` before the optimizer is built: unchanged and without state, the others
    trained; with plain params, as an optimizer given only the trainable tensors."""
    model = PROBLEMS[problem]()
    model.get_parameter(frozen).requires_grad_(False)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, batches = build(info, model), model.batches()
    train(model, optimizer, info, batches)
    for name, p in model.named_parameters():
        if name == frozen:
            assert torch.equal(p, start[name]) and not optimizer.state.get(p)
        else:
            assert not torch.equal(p, start[name]) and p.isfinite().all(), name
    if info.builder is None or problem == "tensors":
        twin = PROBLEMS[problem]()
        twin.get_parameter(frozen).requires_grad_(False)
        trainable = [p for p in twin.parameters() if p.requires_grad]
        groups = info.tensor_groups(trainable) if problem == "tensors" else trainable
        twin_optimizer = info.cls(groups, **{**info.kwargs, **info.short_run})
        train(twin, twin_optimizer, info, batches)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("info", "problem", "dropped"), cases(NO_GRAD, lambda _, p: tuple(PROBLEMS[p].dropped)))
def test_tensors_without_a_gradient_are_skipped(info, problem, dropped):
    """Gradients set to None on steps 2 and 3 (a layer left out of the loss): those tensors and their state stay
    as they are on those steps, the others are trained, and all are again on step 4. An optimizer whose layer
    blocks join weight and bias refuses a layer with only some of its gradients, with one ValueError."""
    model, optimizer, batches = _setup(info, problem)
    names = PROBLEMS[problem].dropped[dropped]
    tensors = [model.get_parameter(n) for n in names]
    step(model, optimizer, info, batches[0], 1)
    if info.joint_layers and dropped == "linear.bias":
        with pytest.raises(ValueError, match="only some of them have a gradient"):
            step(model, optimizer, info, batches[1], 2, drop=names)
        return
    for t in (2, 3):
        before, state = [p.detach().clone() for p in tensors], clone_state(optimizer, tensors)
        others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
        step(model, optimizer, info, batches[t - 1], t, drop=names)
        for p, b in zip(tensors, before):
            assert torch.equal(p, b)
        assert_same(clone_state(optimizer, tensors), state, "state")
        assert all(not torch.equal(model.get_parameter(n), p) for n, p in others.items())
    before = [p.detach().clone() for p in tensors]
    step(model, optimizer, info, batches[3], 4)
    assert all(not torch.equal(p, b) for p, b in zip(tensors, before))


@pytest.mark.parametrize(("info", "problem", "dropped"), cases(NO_GRAD, lambda *_: ("every-tensor",)))
def test_a_step_without_gradients_changes_nothing(info, problem, dropped):
    """torch's test_step_is_noop_when_params_have_no_grad, mid-run: no gradient at all, nothing moves."""
    model, optimizer, batches = _setup(info, problem)
    train(model, optimizer, info, batches[:HALF])
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    assert_same(optimizer.state_dict(), state)


@pytest.mark.parametrize(("info", "problem"), cases(FLOAT64))
def test_float64_end_to_end(info, problem):
    """A float64 model: every floating state tensor is float64 after steps that ran every code path."""
    model = PROBLEMS[problem]().double()
    optimizer = build(info, model)
    train(model, optimizer, info, model.batches(torch.float64))
    floating = [t for t in state_tensors(optimizer) if t.is_floating_point()]
    assert floating and {t.dtype for t in floating} == {torch.float64}
    assert all(p.dtype == torch.float64 and p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(("info", "problem"), cases(CLOSURE))
def test_a_closure_steps_as_a_loop(info, problem):
    """``step(closure)`` returns the closure's loss and steps as calling the closure before ``step()``."""
    model, optimizer, batches = _setup(info, problem)
    twin, twin_optimizer, _ = _setup(info, problem)
    for t, batch in enumerate(batches, 1):
        loss = step(model, optimizer, info, batch, t, closure=True)
        assert torch.equal(loss, step(twin, twin_optimizer, info, batch, t))
    assert_same_run(model, optimizer, twin, twin_optimizer)


@pytest.mark.parametrize(("info", "problem"), cases(ZERO_GRAD))
def test_zero_grad_without_set_to_none(info, problem):
    """``zero_grad(set_to_none=False)`` leaves zero gradients, and the run steps as with ``set_to_none=True``."""
    model, optimizer, batches = _setup(info, problem)
    twin, twin_optimizer, _ = _setup(info, problem)
    train(model, optimizer, info, batches, set_to_none=False)
    train(twin, twin_optimizer, info, batches, set_to_none=True)
    assert_same_run(model, optimizer, twin, twin_optimizer)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("info", "problem"), cases(HOOKS))
def test_step_and_state_dict_hooks(info, problem):
    """Step pre/post hooks see the parameters before/after each step; state_dict and load_state_dict hooks run
    in order, and a state_dict post hook's additions reach the load hooks."""
    model, optimizer, batches = _setup(info, problem)
    calls = []

    def first_param():
        return next(model.parameters()).detach().clone()

    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", first_param())))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", first_param())))
    seen = []
    for t, batch in enumerate(batches[:2], 1):
        seen.append(("pre", first_param()))
        step(model, optimizer, info, batch, t)
        seen.append(("post", first_param()))
    assert [c for c, _ in calls] == [c for c, _ in seen] == ["pre", "post", "pre", "post"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(calls, seen))
    assert not torch.equal(seen[0][1], seen[-1][1])

    calls.clear()
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("state_dict_pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "marker": 7})
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append(("load_pre", sd.get("marker"))))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(("load_post", len(opt.state))))
    saved = optimizer.state_dict()
    assert saved["marker"] == 7
    optimizer.load_state_dict(saved)
    assert calls == ["state_dict_pre", ("load_pre", 7), ("load_post", len(optimizer.state))] and optimizer.state


@pytest.mark.parametrize(
    ("info", "problem", "name"), cases(ERRORS, lambda info, _: tuple(n for n, *_ in info.invalid), problems=("conv",))
)
def test_a_bad_hyperparameter_is_a_value_error_naming_it(info, problem, name):
    value, named_as = next((v, n) for k, v, n in info.invalid if k == name)
    with pytest.raises(ValueError) as error:
        _setup(info, problem, **{name: value})
    assert named_as in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("info", "problem"), cases(MAXIMIZE, when=lambda info: info.maximize))
def test_maximize_is_minimizing_the_negated_loss(info, problem):
    """``maximize=True`` on ``-loss`` takes bitwise the steps of minimizing ``loss`` (the state may differ where it
    holds estimates of the objective's own curvature, as AdaHessian's last Hessian estimate)."""
    model, optimizer, batches = _setup(info, problem, maximize=True)
    twin, twin_optimizer, _ = _setup(info, problem)
    train(model, optimizer, info, batches, sign=-1.0)
    train(twin, twin_optimizer, info, batches)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.numerics
@pytest.mark.parametrize(("info", "problem"), cases(FOREACH, when=lambda info: info.foreach))
def test_foreach_and_for_loop_take_the_same_steps(info, problem):
    """In float64, the multi-tensor and the per-tensor implementations agree to rounding."""
    runs = []
    for foreach in (True, False):
        model = PROBLEMS[problem]().double()
        train(model, build(info, model, foreach=foreach), info, model.batches(torch.float64))
        runs.append(list(model.parameters()))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS.values() if i.builder], ids=lambda i: i.name)
def test_plain_parameters_of_a_model_are_one_clear_error(info):
    """An optimizer that needs its groups built from the modules says so instead of failing inside ``step``."""
    model = PROBLEMS["conv"]()
    with pytest.raises(ValueError, match=rf"{info.builder}\(model\)") as error:
        info.cls(model_params(model), **info.short_run)
    assert "\n" not in str(error.value)


def test_a_kfac_step_without_a_recorded_batch_is_one_clear_error():
    model = PROBLEMS["conv"]()
    optimizer = build(OPTIMIZERS["kfac"], model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match=r"no batch recorded .* kfac_param_groups\(model\)"):
        optimizer.step()


def _config(name: str) -> dict:
    """``configs/optimizer/<name>.yaml`` over the files its defaults list names."""
    node = yaml.safe_load((ROOT / "configs" / "optimizer" / f"{name}.yaml").read_text())
    merged: dict = {}
    for parent in node.pop("defaults", []):
        merged.update(_config(parent))
    return {**merged, **node}


@LIBRARY_MISSING
def test_the_registry_holds_every_optimizer_the_repo_ships():
    """Every optimizer class that ``adacov`` exports, and every ``configs/optimizer`` entry (same class, same
    ``create_graph``), is in the registry."""
    exported = {getattr(adacov, n) for n in adacov.__all__}
    registered = {info.cls for info in OPTIMIZERS.values()}
    assert {c for c in exported if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)} <= registered
    configs = {p.stem: _config(p.stem) for p in (ROOT / "configs" / "optimizer").glob("*.yaml")}
    assert configs.keys() == OPTIMIZERS.keys()
    for name, config in configs.items():
        module, _, cls = config["_target_"].rpartition(".")
        assert getattr(importlib.import_module(module), cls) is OPTIMIZERS[name].cls, name
        assert config.get("create_graph", False) == OPTIMIZERS[name].create_graph, name


@LIBRARY_MISSING
def test_docs_hold_the_registrys_support_table():
    assert support_table() in (ROOT / "docs" / "optimizers.md").read_text()
