"""Batch-size lr scaling: the rules' formulas, auto's choice per optimizer family, and the lr a run records."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from adacov import KFAC, MBF, AdaCov, EAdam, kfac_param_groups, mbf_param_groups
from adacov.errors import UserError
from adacov.training import train
from adacov.training.loop import check_settings
from adacov.training.lr_scaling import lr_factor, resolve_rule, scale_learning_rates


@pytest.mark.parametrize(("batch", "reference"), [(32, 128), (512, 128), (128, 128), (96, 64)])
def test_linear_and_square_root_rules(batch, reference):
    assert lr_factor("linear", batch, reference) == batch / reference
    assert lr_factor("sqrt", batch, reference) == pytest.approx(math.sqrt(batch / reference), rel=1e-15)
    assert lr_factor("none", batch, reference) == 1.0


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize(
    ("build", "rule"),
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "linear"),
        (lambda m: torch.optim.Adam(m.parameters()), "sqrt"),
        (lambda m: torch.optim.AdamW(m.parameters()), "sqrt"),
        (lambda m: AdaCov(m.parameters()), "sqrt"),
        (lambda m: EAdam(m.parameters()), "sqrt"),
    ],
    ids=["sgd", "adam", "adamw", "adacov", "eadam"],
)
def test_auto_picks_linear_for_sgd_and_sqrt_for_the_adam_family(build, rule):
    assert resolve_rule("auto", build(_model()), "x") == rule


@pytest.mark.parametrize(
    "build", [lambda m: KFAC(kfac_param_groups(m)), lambda m: MBF(mbf_param_groups(m), lr=1e-3)], ids=["kfac", "mbf"]
)
def test_auto_refuses_optimizers_outside_both_families(build):
    with pytest.raises(UserError, match=r"^lr_scaling=auto has no rule for optimizer=name \((KFAC|MBF)\)"):
        resolve_rule("auto", build(_model()), "name")


def test_scaling_multiplies_every_param_group():
    model = _model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters()}], lr=0.1
    )
    scale_learning_rates(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.05, 0.025]


@pytest.mark.numerics
@pytest.mark.parametrize(("rule", "factor"), [("sqrt", 0.5), ("linear", 0.25)])
def test_a_scaled_run_records_its_lr_and_takes_the_steps_of_that_lr(tmp_path, rule, factor):
    """Batch 32 against the reference 128: sqrt halves Adam's lr 0.002 (exactly: both are powers of 2 apart),
    linear quarters it; the run equals one configured at that lr, and environment.json says which lr it used."""
    from tests.conftest import compose_config
    from tests.test_data_order import TINY

    scaled, direct = tmp_path / "scaled", tmp_path / "direct"
    train(
        compose_config(
            scaled, [*TINY, "epochs=1", "optimizer.lr=0.002", f"lr_scaling={rule}", "lr_reference_batch=128"]
        )
    )
    train(compose_config(direct, [*TINY, "epochs=1", f"optimizer.lr={0.002 * factor}"]))
    info = json.loads((scaled / "environment.json").read_text())
    assert info["lr_scaling"] == rule and info["lr_factor"] == factor and info["lr"] == [0.002 * factor]
    assert info["config"]["optimizer"]["lr"] == 0.002 and info["config"]["lr_reference_batch"] == 128
    assert json.loads((direct / "environment.json").read_text())["lr"] == [0.002 * factor]
    assert pd.read_csv(scaled / "metrics.csv").loss.tolist() == pd.read_csv(direct / "metrics.csv").loss.tolist()


def test_auto_records_the_rule_it_picked(small_config, tmp_path):
    train(
        small_config(
            "epochs=1",
            "data.image_size=8",
            "optimizer=sgd",
            "lr_scaling=auto",
            "lr_reference_batch=64",
            "optimizer.lr=0.1",
        )
    )
    info = json.loads((tmp_path / "environment.json").read_text())
    assert info["lr_scaling"] == "linear" and info["lr"] == [0.05]


def test_auto_with_kfac_stops_before_writing_anything(small_config, tmp_path):
    with pytest.raises(UserError, match="lr_scaling=auto has no rule for optimizer=kfac"):
        train(small_config("optimizer=kfac", "lr_scaling=auto"))
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr_scaling=cubic", "lr_scaling='cubic' is not allowed: use one of none, linear, sqrt, auto"),
        ("lr_reference_batch=0", "lr_reference_batch=0 is not allowed: use an integer >= 1"),
    ],
)
def test_bad_scaling_settings_are_named(small_config, override, message):
    with pytest.raises(UserError) as error:
        check_settings(small_config(override))
    assert str(error.value) == message
