"""The report of the methods around the optimizer (docs/loop-methods.md) from an experiment=loop_methods_* sweep.

    python loop_methods_report.py results/loop_methods/digits/runs --out results/loop_methods/digits --measure

Writes loop_methods.md (SALR on/off, the data orders, the best lr per batch size and its scaling exponent),
runs.csv (one row per run), batch_best_lr.csv and loop_methods.png. With ``--measure`` it first measures the
sharpness at the end of each SALR / order run that has a checkpoint and no sharpness.json yet (seconds per
run on the digits); without it, it only reads what the runs recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adacov.cli import exit_on_run_error
from adacov.report.loop_methods import (
    batch_table,
    load_runs,
    measure_missing,
    plot_report,
    report_markdown,
    scaling_exponents,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="SALR, data orders and batch-size lr scaling from experiment=loop_methods_*."
    )
    parser.add_argument("runs_dir", type=Path, help="the directory the loop_methods sweeps wrote their runs into")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    parser.add_argument(
        "--measure", action="store_true", help="measure the final sharpness of runs that lack sharpness.json"
    )
    parser.add_argument(
        "--images", type=int, default=2048, help="training images the sharpness is measured on (default 2048)"
    )
    parser.add_argument(
        "--classes", type=int, default=10, help="the task's classes (default 10, the digits' and Fashion-MNIST's): "
        "a batch size whose best final loss is near ln(classes), a uniform prediction's, trained at no lr"
    )
    args = parser.parse_args(argv)
    if args.classes < 2:
        parser.error(f"--classes {args.classes}: a classification task has at least 2 classes")
    with exit_on_run_error():
        runs = load_runs(args.runs_dir)
        if args.measure:
            measured = measure_missing(runs, args.images)
            print(f"measured the sharpness of {len(measured)} runs")
            runs = load_runs(args.runs_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        runs.drop(columns=["path"]).to_csv(args.out / "runs.csv", index=False)
        batch = batch_table(runs, args.classes)
        batch.drop(columns=["losses"], errors="ignore").to_csv(args.out / "batch_best_lr.csv", index=False)
        machines = ", ".join(sorted(set(runs.device))) or "unknown"
        header = (
            f"# Methods around the optimizer: {args.runs_dir}\n\n"
            f"Runs: {len(runs)} ({int(runs.diverged.sum())} diverged) on {machines}. "
            f"Command: `python loop_methods_report.py {args.runs_dir} --out {args.out}`."
        )
        (args.out / "loop_methods.md").write_text(report_markdown(runs, batch, header))
        plot_report(runs, batch, args.out / "loop_methods")
        exponents = scaling_exponents(batch) if not batch.empty else batch
        if not exponents.empty:
            print(exponents.to_string(index=False))
        print(f"wrote loop_methods.md, runs.csv, batch_best_lr.csv, loop_methods.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
