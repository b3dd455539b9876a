"""Pick each optimizer's learning rate from an ``experiment=tune`` sweep.

    python tune_report.py results/tune/runs --out results/tune

Writes tune.md (every grid point's mean final train loss, the best lr per optimizer and kernel size),
tune.csv (one row per run), best_lr.csv, tune.png, and prints the ``tuned:`` block for each
configs/optimizer/<name>.yaml. With ``--extensions`` it prints only the Hydra overrides that add a grid
point beyond each best lr on an edge, or below a grid where nothing trained (``--classes``; sweeps placed by
``lr_step``; make tune DATA=fashion_mnist runs them).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from adacov.cli import exit_on_run_error
from adacov.report.tuning import (
    best_learning_rates,
    config_snippets,
    edge_extensions,
    load_trials,
    plot_tuning,
    summarize,
    tuning_markdown,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Best learning rate per optimizer and kernel size from experiment=tune.")
    parser.add_argument("runs_dir", type=Path, help="the directory experiment=tune wrote its runs into")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    parser.add_argument("--extensions", action="store_true", help="print the overrides that extend edge grids, and nothing else")
    parser.add_argument("--classes", type=int, help="with --extensions: the task's classes; a grid whose best loss is "
                        "still at or above ln(classes), a uniform prediction's, extends downwards")
    args = parser.parse_args(argv)
    if args.classes is not None and args.classes < 2:
        parser.error(f"--classes {args.classes}: a classification task has at least 2 classes")
    with exit_on_run_error():
        trials = load_trials(args.runs_dir)
        summary = summarize(trials)
        best = best_learning_rates(summary)
        if args.extensions:
            untrained = math.log(args.classes) if args.classes else math.inf
            print("\n".join(edge_extensions(trials, best, untrained_loss=untrained)))
            return 0
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
