"""Final-epoch losses per (kernel size, optimizer), and paired differences between optimizers.

Training from the same seed gives two optimizers the same initial weights and the same batches, so
the difference of their final losses is taken seed by seed: for seed ``s``,
``d_s = 100 (L_s / L_s^ref - 1)`` in percent, reported as mean ± standard error over seeds
(``std(d) / sqrt(n)``), against Adam and against exact AdaCov when those runs are present.
"""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from adacov.report.figure import NAMES, _ordered
from adacov.report.runs import Run

REFERENCES = ("adam", "adacov")

NOTES = """\
Final epoch: the last row of each run's epochs.csv - train loss is the mean training loss over that
epoch's steps, test loss and accuracy are measured after it. Cells are mean ± std over the seeds that
finished an epoch; "stopped early" counts the runs that ended before their last epoch (a divergence,
or a sweep still under way: a run's train.log ends with the error where it stopped, its metrics.csv with
the steps before it). The
"vs" columns pair runs by seed (same initial weights, same batches): per seed the relative
difference of final train loss in percent, then mean ± standard error over the seeds both have."""


def final_rows(runs: list[Run]) -> pd.DataFrame:
    """One row per run with a logged epoch: kernel size, optimizer, seed, final epoch's metrics."""
    rows = [
        {"k": r.kernel_size, "optimizer": r.optimizer, "seed": r.info.get("seed"), "epoch": int(r.epochs.epoch.iloc[-1]),
         "train_loss": r.epochs.train_loss.iloc[-1], "test_loss": r.epochs.test_loss.iloc[-1], "test_acc": r.epochs.test_acc.iloc[-1]}
        for r in runs
        if not r.epochs.empty and "train_loss" in r.epochs
    ]
    return pd.DataFrame(rows, columns=["k", "optimizer", "seed", "epoch", "train_loss", "test_loss", "test_acc"])


def paired_difference(runs: pd.DataFrame, reference: pd.DataFrame) -> tuple[float, float, int]:
    """Mean and standard error (percent) of ``100 (L / L_ref - 1)`` over the seeds of both, and their count."""
    pairs = runs.set_index("seed").train_loss.to_frame("loss").join(reference.set_index("seed").train_loss.rename("ref"), how="inner")
    d = 100 * (pairs.loss / pairs.ref - 1)
    if d.empty:
        return float("nan"), float("nan"), 0
    se = d.std() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(se), len(d)


def _mean_std(values: pd.Series, digits: int) -> str:
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def build_final_losses(runs: list[Run]) -> pd.DataFrame:
    """One row per (kernel size, optimizer), Adam first: final losses and the paired differences."""
    finals = final_rows(runs)
    stopped = Counter((r.kernel_size, r.optimizer) for r in runs if r.stopped_early)
    rows = []
    for k in sorted(finals.k.unique()):
        at_k = finals[finals.k == k]
        for name in _ordered(at_k.optimizer.unique()):
            group = at_k[at_k.optimizer == name]
            row = {
                "kernel": f"{k}x{k}",
                "optimizer": NAMES.get(name, name),
                "seeds": len(group),
                "stopped early": stopped[(k, name)],
                "epoch": int(group.epoch.max()),
                "train loss": _mean_std(group.train_loss, 4),
                "test loss": _mean_std(group.test_loss, 4),
                "test acc": _mean_std(group.test_acc, 3),
            }
            for ref in REFERENCES:
                mean, se, n = paired_difference(group, at_k[at_k.optimizer == ref])
                cell = "" if name == ref or n == 0 else f"{mean:+.1f} %" + (f" ± {se:.1f} ({n} seeds)" if n > 1 else " (1 seed)")
                row[f"train loss vs {NAMES[ref]}, same seed"] = cell
            rows.append(row)
    return pd.DataFrame(rows)


def final_losses_markdown(table: pd.DataFrame, header: str) -> str:
    body = table.to_markdown(index=False) if not table.empty else "No run has finished an epoch."
    return f"# Final-epoch losses\n\n{header}\n\n{body}\n\n{NOTES}\n"
