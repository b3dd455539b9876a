"""SALR: probes that change nothing, the sharpness and lr rule against hand computations on quadratics,
and a run that resumes mid-epoch exactly."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pandas as pd
import pytest
import torch
from torch import nn

from adacov import KFAC, AdaCov, kfac_param_groups
from adacov.errors import UserError
from adacov.training import train
from adacov.training.loop import check_settings
from adacov.training.salr import SALR, SALRSettings, salr_factor
from adacov.training.sharpness import salr_sharpness, top_hessian_eigenvalue
from tests.conftest import compose_config
from tests.test_data_order import TINY, interrupted_then_resumed

pytestmark = pytest.mark.numerics


class Shift(nn.Module):
    """``x - theta``: with :func:`quadratic` as the loss, ``f_j(theta) = 1/2 (theta - c_j)^T A (theta - c_j)``."""

    def __init__(self, theta: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.theta


def quadratic(a: torch.Tensor):
    """The loss ``1/2 sum_i a_i out_i^2`` per sample (``A = diag(a)``), torch-style ``reduction``."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_sample = 0.5 * (a * outputs**2).sum(1)
        return per_sample.mean() if reduction == "mean" else per_sample

    return loss


def batch_loss(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``f_B`` at ``theta = c_bar + e`` up to the constant that ``S`` cancels: ``1/2 e^T A e``."""
    return 0.5 * (a * e**2).sum()


def test_clamped_sharpness_of_a_quadratic_is_its_closed_form():
    """``grad f_B = A (theta - c_bar)``. Unclamped, n gradient steps give ``e -> (I -+ gamma A)^n e``; where
    ``|a_i e_i|`` exceeds the clamp all along, coordinate i moves by exactly ``gamma * clamp`` per step."""
    a = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    centres = torch.tensor([[0.5, -1.0, 2.0], [1.5, 1.0, 0.0]], dtype=torch.float64)  # c_bar = (1, 0, 1)
    model = Shift([2.0, 0.5, -1.0])
    e = model.theta.detach() - centres.mean(0)  # (1, 0.5, -2)
    gamma, n1, n2 = 0.05, 3, 4
    s = salr_sharpness(model, centres, torch.zeros(2), n1, n2, gamma, "clamped", clamp=100.0, loss=quadratic(a))
    expected = batch_loss(a, (1 + gamma * a) ** n2 * e) - batch_loss(a, (1 - gamma * a) ** n1 * e)
    assert s == pytest.approx(expected.item(), rel=1e-12)

    clamp = 0.1  # |a_i e_i| = 4, 0.5, 0.5 stay above 0.1 over 4 steps of 0.005
    s = salr_sharpness(model, centres, torch.zeros(2), n1, n2, gamma, "clamped", clamp=clamp, loss=quadratic(a))
    sign = e.sign()
    expected = batch_loss(a, e + n2 * gamma * clamp * sign) - batch_loss(a, e - n1 * gamma * clamp * sign)
    assert s == pytest.approx(expected.item(), rel=1e-12)


def test_per_sample_sharpness_of_a_quadratic_follows_the_normalized_mean():
    """``A = a I`` and two samples ``c_bar -+ u`` with ``u`` orthogonal to ``e = theta - c_bar``: the per-sample
    gradients ``a (e +- u)`` have equal norms ``a r``, ``r = sqrt(|e|^2 + |u|^2)``, so their normalized mean is
    ``e / r``; each probe step scales ``e`` by ``1 -+ gamma / r`` (``u`` stays). The batch gradient normalized
    would step by ``gamma`` along ``e / |e|`` instead."""
    a = 2.0
    model = Shift([3.0, 0.0])
    u = torch.tensor([0.0, 4.0], dtype=torch.float64)
    centres = torch.stack([torch.zeros(2, dtype=torch.float64) - u, u])  # c_bar = 0, e = (3, 0)
    gamma, n1, n2 = 0.1, 5, 5
    s = salr_sharpness(
        model,
        centres,
        torch.zeros(2),
        n1,
        n2,
        gamma,
        "per_sample",
        loss=quadratic(torch.full((2,), a, dtype=torch.float64)),
    )

    def walk(length: float, sign: float, steps: int) -> float:
        for _ in range(steps):
            length += sign * gamma * length / math.sqrt(length**2 + 16.0)
        return length

    expected = 0.5 * a * (walk(3.0, 1.0, n2) ** 2 - walk(3.0, -1.0, n1) ** 2)
    assert s == pytest.approx(expected, rel=1e-12)


def test_lr_rule_matches_a_hand_computation():
    """``lr_k = lr0 * clip(S_k / median(S_1..S_k), 0, cap)``; 1 while the median is not positive."""
    assert salr_factor([2.0], 5.0) == 1.0
    assert salr_factor([2.0, 1.0], 5.0) == pytest.approx(1.0 / 1.5)
    assert salr_factor([2.0, 1.0, 4.0], 5.0) == 2.0
    assert salr_factor([2.0, 1.0, 4.0, 8.0], 5.0) == pytest.approx(8.0 / 3.0)
    assert salr_factor([2.0, 1.0, 4.0, 8.0, 100.0], 5.0) == 5.0
    assert salr_factor([2.0, 1.0, -1.0], 5.0) == 0.0
    assert salr_factor([-1.0, 0.5], 5.0) == 1.0  # median -0.25


def test_salr_around_sgd_on_a_quadratic_takes_the_hand_computed_steps():
    """Every step measures (``every=1``): ``S_k`` in closed form, ``lr_k`` from the rule, then SGD's step
    ``theta <- theta - lr_k A (theta - c_bar)``."""
    a = torch.tensor([3.0, 0.5], dtype=torch.float64)
    centres = torch.tensor([[1.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)  # c_bar = (0, 2)
    model = Shift([2.0, -1.0])
    lr0, gamma, n = 0.1, 0.01, 2
    optimizer = torch.optim.SGD(model.parameters(), lr=lr0)
    salr = SALR(optimizer, SALRSettings(every=1, steps_descent=n, steps_ascent=n, step_size=gamma, clamp=1e3, cap=1.5))
    loss = quadratic(a)
    e = model.theta.detach() - centres.mean(0)
    history = []
    for step in range(1, 5):
        assert salr.due(step)
        salr.observe(step, salr_sharpness(model, centres, torch.zeros(2), n, n, gamma, "clamped", clamp=1e3, loss=loss))
        optimizer.zero_grad()
        loss(model(centres), None).backward()
        optimizer.step()

        history.append((batch_loss(a, (1 + gamma * a) ** n * e) - batch_loss(a, (1 - gamma * a) ** n * e)).item())
        lr = lr0 * min(history[-1] / statistics.median(history), 1.5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        e = e - lr * a * e
        torch.testing.assert_close(model.theta.detach() - centres.mean(0), e, rtol=1e-12, atol=0)
    assert salr.sharpness == pytest.approx(history, rel=1e-12)


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},  # parameters and BatchNorm's running statistics
        [p.grad.clone() for p in model.parameters()],
        copy.deepcopy(optimizer.state_dict()),
    )


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    torch.testing.assert_close(a["state"], b["state"], rtol=0, atol=0)


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    _assert_same_optimizer_state(after[2], before[2])


@pytest.mark.parametrize("direction", ["clamped", "per_sample"])
def test_probes_leave_weights_grads_batchnorm_statistics_and_adacov_state_as_they_were(direction):
    torch.manual_seed(0)
    model = BatchNormNet().double().train()
    optimizer = AdaCov(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    for _ in range(2):  # moments, covariances and running statistics that are not at their initial values
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = _snapshot(model, optimizer)
    s = salr_sharpness(model, x, y, direction=direction)
    assert s > 0
    _assert_same(before, _snapshot(model, optimizer))
    assert model.norm.num_batches_tracked.item() == 2


@pytest.mark.parametrize("when", ["before the forward", "between backward and step"])
def test_kfac_takes_the_same_step_with_and_without_probes(when):
    """The K-FAC family's hooks record each layer's inputs and output gradients; probes run on copies of the
    weights, so what the hooks keep under the real weights (and so the factors) is the same with them."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    runs = []
    for probe in (False, True):
        torch.manual_seed(1)
        model = BatchNormNet().double()
        optimizer = KFAC(kfac_param_groups(model), lr=1e-2, curvature_every=1, inverse_every=1)
        for _ in range(3):
            if probe and when == "before the forward":
                salr_sharpness(model, x, y)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if probe and when == "between backward and step":
                salr_sharpness(model, x, y, direction="per_sample")
            optimizer.step()
        runs.append((model, optimizer))
    (plain, plain_opt), (probed, probed_opt) = runs
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), probed.state_dict().values(), strict=True)
    )
    _assert_same_optimizer_state(probed_opt.state_dict(), plain_opt.state_dict())
    assert probed_opt.state_dict()["state"]  # factors and inverses were computed


