"""Training-step and optimizer-step time of each optimizer against torch.optim.Adam (foreach).

All optimizers train their own copy of the paper-style 6-conv net on one fixed CIFAR-shaped batch,
interleaved round by round in one process (so machine noise hits them alike). Each round times
one full training step (zero_grad, forward, backward, optimizer step) and, inside it, the optimizer
step alone. Reports the median and the mean over rounds after a warm-up (the mean includes the
periodic eigendecompositions of fast AdaCov; the median hides them), the ratio to Adam, the extra
optimizer time per Adam step (free of the forward/backward noise), and the optimizer state's size.

    python benchmarks/optimizer_step.py --kernel-sizes 3 5 --rounds 15 --out results/optimizer_step_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from adacov.optim.registry import OPTIMIZERS as REGISTRY
from adacov.training.loop import backward, optimizer_state_bytes
from bench_report import machine_description, publish
from models import ConvNet6

# The K-FAC family as its configs set it: curvature and inverses every 10 steps, KL clipping.
_KRONECKER = dict(lr=1e-2, curvature_every=10, inverse_every=10, kl_clip=1e-3)
SETTINGS: dict[str, dict] = {  # each optimizer's settings here; its class and param groups come from the registry
    "adam": dict(lr=1e-3, foreach=True),
    "adacov": dict(lr=1e-3),
    "adacov_fast": dict(lr=1e-3, basis_refresh_every=10, basis_refresh_warmup=0),
    "eadam": dict(lr=1e-3),
    "mbf": dict(lr=3e-3, weight_decay=0.1),
    "kfac": dict(_KRONECKER, damping=1e-3),
    "ekfac": dict(_KRONECKER, damping=1e-2),
    "tkfac": dict(_KRONECKER, damping=1e-3),
    "tekfac": dict(_KRONECKER, damping=1e-2),
    "soap": dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.0, precondition_frequency=10),
    "shampoo": dict(lr=1e-3, start_preconditioning_step=25, preconditioning_compute_steps=10, graft_type=3),
    "kron": dict(lr=1e-3),
    "adahessian": dict(lr=0.15),
    "sophia": dict(lr=0.06, update_period=10),
}
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    name: partial(REGISTRY[name].build, **settings) for name, settings in SETTINGS.items()
}
CREATE_GRAPH = {name for name in SETTINGS if REGISTRY[name].create_graph}  # Hutchinson's products need the graph
DEFAULT = ["adam", "adacov", "adacov_fast", "mbf"]


class Timer:
    """Wall time of a code region: perf_counter on CPU, CUDA events (one sync per round) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


def time_kernel_size(kernel_size: int, names: list[str], rounds: int, warmup: int, batch: int, device: torch.device):
    """Median training-step and optimizer-step seconds for each optimizer name."""
    torch.manual_seed(0)
    template = ConvNet6(kernel_size=kernel_size).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    runs = {}
    for name in names:
        model = ConvNet6(kernel_size=kernel_size).to(device)
        model.load_state_dict(template.state_dict())
        runs[name] = (model, OPTIMIZERS[name](model))
    timer = Timer(device)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            model, optimizer = runs[name]
            t0 = timer.start()
            optimizer.zero_grad(set_to_none=True)
            backward(nn.functional.cross_entropy(model(x), y), create_graph=name in CREATE_GRAPH)
            t1 = timer.start()
            optimizer.step()
            t2 = timer.start()
            if r >= warmup:
                samples[name][0].append(timer.seconds(t0, t2))
                samples[name][1].append(timer.seconds(t1, t2))
    return {
        name: (statistics.median(a), statistics.mean(a), statistics.median(b), statistics.mean(b), optimizer_state_bytes(runs[name][1]) / 2**20)
        for name, (a, b) in samples.items()
    }


def report(results: dict[int, dict[str, tuple]], args: argparse.Namespace, device: torch.device) -> str:
    lines = [
        f"Machine: {machine_description(device)}",
        f"Net: ConvNet6 widths 32-32-64-64-128-128, batch {args.batch}, CIFAR-shaped input; "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds. adacov_fast = "
        "AdaCov(basis_refresh_every=10, basis_refresh_warmup=0); the K-FAC family with curvature and inverses "
        "every 10 steps (benchmarks/kfac_cost.py splits their cost); the others as their configs set them.",
        "",
        "| kernel | optimizer | train step median (ms) | vs Adam | train step mean (ms) | vs Adam "
        "| optimizer step median (ms) | optimizer step mean (ms) | optimizer time over Adam's, per Adam step "
        "| state (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, per_opt in results.items():
        base_median, base_mean, _, base_opt_mean, _ = per_opt["adam"]
        for name, (median, mean, opt_median, opt_mean, state) in per_opt.items():
            lines.append(
                f"| {k}x{k} | {name} | {median * 1e3:.1f} | {100 * (median / base_median - 1):+.1f} % "
                f"| {mean * 1e3:.1f} | {100 * (mean / base_mean - 1):+.1f} % | {opt_median * 1e3:.1f} "
                f"| {opt_mean * 1e3:.1f} | {100 * (opt_mean - base_opt_mean) / base_mean:+.1f} % | {state:.1f} |"
            )
    lines += [
        "",
        "The forward and backward passes are the same for every optimizer, so the next-to-last column, the",
        "mean optimizer-step time above Adam's divided by Adam's mean training step, is the overhead free of",
        "their noise. Means include fast AdaCov's periodic eigendecompositions; medians hide them.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT, choices=list(OPTIMIZERS), help=f"default: {' '.join(DEFAULT)}")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    names = ["adam"] + [n for n in args.optimizers if n != "adam"]
    device = torch.device(args.device)
    results = {k: time_kernel_size(k, names, args.rounds, args.warmup, args.batch, device) for k in args.kernel_sizes}
    publish(report(results, args, device), args.out, "Optimizer step time", "optimizer_step.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
