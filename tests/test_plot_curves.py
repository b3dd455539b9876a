"""plot_curves.py on run directories with known metrics built here."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import plot_curves
from adacov.report import accuracy_curve, build_final_losses, build_table, load_runs, moving_average

STEPS_PER_EPOCH = 20


def make_run(root, optimizer, kernel, seed, step_time, epochs=2, loss_offset=0.0, data="synthetic", final_train_loss=1.0):
    run = root / f"{optimizer}_k{kernel}_seed{seed}"
    run.mkdir(parents=True)
    steps = np.arange(1, STEPS_PER_EPOCH * epochs + 1)
    times = np.full(len(steps), step_time)
    times[:10] = 10 * step_time  # warm-up steps, to be excluded
    pd.DataFrame({"step": steps, "epoch": steps / STEPS_PER_EPOCH, "loss": 4.0 / steps + loss_offset, "step_time_s": times}).to_csv(
        run / "metrics.csv", index=False
    )
    pd.DataFrame(
        {"epoch": [1, 2], "step": [20, 40], "train_loss": [3.5, final_train_loss], "test_loss": [3.0, 2.0], "test_acc": [0.1, 0.2], "epoch_time_s": [1.0, 2.0],
         "peak_mem_mb": [100.0, 120.0], "optimizer_state_mb": [5.0, 5.0]}
    ).to_csv(run / "epochs.csv", index=False)
    info = {"optimizer": optimizer, "kernel_size": kernel, "seed": seed, "data": data, "batch_size": 128,
            "epochs": epochs, "steps_per_epoch": STEPS_PER_EPOCH, "device_name": "CPU (2 threads)"}
    (run / "environment.json").write_text(json.dumps(info))
    return run


def test_moving_average_by_hand():
    values = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0])
    smoothed = moving_average(values, 10)
    assert smoothed.iloc[0] == 1.0 and smoothed.iloc[1] == 1.5
    assert smoothed.iloc[9] == pytest.approx(5.5)  # mean of 1..10
    assert smoothed.iloc[11] == pytest.approx(7.5)  # mean of 3..12


def test_test_accuracy_per_epoch_over_seeds_by_hand(tmp_path):
    runs = [make_run(tmp_path, "adam", 3, seed, 0.1) for seed in (0, 1)]
    pd.DataFrame({"epoch": [1, 2], "test_acc": [0.3, 0.6]}).to_csv(runs[1] / "epochs.csv", index=False)
    acc = accuracy_curve(load_runs(tmp_path)).set_index("epoch")
    assert acc.loc[1, "mean"] == pytest.approx(0.2) and acc.loc[2, "mean"] == pytest.approx(0.4)  # 0.1/0.3, 0.2/0.6
    assert acc.loc[2, "std"] == pytest.approx(np.std([0.2, 0.6], ddof=1)) and acc.loc[1, "n"] == 2


def test_table_percent_increase_by_hand(tmp_path):
    for seed, (adam, adacov) in enumerate([(0.100, 0.130), (0.100, 0.150)]):
        make_run(tmp_path, "adam", 3, seed, adam)
        make_run(tmp_path, "adacov", 3, seed, adacov)
    make_run(tmp_path, "adam", 5, 0, 0.200)
    make_run(tmp_path, "adacov", 5, 0, 0.540)
    table = build_table(load_runs(tmp_path)).set_index(["kernel", "optimizer"])
    row = table.loc[("3x3", "AdaCov")]
    assert row["increase over Adam (%)"] == pytest.approx(40.0)  # mean of +30 % and +50 %
    assert row["spread (std, %)"] == pytest.approx(np.std([30.0, 50.0], ddof=1))
    assert row["step time (ms)"] == pytest.approx(140.0)  # median over runs of per-run means
    assert table.loc[("5x5", "AdaCov"), "increase over Adam (%)"] == pytest.approx(170.0)
    assert table.loc[("5x5", "AdaCov"), "paper"] == "+169 %"
    assert table.loc[("3x3", "Adam"), "increase over Adam (%)"] == pytest.approx(0.0)
    assert row["epoch time (s)"] == 2.0 and row["peak memory (MB)"] == 120.0


def test_step_time_counts_periodic_work_at_its_amortized_cost(tmp_path):
    """A K-FAC-like run whose every 10th step also inverts (10x the time): its step time is the mean after the
    warm-up, 1.9x the plain step, not the median (1x), which would hide the inversions."""
    make_run(tmp_path, "adam", 3, 0, 0.100)
    kfac = make_run(tmp_path, "kfac", 3, 0, 0.100)
    metrics = pd.read_csv(kfac / "metrics.csv")
    metrics.loc[(metrics.step > 10) & (metrics.step % 10 == 0), "step_time_s"] = 1.0
    metrics.to_csv(kfac / "metrics.csv", index=False)
    timed = metrics[metrics.step > 10].step_time_s
    table = build_table(load_runs(tmp_path)).set_index(["kernel", "optimizer"])
    assert table.loc[("3x3", "K-FAC"), "step time (ms)"] == pytest.approx(1e3 * timed.mean())
    assert table.loc[("3x3", "K-FAC"), "increase over Adam (%)"] == pytest.approx(100 * (timed.mean() / 0.1 - 1))


def test_comparison_takes_step_time_from_the_benchmark_csv(tmp_path):
    """The runs say AdaCov steps 1.5x Adam's; the benchmark's CSV says its optimizer adds 0.3 of an Adam step at
    3x3, and has no 5x5 AdaCov row."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_run(runs, "adam", 3, seed, 0.100)
        make_run(runs, "adacov", 3, seed, 0.150, final_train_loss=0.8)
    make_run(runs, "adam", 5, 0, 0.100)
    make_run(runs, "adacov", 5, 0, 0.300)
    bench = tmp_path / "bench.csv"
    pd.DataFrame({"kernel_size": [3, 3, 5], "optimizer": ["adam", "adacov", "adam"], "overhead_per_adam_step": [0.0, 0.3, 0.0]}).to_csv(bench, index=False)
    assert plot_curves.main([str(runs), "--out", str(tmp_path / "out"), "--bench", str(bench)]) == 0
    table = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index(["kernel", "optimizer"])
    assert table.loc[("3x3", "AdaCov"), "step time vs Adam"] == pytest.approx(1.5)
    assert table.loc[("3x3", "AdaCov"), "step time vs Adam, bench"] == pytest.approx(1.3)
    assert table.loc[("3x3", "Adam"), "step time vs Adam, bench"] == pytest.approx(1.0)
    assert np.isnan(table.loc[("5x5", "AdaCov"), "step time vs Adam, bench"])
    steps = table["steps to target"]
    assert table.loc[("3x3", "AdaCov"), "time to target, bench (Adam steps)"] == pytest.approx(1.3 * steps[("3x3", "AdaCov")])
    assert table.loc[("3x3", "Adam"), "time to target, bench (Adam steps)"] == pytest.approx(steps[("3x3", "Adam")])
    assert str(bench) in (tmp_path / "out" / "comparison.md").read_text()
    assert (tmp_path / "out" / "cost.png").is_file()
    with pytest.raises(SystemExit):
        plot_curves.main([str(runs), "--out", str(tmp_path / "out"), "--bench", str(tmp_path / "none.csv")])


