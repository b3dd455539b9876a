"""Where AdaCov's optimizer step spends its time, by the regions AdaCov marks for torch.profiler.

On the paper-width 6-conv net (CPU), with the gradients of one batch: exact AdaCov's step, and fast
AdaCov's refresh step and cached step (``basis_refresh_every=10``, ``basis_refresh_warmup=0``: steps
11, 21, 31 refresh; steps 12, 13, 14 use the cached basis). Of 3 profiled steps, the one with the
median whole-step time is reported. Each
region's time includes the operators inside it; the rest of the step (the Adam rule for biases and
the linear layer, bookkeeping) is the remainder.

    python benchmarks/profile_step.py --out results/profile_step_cpu.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from adacov import AdaCov
from bench_report import machine_description, publish
from models import ConvNet6

REGIONS = ("adacov::covariance_update", "adacov::eigh", "adacov::apply_inverse_root", "adacov::store_basis", "adacov::cached_basis_step")
REPEATS = 3
STEP_REGION = "Optimizer.step#AdaCov.step"


def profiled_ms(optimizer: AdaCov, every: int = 1) -> dict[str, float]:
    """Milliseconds of ``optimizer.step()`` and of each AdaCov region inside it, for the median (by whole
    step) of REPEATS steps profiled ``every`` steps apart (the steps between run unprofiled)."""
    samples = []
    for _ in range(REPEATS):
        for _ in range(every - 1):
            optimizer.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer.step()
        samples.append({event.key: event.cpu_time_total / 1e3 for event in prof.key_averages()})
    middle = sorted(samples, key=lambda s: s[STEP_REGION])[REPEATS // 2]  # one whole step, so its parts add up
    return {name: middle.get(name, 0.0) for name in (STEP_REGION, *REGIONS)}


def profile_kernel_size(kernel_size: int, batch: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = ConvNet6(kernel_size=kernel_size)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    nn.functional.cross_entropy(model(x), y).backward()
    exact = AdaCov(model.parameters())
    for _ in range(2):
        exact.step()
    found = {"exact": profiled_ms(exact)}
    refreshing = AdaCov(model.parameters(), basis_refresh_every=10, basis_refresh_warmup=0)
    refreshing.step()
    found["fast, refresh step"] = profiled_ms(refreshing, every=10)  # steps 11, 21, 31 refresh
    cached = AdaCov(model.parameters(), basis_refresh_every=10, basis_refresh_warmup=0)
    for _ in range(11):
        cached.step()
    found["fast, cached step"] = profiled_ms(cached)  # steps 12, 13, 14
    return found


def report(results: dict[int, dict[str, dict[str, float]]], batch: int) -> str:
    lines = [
        f"Machine: {machine_description(torch.device('cpu'))}",
        f"Net: ConvNet6 widths 32-32-64-64-128-128, gradients of one batch of {batch}; of {REPEATS} profiled steps, "
        "the one with the median whole-step time. Fast: basis_refresh_every=10, basis_refresh_warmup=0.",
        "",
        "| kernel | step | whole step (ms) | " + " | ".join(f"`{r}` (ms)" for r in REGIONS) + " | rest (ms) |",
        "|---|---|---|" + "---|" * (len(REGIONS) + 1),
    ]
    for k, modes in results.items():
        for mode, ms in modes.items():
            rest = ms[STEP_REGION] - sum(ms[r] for r in REGIONS)
            cells = " | ".join(f"{ms[r]:.1f}" for r in REGIONS)
            lines.append(f"| {k}x{k} | {mode} | {ms[STEP_REGION]:.1f} | {cells} | {rest:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    results = {k: profile_kernel_size(k, args.batch) for k in args.kernel_sizes}
    publish(report(results, args.batch), args.out, "Where AdaCov's step spends its time", "profile_step.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
