"""How far two data-parallel processes end from one process, in float32 and float64, per CPU kernel set.

For each optimizer and dtype, train.py trains the small test net (widths 4-4-8-8-8-8, CIFAR-shaped synthetic
data, batch 32, 16 steps, lr 3e-3) once in one process and once in two gloo processes with the same global
batch, under each kernel set this CPU has (torch, MKL and oneDNN switched together, as `make test-numerics`
does). Reports the largest weight difference and the largest relative loss difference: the measurements
behind the DDP tests' tolerances (docs/numerics.md).

    python benchmarks/ddp_rounding.py --out results/ddp_rounding_cpu.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from bench_report import machine_description, publish

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=64", "model.channels=[4,4,8,8,8,8]", "batch_size=32", "epochs=2"]
KERNEL_SETS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}
EXTRA = {"ekfac": ["optimizer.curvature_every=1", "optimizer.inverse_every=1", "optimizer.stat_decay=0.0"]}


def available_kernel_sets() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability().lower()
    return list(KERNEL_SETS)[: {"avx512": 3, "avx2": 2}.get(best, 1)]


def one_and_two_processes(work: Path, env: dict[str, str], args: list[str]) -> tuple[float, float]:
    """Max |weight difference| and max relative loss difference between a 1- and a 2-process run."""
    train = str(ROOT / "train.py")
    one = [sys.executable, train, *args, f"hydra.run.dir={work / 'one'}"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train, *args, f"hydra.run.dir={work / 'two'}"]
    for command in (one, two):
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
    a, b = (pd.read_csv(work / run / "metrics.csv").loss for run in ("one", "two"))
    wa, wb = (torch.load(work / run / "checkpoint.pt", weights_only=False)["model"] for run in ("one", "two"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa), float(((a - b).abs() / a.abs()).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "adacov", "mbf", "ekfac"])
    parser.add_argument("--kernel-sets", nargs="+", choices=list(KERNEL_SETS), help="default: every set this CPU has")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    lines = [
        f"Machine: {machine_description(torch.device('cpu'))}",
        "16 steps at lr 3e-3, batch 32 split over 2 gloo processes vs 1 process; EKFAC with one batch's curvature.",
        "",
        "| kernel set | optimizer | dtype | max weight difference | max relative loss difference |",
        "|---|---|---|---|---|",
    ]
    kernel_sets = args.kernel_sets or available_kernel_sets()
    for kernel_set, name, dtype in itertools.product(kernel_sets, args.optimizers, ["float32", "float64"]):
        env = {**os.environ, **KERNEL_SETS[kernel_set], "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
        run_args = [*SMALL, "device=cpu", f"optimizer={name}", "optimizer.lr=0.003", f"dtype={dtype}", *EXTRA.get(name, [])]
        with tempfile.TemporaryDirectory() as work:
            weights, losses = one_and_two_processes(Path(work), env, run_args)
        lines.append(f"| {kernel_set} | {name} | {dtype} | {weights:.1e} | {losses:.1e} |")
        print(lines[-1], flush=True)
    publish("\n".join(lines), args.out, "Data-parallel vs one process: rounding per CPU kernel set", "ddp_rounding.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