def test_top_hessian_eigenvalue_of_a_quadratic_is_the_largest_curvature():
    a = torch.tensor([0.5, 7.0, 2.0], dtype=torch.float64)
    model = Shift([1.0, 2.0, 3.0])
    value = top_hessian_eigenvalue(model, torch.zeros(4, 3, dtype=torch.float64), None, iterations=60,
                                   generator=torch.Generator().manual_seed(0), loss=quadratic(a))  # fmt: skip
    assert value == pytest.approx(7.0, rel=1e-10)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("salr.every=0", "salr.every=0 is not allowed: use an integer >= 1"),
        ("salr.steps_ascent=1.5", "salr.steps_ascent=1.5 is not allowed: use an integer >= 1"),
        ("salr.step_size=0", "salr.step_size=0 is not allowed: use a finite number > 0"),
        ("salr.cap=0.5", "salr.cap=0.5 is not allowed: use a finite number >= 1"),
        ("salr.direction=sign", "salr.direction='sign' is not allowed: use one of clamped, per_sample"),
        ("salr.enabled=maybe", "salr.enabled='maybe' is not allowed: use true or false"),
    ],
)
def test_bad_salr_settings_are_named(small_config, override, message):
    with pytest.raises(UserError) as error:
        check_settings(small_config(override))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_salr_resumes_mid_epoch_exactly_and_logs_its_history(tmp_path, monkeypatch):
    """Stopped right after the measuring step 5: the resumed step 6 takes step 5's lr (saved with the optimizer's
    param groups) and step 7 measures against the restored history."""
    overrides = ["salr.enabled=true", "optimizer=adacov", "optimizer.lr=0.01"]
    full, resumed = interrupted_then_resumed(tmp_path, monkeypatch, overrides, stop_at_batch=1)
    columns = ["step", "epoch", "loss"]
    pd.testing.assert_frame_equal(
        pd.read_csv(full / "metrics.csv")[columns], pd.read_csv(resumed / "metrics.csv")[columns]
    )
    history = pd.read_csv(full / "salr.csv")
    pd.testing.assert_frame_equal(history, pd.read_csv(resumed / "salr.csv"))
    assert history.step.tolist() == [1, 3, 5, 7] and (history.lr_factor != 1.0).any()
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["salr"] == b["salr"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["optimizer"]["param_groups"][0]["lr"] == 0.01 * history.lr_factor.iloc[-1]


def test_a_resumed_run_records_its_own_lr_not_the_one_salr_moved_it_to(tmp_path):
    """After epoch 1 SALR has moved the lr (step 3's factor); the run continued to epoch 2 records lr0 in
    environment.json, as the run that trained both epochs in one go does, while its optimizer steps on."""
    from tests.conftest import compose_config
    from tests.test_data_order import TINY

    overrides = [*TINY, "salr.enabled=true", "optimizer=adacov", "optimizer.lr=0.01"]
    train(compose_config(tmp_path, [*overrides, "epochs=1"]))
    moved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"][0]["lr"]
    assert moved != 0.01
    train(compose_config(tmp_path, [*overrides, "epochs=2", "resume=true"]))
    assert json.loads((tmp_path / "environment.json").read_text())["lr"] == [0.01]


def test_resume_refuses_a_checkpoint_written_with_the_other_salr_setting(small_config):
    train(small_config("epochs=1"))
    with pytest.raises(UserError, match="salr.enabled=True does not match the checkpoint"):
        train(small_config("epochs=2", "resume=true", "salr.enabled=true"))


@pytest.mark.parametrize("optimizer", ["adahessian", "kfac"])
def test_salr_wraps_optimizers_that_need_create_graph_or_hooks(tmp_path, optimizer):
    """AdaHessian backpropagates with create_graph (the probes take their own gradients first); K-FAC reads its
    hooks' batches and has a param group per layer: SALR sets every group's lr and reads nothing of theirs."""
    overrides = [*TINY, "data.train_size=96", "epochs=1", f"optimizer={optimizer}", "salr.enabled=true"]
    train(compose_config(tmp_path, overrides))
    history = pd.read_csv(tmp_path / "salr.csv")
    assert history.step.tolist() == [1, 3] and (history.sharpness > 0).all()
    assert pd.read_csv(tmp_path / "metrics.csv").loss.notna().all()
