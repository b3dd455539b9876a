"""The learning-rate sweep: experiment=tune runs each optimizer's grid; tune_report.py picks the best lr."""

from __future__ import annotations

import math

import pandas as pd

import tune_report
from adacov.report.tuning import COLUMNS, best_learning_rates, config_snippets, edge_extensions, summarize
from tests.conftest import run_cli


def _trials(rows):
    return pd.DataFrame([dict(zip(COLUMNS, r)) for r in rows], columns=COLUMNS)


def test_edge_bests_get_one_more_point_beyond_their_edge_grouped_into_multiruns():
    """Steps -1, 0, 1 around a centre: a best at +1 extends to +2, at -1 to -2, inside stays; all diverged goes down."""
    rows = []
    for name, k, losses in [("adam", 3, (0.5, 0.4, 0.3)), ("soap", 3, (0.3, 0.4, 0.5)), ("kfac", 3, (0.5, 0.2, 0.3)),
                            ("kron", 3, (0.1, 0.4, 0.5)), ("adam", 5, (0.5, 0.4, 0.3))]:
        rows += [(name, k, 1e-3 * 3.0**step, 0, loss, 0.9, False, step) for step, loss in zip((-1, 0, 1), losses)]
    rows += [("mbf", 5, 1e-3 * 3.0**step, 0, math.inf, math.nan, True, step) for step in (-1, 0, 1)]
    rows += [("kron", 3, 1e-3 / 9, 0, 0.05, 0.9, False, -2)]  # kron's first extension is best again: one step further
    trials = _trials(rows)
    best = best_learning_rates(summarize(trials))
    assert edge_extensions(trials, best) == [
        "optimizer=kron model.kernel_size=3 lr_step=-3",
        "optimizer=soap model.kernel_size=3 lr_step=-2",
        "optimizer=adam model.kernel_size=3 lr_step=2",
        "optimizer=mbf model.kernel_size=5 lr_step=-2",
        "optimizer=adam model.kernel_size=5 lr_step=2",
    ]
    assert "optimizer=kron model.kernel_size=3 lr_step=-3" not in edge_extensions(trials, best, max_step=2)


def test_best_lr_has_the_lowest_mean_and_a_diverged_seed_disqualifies():
    trials = _trials([
        ("adam", 3, 1e-3, 0, 0.50, 0.9, False), ("adam", 3, 1e-3, 1, 0.70, 0.9, False),  # mean 0.60
        ("adam", 3, 3e-3, 0, 0.20, 0.9, False), ("adam", 3, 3e-3, 1, math.inf, math.nan, True),  # one seed diverged
        ("adam", 3, 1e-2, 0, 0.55, 0.9, False), ("adam", 3, 1e-2, 1, 0.55, 0.9, False),  # mean 0.55: best, an edge
        ("sgd", 3, 1e-2, 0, math.inf, math.nan, True), ("sgd", 3, 1e-2, 1, math.inf, math.nan, True),
    ])  # fmt: skip
    summary = summarize(trials)
    assert summary.set_index(["optimizer", "lr"]).loc[("adam", 3e-3), "mean_train_loss"] == math.inf
    best = best_learning_rates(summary).set_index("optimizer")
    assert best.loc["adam", "best_lr"] == 1e-2 and best.loc["adam", "mean_train_loss"] == 0.55 and best.loc["adam", "edge"]
    assert math.isnan(best.loc["sgd", "best_lr"])  # every lr diverged: no choice
    assert "adam.yaml:\n  tuned:\n    lr: {3: 1.0e-2}" in config_snippets(best.reset_index())


def test_tune_sweep_goes_on_past_a_diverging_lr_and_the_report_picks_the_best(tmp_path, capsys):
    sweep = tmp_path / "runs"
    result = run_cli(["-m", "experiment=tune", "optimizer=adam,eadam", "model.kernel_size=3", "tune_trial=0,1", "seed=0,1",
                      "optimizer.tune.lr=[0.003,1e12]", "epochs=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("error: the training loss is nan") == 4  # lr 1e12 diverges for both, every seed
    assert tune_report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    trials = pd.read_csv(tmp_path / "out" / "tune.csv")
    assert len(trials) == 8 and trials.diverged.sum() == 4
    finished = trials[~trials.diverged]
    expected = finished.groupby("optimizer").final_train_loss.mean()
    for run in sweep.glob("*_lr0.003_*"):  # the report read the runs' own final losses
        final = pd.read_csv(run / "epochs.csv").train_loss.iloc[-1]
        assert final in finished.final_train_loss.values
    best = pd.read_csv(tmp_path / "out" / "best_lr.csv").set_index("optimizer")
    assert (best.best_lr == 0.003).all() and (best.mean_train_loss.round(12) == expected.round(12)).all()
    assert "lr: {3: 3.0e-3}" in capsys.readouterr().out
    assert (tmp_path / "out" / "tune.png").is_file() and "diverged" in (tmp_path / "out" / "tune.md").read_text()
