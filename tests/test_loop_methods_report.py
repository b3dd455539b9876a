"""loop_methods_report.py: the batch-size analysis on losses with a known optimum, and the report of real runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from adacov.report.loop_methods import batch_table, scaling_exponents
from adacov.training import train
from tests.conftest import SMALL, compose_config

TINY_IMAGES = ["data.train_size=64", "data.image_size=8", "data.num_classes=10"]  # 2 steps of 32 8x8 images


def _grid_runs(alpha: float, optimizer: str) -> list[dict]:
    """Final losses exactly quadratic in log10(lr), with their minimum at ``lr*(B) = 1e-3 * (B / 32)^alpha``."""
    rows = []
    for batch in (32, 64, 128, 256):
        best = math.log10(1e-3 * (batch / 32) ** alpha)
        for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
            rows.append({
                "optimizer": optimizer, "batch_size": batch, "lr": lr, "lr_step": 0, "data_order": "rr", "salr": False,
                "seed": 0, "epochs": 15, "final_train_loss": 0.1 + (math.log10(lr) - best) ** 2, "diverged": False,
            })  # fmt: skip
    return rows


def test_batch_analysis_recovers_linear_square_root_and_no_scaling():
    runs = pd.DataFrame(_grid_runs(1.0, "sgd") + _grid_runs(0.5, "adam") + _grid_runs(0.1, "adacov"))
    batch = batch_table(runs, classes=10)
    expected = [1e-3 * (b / 32) ** a for a in (0.1, 0.5, 1.0) for b in (32, 64, 128, 256)]  # sorted by optimizer
    np.testing.assert_allclose(batch.refined_lr, expected, rtol=1e-9)
    exponents = scaling_exponents(batch).set_index("optimizer")
    assert exponents.alpha["sgd"] == pytest.approx(1.0) and exponents.closer_to["sgd"] == "linear"
    assert exponents.alpha["adam"] == pytest.approx(0.5) and exponents.closer_to["adam"] == "square root"
    assert exponents.alpha["adacov"] == pytest.approx(0.1) and exponents.closer_to["adacov"] == "none"


def test_a_batch_size_where_no_lr_trained_is_left_out_of_the_fit():
    rows = _grid_runs(0.5, "adam")
    for row in rows:
        if row["batch_size"] == 256:
            row["final_train_loss"] = 2.25 - 0.01 * row["lr"]  # the best (2.2497) within 10% of ln(10) = 2.303
            if row["lr"] == 3e-2:
                row["final_train_loss"] = 5.3  # an lr that blew up does not make the others look trained
    batch = batch_table(pd.DataFrame(rows), classes=10)
    assert batch.set_index("batch_size").flat.tolist() == [False, False, False, True]
    exponents = scaling_exponents(batch)
    assert exponents.alpha.iloc[0] == pytest.approx(0.5) and exponents.batch_sizes.iloc[0] == "32, 64, 128"


def test_report_of_real_runs_measures_sharpness_and_writes_its_tables(tmp_path):
    import loop_methods_report

    runs = tmp_path / "runs"
    for name, extra in (("off", []), ("on", ["salr.enabled=true"])):
        train(compose_config(runs / name, [*SMALL, *TINY_IMAGES, "epochs=1", *extra]))
    assert loop_methods_report.main([str(runs), "--out", str(tmp_path / "out"), "--measure", "--images", "32"]) == 0
    for name in ("off", "on"):
        measured = json.loads((runs / name / "sharpness.json").read_text())
        assert measured["images"] == 32 and measured["salr_sharpness"] > 0 and measured["hessian_top_eigenvalue"] > 0
    report = (tmp_path / "out" / "loop_methods.md").read_text()
    assert "| Adam | 0.001 | off |" in report and "| Adam | 0.001 | on |" in report
    assert (tmp_path / "out" / "loop_methods.png").is_file() and len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 2


@pytest.mark.parametrize(
    ("experiment", "data"),
    [("loop_methods_digits", "load_digits"), ("loop_methods_fashion_mnist", "load_fashion_mnist")],
)
def test_loop_methods_experiments_centre_their_grid_on_the_tuned_lr(tmp_path, experiment, data):
    for optimizer, lr in (("adam", 1e-3), ("adacov", 1e-3), ("sgd", 3e-2)):
        cfg = compose_config(tmp_path, [f"experiment={experiment}", f"optimizer={optimizer}", "lr_step=-1"])
        assert cfg.optimizer.lr == lr and cfg.model.kernel_size == 3 and cfg.data._target_.endswith(data)
        assert not cfg.salr.enabled and cfg.data_order == "rr" and cfg.lr_scaling == "none"
