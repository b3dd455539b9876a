"""Pick each optimizer's learning rate from an ``experiment=tune`` sweep.

    python tune_report.py results/tune/runs --out results/tune

Writes tune.md (every grid point's mean final train loss, the best lr per optimizer and kernel size),
tune.csv (one row per run), best_lr.csv, tune.png, and prints the ``tuned:`` block for each
configs/optimizer/<name>.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adacov.cli import exit_on_run_error
from adacov.report.tuning import (
    best_learning_rates,
    config_snippets,
    load_trials,
    plot_tuning,
    summarize,
    tuning_markdown,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Best learning rate per optimizer and kernel size from experiment=tune.")
    parser.add_argument("runs_dir", type=Path, help="the directory experiment=tune wrote its runs into")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    args = parser.parse_args(argv)
    with exit_on_run_error():
        trials = load_trials(args.runs_dir)
        summary = summarize(trials)
        best = best_learning_rates(summary)
        args.out.mkdir(parents=True, exist_ok=True)
        trials.sort_values(["optimizer", "k", "lr", "seed"]).to_csv(args.out / "tune.csv", index=False)
        best.to_csv(args.out / "best_lr.csv", index=False)
        header = (
            f"Runs: {len(trials)} from `{args.runs_dir}` ({trials.diverged.sum()} diverged); "
            f"{trials.seed.nunique()} seeds per learning rate. Command: `python tune_report.py {args.runs_dir} --out {args.out}`."
        )
        (args.out / "tune.md").write_text(tuning_markdown(summary, best, header))
        plot_tuning(summary, args.out / "tune")
        print(config_snippets(best))
        print(f"wrote tune.md, tune.csv, best_lr.csv, tune.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