def test_final_losses_pair_runs_by_seed(tmp_path):
    """Paired differences by hand: fast vs exact AdaCov at seeds 0, 1, 2 and an unpaired seed 3."""
    for seed, (adam, exact, fast) in enumerate([(0.5, 0.20, 0.21), (0.4, 0.25, 0.24), (0.6, 0.10, 0.11)]):
        make_run(tmp_path, "adam", 3, seed, 0.1, final_train_loss=adam)
        make_run(tmp_path, "adacov", 3, seed, 0.1, final_train_loss=exact)
        make_run(tmp_path, "adacov_fast", 3, seed, 0.1, final_train_loss=fast)
    make_run(tmp_path, "adacov_fast", 3, 3, 0.1, final_train_loss=9.0)
    table = build_final_losses(load_runs(tmp_path)).set_index("optimizer")
    vs_exact = np.array([0.21 / 0.20, 0.24 / 0.25, 0.11 / 0.10]) * 100 - 100  # +5 %, -4 %, +10 %
    expected = f"{vs_exact.mean():+.1f} % ± {vs_exact.std(ddof=1) / np.sqrt(3):.1f} (3 seeds)"
    assert table.loc["AdaCov (fast)", "train loss vs AdaCov, same seed"] == expected
    assert table.loc["AdaCov (fast)", "seeds"] == 4
    vs_adam = np.array([0.20 / 0.5, 0.25 / 0.4, 0.10 / 0.6]) * 100 - 100
    assert table.loc["AdaCov", "train loss vs Adam, same seed"].startswith(f"{vs_adam.mean():+.1f} %")
    assert table.loc["AdaCov", "train loss vs AdaCov, same seed"] == ""
    assert table.loc["Adam", "train loss"] == f"{np.mean([0.5, 0.4, 0.6]):.4f} ± {np.std([0.5, 0.4, 0.6], ddof=1):.4f}"


