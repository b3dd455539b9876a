"""The learning-rate sweep: experiment=tune runs each optimizer's grid; tune_report.py picks the best lr."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import tune_report
from adacov.report.tuning import COLUMNS, best_learning_rates, config_snippets, edge_extensions, load_trials, summarize
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


def test_a_grid_where_nothing_trained_extends_downwards_even_from_an_upper_or_inner_best():
    """Losses above ln(10) (a uniform prediction's on 10 classes) at every lr: the lowest is no pick to extend from."""
    rows = [("kld_wrm_so", 3, 3e-3 * 3.0**step, 0, loss, 0.2, False, step) for step, loss in zip((-1, 0, 1), (3.8e4, 9.4e4, 2.2e4))]
    rows += [("kld_wrm_q", 3, 3e-3 * 3.0**step, 0, loss, 0.2, False, step) for step, loss in zip((-1, 0, 1, 2), (50.0, 9.0, 2.4, 7.0))]
    rows += [("adam", 3, 1e-3 * 3.0**step, 0, loss, 0.9, False, step) for step, loss in zip((-1, 0, 1), (0.5, 0.4, 0.3))]
    trials = _trials(rows)
    best = best_learning_rates(summarize(trials))
    assert edge_extensions(trials, best) == ["optimizer=adam,kld_wrm_so model.kernel_size=3 lr_step=2"]
    assert edge_extensions(trials, best, untrained_loss=math.log(10)) == [
        "optimizer=kld_wrm_q,kld_wrm_so model.kernel_size=3 lr_step=-2",
        "optimizer=adam model.kernel_size=3 lr_step=2",
    ]


def test_tune_report_refuses_fewer_than_two_classes(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tune_report.main([str(tmp_path), "--out", str(tmp_path), "--extensions", "--classes", "1"])
    assert stop.value.code == 2
    assert "--classes 1: a classification task has at least 2 classes" in capsys.readouterr().err


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

    # Runs under way are left out, to be planned again and resumed: one checkpointed after its first epoch, one
    # stopped before any; a diverged run stays in, also with a checkpoint beside its record.
    resumable, unstarted = sorted(sweep.glob("adam_*_lr0.003_*"))
    diverged = next(run for run in sweep.glob("adam_*") if (run / "diverged.txt").is_file())
    epochs = pd.read_csv(resumable / "epochs.csv")
    epochs.iloc[:1].to_csv(resumable / "epochs.csv", index=False)
    epochs.iloc[:0].to_csv(unstarted / "epochs.csv", index=False)
    for run in (resumable, diverged):
        (run / "checkpoint.pt").write_bytes(b"")
    trials = load_trials(sweep)
    assert len(trials) == 6 and trials.diverged.sum() == 4
    assert not ((trials.optimizer == "adam") & (trials.lr == 0.003)).any()
