"""Rebuild the paper's Figure 1 and Table 1 from logged runs.

    python plot_curves.py RUNS_DIR --out OUT_DIR
    python plot_curves.py --from-wandb ENTITY/PROJECT --out OUT_DIR
    python plot_curves.py RUNS_DIR --out OUT_DIR --bench BENCH_CSV

Writes figure1.png, figure1.pdf, figure1_walltime.png, table1.md/.csv, final_losses.md/.csv and,
when Adam runs are among them, comparison.md/.csv (time to Adam's final loss; with --bench, also the step
time vs Adam from benchmarks/optimizer_step.py --csv) into OUT_DIR. A comparison of more than 6 optimizers
gets small multiples by family (figure1*) and a ranked dot plot (ranking.png/.pdf).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from adacov.cli import exit_on_run_error
from adacov.errors import UserError
from adacov.report import (
    build_comparison,
    build_final_losses,
    build_table,
    comparison_markdown,
    final_losses_markdown,
    load_runs,
    plot_figure,
    table_markdown,
)
from adacov.report.comparison_figure import plot_comparison, plot_cost, plot_ranking
from adacov.report.figure import CROWDED
from adacov.report.runs import check_consistent, runs_from_wandb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Figure 1 and Table 1 from train.py runs.")
    parser.add_argument("runs_dir", nargs="?", type=Path, help="directory searched for run directories")
    parser.add_argument("--out", type=Path, required=True, help="where the figures and tables go")
    parser.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead (online)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps (paper: 10)")
    parser.add_argument(
        "--bench", type=Path, metavar="BENCH_CSV", help="benchmarks/optimizer_step.py --csv output: adds its step time vs Adam"
    )
    args = parser.parse_args(argv)
    with exit_on_run_error(), tempfile.TemporaryDirectory() as tmp:
        if args.from_wandb:
            runs = load_runs(runs_from_wandb(args.from_wandb, Path(tmp)))
        elif args.runs_dir is None:
            raise UserError("give RUNS_DIR or --from-wandb ENTITY/PROJECT")
        else:
            runs = load_runs(args.runs_dir)
        write_outputs(runs, args.out, args.window, args.bench)
    return 0


def read_bench(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"--bench {path}: no such file; make bench writes it (benchmarks/optimizer_step.py --csv)")
    return pd.read_csv(path)


def write_outputs(runs, out: Path, window: int, bench_csv: Path | None = None) -> None:
    problems = check_consistent(runs)
    for problem in problems:
        warnings.warn(f"{problem}: compare with care")
    out.mkdir(parents=True, exist_ok=True)
    first = runs[0].info
    setting = f"{first.get('data')}, batch {first.get('batch_size')}, {first.get('device_name')}"
    if problems:
        setting += " (settings differ between runs, see table notes)"
    if len({r.optimizer for r in runs}) > CROWDED:
        plot_comparison(runs, out / "figure1", "epoch", window, ("png", "pdf"), title=f"Training loss - {setting}")
        plot_comparison(runs, out / "figure1_walltime", "time", window, ("png",), title=f"Training loss vs time - {setting}")
        plot_ranking(runs, out / "ranking", ("png", "pdf"), title=f"Final train loss and test accuracy - {setting}")
    else:
        plot_figure(runs, out / "figure1", "epoch", window, ("png", "pdf"), title=f"Training loss - {setting}")
        plot_figure(runs, out / "figure1_walltime", "time", window, ("png",), title=f"Training loss vs time - {setting}")
    table = build_table(runs)
    table.to_csv(out / "table1.csv", index=False)
    header = f"Runs: {len(runs)} from `{runs[0].path.parent}`; data {first.get('data')}, batch {first.get('batch_size')}."
    if problems:
        header += "\n\nWarning: " + "; ".join(problems) + "."
    (out / "table1.md").write_text(table_markdown(table, header))
    finals = build_final_losses(runs)
    finals.to_csv(out / "final_losses.csv", index=False)
    (out / "final_losses.md").write_text(final_losses_markdown(finals, header))
    written = "table1.md/.csv, final_losses.md/.csv"
    comparison = build_comparison(runs, read_bench(bench_csv) if bench_csv else None)
    if not comparison.empty:
        comparison.to_csv(out / "comparison.csv", index=False)
        (out / "comparison.md").write_text(comparison_markdown(comparison, header, bench_csv))
        written += ", comparison.md/.csv"
        if bench_csv:
            plot_cost(comparison, out / "cost", ("png",), title=f"What each method gains and costs - {setting}")
            written += ", cost.png"
    print(f"wrote {', '.join(p.name for p in sorted([*out.glob('figure1*'), *out.glob('ranking*')]))}, {written} to {out}")


if __name__ == "__main__":
    warnings.simplefilter("always")
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    sys.exit(main())