def test_outputs_are_written(tmp_path, capsys):
    runs = tmp_path / "multirun"
    for optimizer in ("adam", "adacov"):
        for kernel in (3, 5):
            make_run(runs, optimizer, kernel, 0, 0.1 if optimizer == "adam" else 0.2)
    out = tmp_path / "out"
    assert plot_curves.main([str(runs), "--out", str(out)]) == 0
    for name in ("figure1.png", "figure1.pdf", "figure1_walltime.png", "table1.md", "table1.csv", "final_losses.md", "final_losses.csv"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "table1.md").read_text()
    assert "| 3x3" in markdown and "| 5x5" in markdown and "How it was measured" in markdown
    assert len(pd.read_csv(out / "table1.csv")) == 4


def test_a_run_that_diverged_in_its_first_epoch_is_counted_not_averaged(tmp_path):
    """MBF 5x5 seed 2 on Fashion-MNIST: 80 steps logged, then it diverged; no epoch row."""
    runs = tmp_path / "multirun"
    for seed in (0, 1):
        make_run(runs, "adam", 5, seed, 0.1, final_train_loss=0.5)
        make_run(runs, "mbf", 5, seed, 0.1, final_train_loss=0.3 + seed)
    diverged = make_run(runs, "mbf", 5, 2, 0.1)
    pd.read_csv(diverged / "metrics.csv").head(15).assign(loss=lambda d: d.loss * 1e12).to_csv(diverged / "metrics.csv", index=False)
    pd.read_csv(diverged / "epochs.csv").head(0).to_csv(diverged / "epochs.csv", index=False)

    finals = build_final_losses(load_runs(runs)).set_index("optimizer")
    assert finals.loc["MBF", "seeds"] == 2 and finals.loc["MBF", "stopped early"] == 1 and finals.loc["Adam", "stopped early"] == 0
    assert finals.loc["MBF", "train loss"] == f"{0.8:.4f} ± {np.std([0.3, 1.3], ddof=1):.4f}"
    assert build_table(load_runs(runs)).set_index("optimizer").loc["MBF", "runs"] == 3
    assert plot_curves.main([str(runs), "--out", str(tmp_path / "out")]) == 0


def test_missing_runs_dir_is_a_clean_error(tmp_path, capsys):
    for runs_dir, message in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no runs below")]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            plot_curves.main([str(runs_dir), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_truncated_metrics_and_mismatched_settings_warn_but_plot(tmp_path, capsys):
    make_run(tmp_path, "adam", 3, 0, 0.1)
    run = make_run(tmp_path, "adacov", 3, 0, 0.2, data="digits")
    with open(run / "metrics.csv", "a") as f:
        f.write("41,2.05,0.1")  # a torn last row
    with pytest.warns(UserWarning) as record:
        assert plot_curves.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    messages = " ".join(str(w.message) for w in record)
    assert "incomplete rows" in messages and "runs differ in data" in messages
    assert "runs differ in data" in (tmp_path / "out" / "table1.md").read_text()


