"""The comparison table: final losses, time to a target train loss (AlgoPerf-style), step time and state size."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pandas as pd

from adacov.report.figure import NAMES, _ordered
from adacov.report.runs import Run
from adacov.report.table import run_step_time

NOTES = """\
Target: per kernel size, Adam's mean final-epoch train loss at its tuned lr (the paper's baseline), so
"time to target" is how long each optimizer takes to reach what Adam ends with (AlgoPerf sets its targets
from a baseline's result the same way). A run's train loss at a step is the mean of its last epoch's worth
of step losses (the same window as an epoch's train loss); the first step at which it is at or below the
target counts. Seconds are summed step times (zero_grad, forward, backward, optimizer step; no evaluation).
Steps and seconds are medians over the seeds that reach the target; "reached" counts them. Only runs that
logged all their epochs count ("seeds"); "stopped early" counts those that did not (a divergence). The step-time
ratio divides a run's mean step time after 10 warm-up steps (periodic work such as inverses and refreshes
included) by Adam's; the peak state is the largest optimizer state (its tensors' bytes) at the end of any
epoch. Both are medians over seeds; losses and accuracies are mean ± std."""


def epoch_window_loss(run: Run) -> pd.Series:
    """Per-step train loss averaged over the last ``steps_per_epoch`` steps (fewer at the start), indexed by step."""
    window = int(run.info["steps_per_epoch"])
    return run.metrics.set_index("step")["loss"].rolling(window, min_periods=1).mean()


def time_to_target(run: Run, target: float) -> tuple[float, float]:
    """Steps and summed step seconds until the epoch-window loss first reaches ``target`` (NaN if never)."""
    reached = epoch_window_loss(run).le(target)
    if not reached.any():
        return math.nan, math.nan
    step = int(reached.idxmax())
    seconds = float(run.metrics.loc[run.metrics.step <= step, "step_time_s"].sum())
    return float(step), seconds


def bench_ratios(bench: pd.DataFrame) -> dict[tuple[int, str], float]:
    """Each (kernel size, optimizer)'s step time over Adam's from ``benchmarks/optimizer_step.py --csv``: one plus
    its optimizer time over Adam's per Adam training step (all optimizers interleaved in one process)."""
    return {(int(r.kernel_size), r.optimizer): 1.0 + float(r.overhead_per_adam_step) for r in bench.itertuples()}


def build_comparison(runs: list[Run], bench: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (kernel size, optimizer), in the figures' order; empty if there is no Adam run to set targets.

    With ``bench`` (``benchmarks/optimizer_step.py --csv``), a column "step time vs Adam, bench" gives the ratios
    measured there next to the ones measured in the runs themselves, and "time to target, bench (Adam steps)" the
    steps to target times that ratio."""
    benched = bench_ratios(bench) if bench is not None else None
    rows = []
    for k in sorted({r.kernel_size for r in runs}):
        at_k = [r for r in runs if r.kernel_size == k]
        adam = [r for r in at_k if r.optimizer == "adam" and not r.stopped_early]
        if not adam:
            continue
        target = sum(float(r.epochs.train_loss.iloc[-1]) for r in adam) / len(adam)
        adam_step = pd.Series([run_step_time(r) for r in adam]).median()
        for name in _ordered({r.optimizer for r in at_k}):
            stopped = sum(r.stopped_early for r in at_k if r.optimizer == name)
            group = [r for r in at_k if r.optimizer == name and not r.stopped_early]
            finals = pd.Series([float(r.epochs.train_loss.iloc[-1]) for r in group], dtype=float)
            accuracies = pd.Series([float(r.epochs.test_acc.iloc[-1]) for r in group], dtype=float)
            times = pd.DataFrame([time_to_target(r, target) for r in group], columns=["steps", "seconds"]).dropna()
            rows.append({
                "kernel": f"{k}x{k}",
                "optimizer": NAMES.get(name, name),
                "seeds": len(group),
                "stopped early": stopped,
                "final train loss": finals.mean(),
                "± std": finals.std() if len(group) > 1 else math.nan,
                "test acc": accuracies.mean(),
                "acc ± std": accuracies.std() if len(group) > 1 else math.nan,
                "target": target,
                "steps to target": times.steps.median() if len(times) else math.nan,
                "seconds to target": times.seconds.median() if len(times) else math.nan,
                "reached": f"{len(times)}/{len(group)}",
                "step time vs Adam": pd.Series([run_step_time(r) for r in group], dtype=float).median() / adam_step,
                "peak state (MB)": pd.Series([float(r.epochs.optimizer_state_mb.max()) for r in group], dtype=float).median(),
            })  # fmt: skip
            if benched is not None:
                ratio = benched.get((k, name), math.nan)
                rows[-1]["step time vs Adam, bench"] = ratio
                rows[-1]["time to target, bench (Adam steps)"] = rows[-1]["steps to target"] * ratio
    return pd.DataFrame(rows)


WHOLE_NUMBERS = {"steps to target", "seconds to target", "time to target, bench (Adam steps)"}  # 1143, not 1.14e+03


def _cell(fmt: str, value: object) -> str:
    """A table cell: floats in ``fmt``, missing values as "-", anything else as it prints."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else format(value, fmt)
    return str(value)


BENCH_NOTE = """\
"Step time vs Adam, bench" comes from {where} (benchmarks/optimizer_step.py --csv, whose report says how it ran):
every optimizer trains its own copy of the net on the same synthetic batches, interleaved round by round in one
process, so that the machine's drift hits all alike; the ratio is one plus the optimizer's mean time over Adam's
per Adam training step, periodic work included. "Time to target, bench" is the steps to target times that ratio:
the time to reach the target in Adam's steps, at the benchmark's step costs; an optimizer is faster to the target
than Adam where it is below Adam's own steps to target. The other time columns were measured inside the runs above."""


def comparison_markdown(table: pd.DataFrame, header: str, bench_csv: Path | None = None) -> str:
    if table.empty:
        return f"# Comparison\n\n{header}\n\nNo Adam runs: there is no target to compare against.\n"
    shown = table.apply(lambda column: column.map(partial(_cell, ".0f" if column.name in WHOLE_NUMBERS else ".3g")))
    align = ["left" if column in ("kernel", "optimizer") else "right" for column in shown.columns]
    body = shown.to_markdown(index=False, disable_numparse=True, colalign=align)
    notes = NOTES + ("\n\n" + BENCH_NOTE.format(where=f"`{bench_csv}`") if bench_csv is not None else "")
    return f"# Comparison\n\n{header}\n\n{body}\n\n{notes}\n"