def test_comparison_time_to_adams_final_loss_by_hand(tmp_path):
    """Loss 4 / step: its 20-step window mean first reaches Adam's final 1.0 at step 13 (4 H_s / s <= 1);
    an optimizer 2.0 above it never does."""
    for seed in (0, 1):
        make_run(tmp_path, "adam", 3, seed, 0.100, final_train_loss=1.0)
        make_run(tmp_path, "adacov", 3, seed, 0.150, final_train_loss=0.8)
    make_run(tmp_path, "mbf", 3, 0, 0.120, loss_offset=2.0, final_train_loss=2.5)
    from adacov.report import build_comparison

    table = build_comparison(load_runs(tmp_path)).set_index("optimizer")
    window = [np.mean(4.0 / np.arange(max(1, s - 19), s + 1)) for s in range(1, 41)]
    first = next(s for s, loss in zip(range(1, 41), window) if loss <= 1.0)
    assert first == 13
    adacov = table.loc["AdaCov"]
    assert adacov["target"] == 1.0 and adacov["steps to target"] == first and adacov["reached"] == "2/2"
    assert adacov["seconds to target"] == pytest.approx(0.150 * (10 * 10 + first - 10))  # 10 slow warm-up steps
    assert adacov["step time vs Adam"] == pytest.approx(1.5) and adacov["final train loss"] == pytest.approx(0.8)
    assert np.isnan(table.loc["MBF", "steps to target"]) and table.loc["MBF", "reached"] == "0/1"
    assert plot_curves.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "Adam's mean final-epoch train loss" in (tmp_path / "out" / "comparison.md").read_text()


def test_final_metrics_are_mean_and_std_over_seeds_by_hand(tmp_path):
    from adacov.report.comparison_figure import final_metrics

    for seed, loss in enumerate([0.2, 0.4]):
        make_run(tmp_path, "kfac", 5, seed, 0.1, final_train_loss=loss)
    make_run(tmp_path, "adam", 5, 0, 0.1, final_train_loss=0.9)
    table = final_metrics(load_runs(tmp_path)).set_index("optimizer")
    assert table.loc["kfac", "loss"] == pytest.approx(0.3) and table.loc["kfac", "loss_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert table.loc["kfac", "acc"] == pytest.approx(0.2) and table.loc["kfac", "seeds"] == 2
    assert table.loc["adam", "loss_std"] == 0.0 and table.loc["adam", "loss"] == 0.9


def test_the_ranking_counts_only_finished_seeds_and_says_how_many_stopped(tmp_path):
    """MBF: seed 0 finishes at 0.4, seed 1 stops after epoch 1 (3.5), seed 2 in its first epoch: its dot is seed 0's
    alone and its label says 2 of 3 stopped; SENG's only seed stopped: no dot, "all of 1"."""
    from adacov.report.comparison_figure import _ranked_label, final_metrics

    runs = [make_run(tmp_path, "mbf", 5, seed, 0.1, final_train_loss=0.4) for seed in (0, 1, 2)] + [make_run(tmp_path, "seng", 5, 0, 0.1)]
    epochs = pd.read_csv(runs[0] / "epochs.csv")
    epochs.iloc[:1].to_csv(runs[1] / "epochs.csv", index=False)
    for run in runs[2:]:
        epochs.iloc[:0].to_csv(run / "epochs.csv", index=False)
    table = final_metrics(load_runs(tmp_path)).set_index("optimizer")
    assert table.loc["mbf", "loss"] == 0.4 and table.loc["mbf", "acc"] == 0.2 and table.loc["mbf", "seeds"] == 1
    assert _ranked_label(table.reset_index().iloc[0]) == "MBF (2 of 3 stopped early)"
    assert np.isnan(table.loc["seng", "loss"]) and _ranked_label(table.reset_index().iloc[1]) == "SENG (all of 1 stopped early)"


def test_the_cost_plot_puts_each_method_at_its_bench_ratio_and_final_loss(tmp_path, monkeypatch):
    from adacov.report import comparison_figure

    table = pd.DataFrame({"kernel": ["3x3", "3x3", "5x5"], "optimizer": ["Adam", "AdaCov", "K-FAC"],
                          "final train loss": [0.4, 0.3, 0.35], "± std": [0.01, math.nan, 0.02],
                          "step time vs Adam, bench": [1.0, 1.5, 2.0]})  # fmt: skip
    drawn = []
    monkeypatch.setattr(comparison_figure, "_save", lambda fig, out, formats: drawn.append(
        [[(t.get_text(), t.xy) for t in ax.texts] for ax in fig.axes]) or [])  # fmt: skip
    comparison_figure.plot_cost(table, tmp_path / "cost")
    assert drawn == [[[("Adam", (1.0, 0.4)), ("AdaCov", (1.5, 0.3))], [("K-FAC", (2.0, 0.35))]]]


def test_the_cost_plot_draws_a_blown_up_method_at_its_top_edge(tmp_path, monkeypatch):
    """TKFAC's mean of 1637 would squash every other method into one line: the axis ends at twice Adam's loss, and
    TKFAC sits on that edge with its mean in its label."""
    from adacov.report import comparison_figure

    table = pd.DataFrame({"kernel": ["3x3"] * 3, "optimizer": ["Adam", "SOAP", "TKFAC"], "final train loss": [0.4, 0.3, 1637.0],
                          "± std": [0.01, 0.01, 2085.0], "step time vs Adam, bench": [1.0, 1.2, 1.7]})  # fmt: skip
    drawn = []
    monkeypatch.setattr(comparison_figure, "_save", lambda fig, out, formats: drawn.append(
        ([(t.get_text(), t.xy) for t in fig.axes[0].texts], fig.axes[0].get_ylim())) or [])  # fmt: skip
    comparison_figure.plot_cost(table, tmp_path / "cost")
    (texts, (_, top)), = drawn
    assert texts == [("Adam", (1.0, 0.4)), ("SOAP", (1.2, 0.3)), ("TKFAC (1.64e+03, off scale)", (1.7, 0.8))]
    assert top == pytest.approx(0.8)


def test_the_cost_plot_labels_coinciding_methods_once_and_stacks_the_off_scale_ones(tmp_path, monkeypatch):
    """Fashion-MNIST at 3x3: RS-KFAC and SRE-KFAC end on one point and share a label at the first one's point; the
    two KLD-WRMs above the axis share one too, and the off-scale labels go one line further down each, left to right;
    AdaCov keeps its own label wherever it is."""
    from adacov.report import comparison_figure

    rows = [("Adam", 0.4, 1.0), ("RS-KFAC", 0.52, 1.46), ("AdaCov", 0.52, 1.47), ("SRE-KFAC", 0.521, 1.43),
            ("TKFAC", 1637.0, 1.65), ("KLD-WRM (Q)", 0.987, 1.49), ("KLD-WRM (SO)", 0.987, 1.44), ("SENG", 2.35, 5.77)]
    table = pd.DataFrame({"kernel": "3x3", "optimizer": [r[0] for r in rows], "final train loss": [r[1] for r in rows],
                          "± std": 0.01, "step time vs Adam, bench": [r[2] for r in rows]})  # fmt: skip
    drawn = []
    monkeypatch.setattr(comparison_figure, "_save", lambda fig, out, formats: drawn.append(
        [(t.get_text(), t.xy, t.xyann) for t in fig.axes[0].texts]) or [])  # fmt: skip
    comparison_figure.plot_cost(table, tmp_path / "cost")
    assert drawn == [[
        ("Adam", (1.0, 0.4), (5, 3)), ("RS-KFAC, SRE-KFAC", (1.46, 0.52), (5, 3)), ("AdaCov", (1.47, 0.52), (5, 3)),
        ("KLD-WRM (Q), KLD-WRM (SO) (0.987, 0.987, off scale)", (1.49, 0.8), (5, -10)),
        ("TKFAC (1.64e+03, off scale)", (1.65, 0.8), (5, -20)), ("SENG (2.35, off scale)", (5.77, 0.8), (5, -30)),
    ]]  # fmt: skip


def test_a_comparison_draws_a_panel_per_family_and_a_ranking(tmp_path, monkeypatch):
    """More than 6 optimizers: small multiples with one column per family present, and the ranked dot plot."""
    from adacov.report import comparison_figure

    names = ["adam", "adacov", "adacov_fast", "eadam", "kfac", "ekfac", "soap"]
    for name in names:
        for seed in (0, 1):
            make_run(tmp_path / "runs", name, 3, seed, 0.1, final_train_loss=0.5)
    panels = []
    monkeypatch.setattr(comparison_figure, "_save", lambda fig, out, formats: panels.append([ax.get_title() for ax in fig.axes]) or [])
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    figure, walltime, ranking = panels
    assert figure == walltime == ["Adam-like and mini-block", "K-FAC family", "Kronecker peers"]
    assert len(ranking) == 2 and all(title.startswith("3x3 filters") for title in ranking)
    assert comparison_figure.family_of("tekfac") == "K-FAC family" and comparison_figure.family_of("adam") == "other"


def test_a_family_legend_names_members_run_at_one_kernel_size_only(tmp_path, monkeypatch):
    """EKFAC has 5x5 runs only: the K-FAC column's legend (on its top, 3x3, panel) still names it, in family order."""
    from adacov.report import comparison_figure

    for name in ["adam", "adacov", "adacov_fast", "eadam", "mbf", "kfac", "soap"]:
        for k in (3, 5):
            make_run(tmp_path / "runs", name, k, 0, 0.1, final_train_loss=0.5)
    make_run(tmp_path / "runs", "ekfac", 5, 0, 0.1, final_train_loss=0.5)
    legends = []
    monkeypatch.setattr(comparison_figure, "_save", lambda fig, out, formats: legends.append(
        {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()}) or [])  # fmt: skip
    assert plot_curves.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert legends[0]["K-FAC family"] == ["K-FAC", "EKFAC", "Adam (reference)", "AdaCov", "AdaCov (fast)"]


def test_every_optimizer_has_a_family_with_its_own_colours():
    """Each optimizer of the registry is drawn in a family panel (or as a subject or the reference), each family
    has a colour in the ranking, and no two members of a panel share a colour."""
    from adacov.optim.registry import OPTIMIZERS
    from adacov.report.comparison_figure import FAMILIES, FAMILY_COLORS, MEMBER_COLORS, REFERENCE, SUBJECTS

    placed = {name for members in FAMILIES.values() for name in members} | set(SUBJECTS) | {REFERENCE}
    assert set(OPTIMIZERS) - placed == set()
    assert set(FAMILY_COLORS) == set(FAMILIES)
    assert max(len(members) for members in FAMILIES.values()) <= len(set(MEMBER_COLORS))


def test_a_cpu_run_is_labelled_by_its_thread_count_not_by_older_text(tmp_path):
    """Runs logged before ``cpu_name`` said "1 thread" wrote "CPU (1 threads)": they read as "CPU (1 thread)", so
    titles read correctly and such runs compare with newer ones without a settings warning."""
    from adacov.report.runs import check_consistent

    for seed, name in enumerate(["CPU (1 threads)", "CPU (1 thread)"]):
        run = make_run(tmp_path, "adam", 3, seed, 0.1)
        info = json.loads((run / "environment.json").read_text())
        (run / "environment.json").write_text(json.dumps({**info, "device": "cpu", "torch_threads": 1, "device_name": name}))
    runs = load_runs(tmp_path)
    assert [r.info["device_name"] for r in runs] == ["CPU (1 thread)"] * 2 and check_consistent(runs) == []


def test_the_comparison_takes_finals_only_from_runs_that_logged_all_their_epochs(tmp_path):
    """K-FAC: seed 0 finishes at 0.5; seed 1 diverged after epoch 1 (3.5), counted as stopped early; seed 2 holds a
    checkpoint after epoch 1, still under way, and is left out (its epoch 1 is not its final epoch)."""
    from adacov.report import build_comparison

    for seed in (0, 1):
        make_run(tmp_path, "adam", 3, seed, 0.1, final_train_loss=1.0)
    make_run(tmp_path, "kfac", 3, 0, 0.1, final_train_loss=0.5)
    for seed, leftover in ((1, "diverged.txt"), (2, "checkpoint.pt")):
        run = make_run(tmp_path, "kfac", 3, seed, 0.1, final_train_loss=0.5)
        pd.read_csv(run / "epochs.csv").head(1).to_csv(run / "epochs.csv", index=False)
        (run / leftover).write_text("")
    with pytest.warns(UserWarning, match=r"kfac_k3_seed2: 1 of its 2 epochs and a checkpoint, still under way"):
        runs = load_runs(tmp_path)
    kfac = build_comparison(runs).set_index("optimizer").loc["K-FAC"]
    assert kfac["final train loss"] == 0.5 and kfac["seeds"] == 1 and kfac["stopped early"] == 1 and kfac["reached"] == "1/1"
