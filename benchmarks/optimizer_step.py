"""Training-step and optimizer-step time of each optimizer against torch.optim.Adam (foreach).

All optimizers train their own copy of the paper-style 6-conv net on CIFAR-shaped synthetic batches (a new
batch each round, the same for every optimizer), interleaved round by round in one process (so machine noise
hits them alike). Each round times one full training step (zero_grad, forward, backward, optimizer step) and,
inside it, the optimizer step alone. Reports the median and the mean over rounds after a warm-up (the mean
includes the eigendecompositions of fast AdaCov; the median hides them), the ratio to Adam, the extra
optimizer time per Adam step (free of the forward/backward noise), the optimizer state's size, and for fast
AdaCov the share of its kernels decomposed per step. Then AdaCov's optimizer overhead per rank with 1 and
with 2 gloo ranks (``ddp_step.py``), and the issue-23 goals against both.

    python benchmarks/optimizer_step.py --kernel-sizes 3 5 --rounds 15 --out results/optimizer_step_cpu.md
    python benchmarks/optimizer_step.py --widths 16 16 32 32 64 64 --in-channels 1 --classes 10  # Fashion-MNIST's net

``--csv PATH`` also writes one row per (kernel size, optimizer), which ``plot_curves.py --bench`` puts into a
comparison table as its step time vs Adam.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import ddp_step
from adacov.data import make_synthetic
from adacov.optim.registry import OPTIMIZERS as REGISTRY
from adacov.training.loop import backward, optimizer_state_bytes
from bench_report import machine_description, publish
from decomposition_counter import DecompositionCounter
from models import ConvNet6

# The K-FAC family as its configs set it: curvature and inverses every 10 steps, KL clipping.
_KRONECKER = dict(lr=1e-2, curvature_every=10, inverse_every=10, kl_clip=1e-3)
SETTINGS: dict[str, dict] = {  # each optimizer's settings here; its class and param groups come from the registry
    "adam": dict(lr=1e-3, foreach=True),
    "adacov": dict(lr=1e-3),
    "adacov_fast": dict(lr=1e-3, basis_refresh_warmup=0),  # the registry's refresh settings, from the first step
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
    "sgd": dict(lr=1e-1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    # Issue 24's methods and the whitening of issue 25, as their configs set them (docs/kfac.md, docs/whitening.md).
    "rs_kfac": dict(_KRONECKER),
    "sre_kfac": dict(_KRONECKER),
    "b_kfac": dict(_KRONECKER),
    "b_r_kfac": dict(_KRONECKER, brand_refresh_every=5),
    "b_kfac_c": dict(_KRONECKER, brand_correction=0.2),
    "kld_wrm_so": dict(_KRONECKER, damping=1e-3, form="so"),
    "kld_wrm_q": dict(_KRONECKER, damping=1e-3, form="q"),
    "seng": dict(lr=1e-4, damping=1e-3, update_freq=1, kl_clip=1e-3),
    "whitening": dict(lr=3e-3, curvature_every=10, inverse_every=10),
    "whitening_recursive": dict(lr=1e-1, curvature_every=10, inverse_every=1, recursive=True),
}
# Fast AdaCov's other refresh rules, timed beside its default in the same run (issue 23 picks the default by this
# cost and by the direction quality of fast_adacov_direction.py): the settings over adacov_fast's.
FAST_RULES: dict[str, dict] = {
    "adacov_fast_t10": dict(basis_refresh_every=10, basis_drift_threshold=0.0),  # each kernel every 10 steps, unchecked
    "adacov_fast_t10_drift": dict(basis_refresh_every=10, basis_drift_threshold=0.2),
    "adacov_fast_t5_drift": dict(basis_refresh_every=5, basis_drift_threshold=0.2),  # the default before the T=50 cycle
    "adacov_fast_compiled": dict(compile_step=True),  # the default rule, its cached step compiled (needs a C++ compiler)
}
SETTINGS |= {name: SETTINGS["adacov_fast"] | rule for name, rule in FAST_RULES.items()}
ENTRY = {name: "adacov_fast" if name in FAST_RULES else name for name in SETTINGS}  # each name's registry entry
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    name: partial(REGISTRY[ENTRY[name]].build, **settings) for name, settings in SETTINGS.items()
}
CREATE_GRAPH = {name for name in SETTINGS if REGISTRY[ENTRY[name]].create_graph}  # Hutchinson's products need the graph
DEFAULT = ["adam", "adacov", "adacov_fast", "mbf"]
# Issue 23's goals: fast AdaCov's optimizer time over Adam's per Adam step, per kernel size, and exact AdaCov's
# per-rank overhead with 2 ranks over its overhead in one process.
FAST_GOALS = {3: 0.05, 5: 0.12}
DDP_GOAL = 0.6
# Untimed steps per rank first: a rank's first steps are slower (buffers of the shared work and the gathered
# results are first allocated, gloo's first collectives), and the covariances reach full rank after d gradients
# (25 at 5x5): the cost of eigh depends on the spectrum, and a C of low rank is not the one training decomposes.
DDP_WARMUP = 25


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](model)


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


def net(kernel_size: int, args: argparse.Namespace) -> ConvNet6:
    return ConvNet6(kernel_size=kernel_size, channels=args.widths, in_channels=args.in_channels, num_classes=args.classes)


def time_kernel_size(kernel_size: int, names: list[str], args: argparse.Namespace, device: torch.device) -> dict:
    """Per optimizer name: median and mean training-step and optimizer-step seconds, state MB, and the share of
    kernels decomposed per timed step (AdaCov; None for the others)."""
    torch.manual_seed(0)
    template = net(kernel_size, args).to(device)
    rounds = args.warmup + args.rounds
    data = make_synthetic(train_size=rounds * args.batch, test_size=1, num_classes=args.classes, channels=args.in_channels, seed=0)
    mean, std = data.normalizer()
    inputs = [((x.float() / 255 - mean) / std, y) for x, y in data.train_batches(args.batch, torch.Generator().manual_seed(0))]
    runs = {}
    for name in names:
        model = net(kernel_size, args).to(device)
        model.load_state_dict(template.state_dict())
        runs[name] = (model, OPTIMIZERS[name](model))
    kernels = sum(p[:, :, 0, 0].numel() for p in template.parameters() if p.dim() == 4 and p[0, 0].numel() > 1)
    timer = Timer(device)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    decomposed = dict.fromkeys(names, 0)
    for r, (x, y) in enumerate(inputs):
        x, y = x.to(device), y.to(device)
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            model, optimizer = runs[name]
            t0 = timer.start()
            optimizer.zero_grad(set_to_none=True)
            backward(nn.functional.cross_entropy(model(x), y), create_graph=name in CREATE_GRAPH)
            t1 = timer.start()
            with DecompositionCounter() as counter:
                optimizer.step()
            t2 = timer.start()
            if r >= args.warmup:
                samples[name][0].append(timer.seconds(t0, t2))
                samples[name][1].append(timer.seconds(t1, t2))
                decomposed[name] += counter.blocks
    return {
        name: (statistics.median(a), statistics.mean(a), statistics.median(b), statistics.mean(b),
               optimizer_state_bytes(runs[name][1]) / 2**20,
               decomposed[name] / (kernels * args.rounds) if name.startswith("adacov") else None)
        for name, (a, b) in samples.items()
    }  # fmt: skip


def overheads(results: dict[int, dict[str, tuple]]) -> dict[tuple[int, str], float]:
    """Per (kernel size, optimizer): its mean optimizer-step time above Adam's over Adam's mean training step, the
    overhead free of the forward and backward passes' noise."""
    return {
        (k, name): (found[3] - per_opt["adam"][3]) / per_opt["adam"][1] for k, per_opt in results.items() for name, found in per_opt.items()
    }


def step_table(results: dict[int, dict[str, tuple]]) -> pd.DataFrame:
    """The timings as rows: step means and medians (ms), and the optimizer's overhead per Adam training step as a
    fraction (the report's noise-free column), per kernel size and optimizer."""
    overhead = overheads(results)
    rows = [
        {"kernel_size": k, "optimizer": name, "train_step_median_ms": 1e3 * median, "train_step_mean_ms": 1e3 * mean,
         "optimizer_step_mean_ms": 1e3 * opt_mean, "overhead_per_adam_step": overhead[k, name], "state_mb": state}
        for k, per_opt in results.items() for name, (median, mean, _, opt_mean, state, _) in per_opt.items()
    ]  # fmt: skip
    return pd.DataFrame(rows)


def ddp_overheads(kernel_size: int, args: argparse.Namespace) -> dict[int, dict[str, tuple[float, float]]]:
    """Per number of ranks: AdaCov's (exact and fast) slowest-rank median optimizer step and overhead over Adam."""
    names = ["adam", "adacov", "adacov_fast"]
    threads = max(1, (os.cpu_count() or 1) // max(args.ddp_ranks))
    settings = dict(kernel_size=kernel_size, widths=args.widths, in_channels=args.in_channels, classes=args.classes,
                    batch=args.batch, names=names, threads=threads, rounds=args.ddp_rounds, warmup=DDP_WARMUP)  # fmt: skip
    return {ranks: ddp_step.overheads(ddp_step.step_times(ranks, build, settings), names[1:]) for ranks in args.ddp_ranks}


def refresh_settings(name: str) -> str:
    """Fast AdaCov's refresh settings as ``name`` runs them here: its registry entry's, then this file's."""
    settings = REGISTRY[ENTRY[name]].kwargs | SETTINGS[name]
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k.startswith("basis") or k == "compile_step")


def _goal(found: float, goal: float, unit: str = "%") -> str:
    scaled = (100 * found, 100 * goal) if unit == "%" else (found, goal)
    shown = f"{scaled[0]:+.1f} %" if unit == "%" else f"{scaled[0]:.2f}x"
    target = f"+{scaled[1]:.0f} %" if unit == "%" else f"{scaled[1]:.1f}x"
    if found <= goal:
        return f"{shown} (goal <= {target}: met)"
    over = f"{scaled[0] - scaled[1]:.1f} points" if unit == "%" else f"{scaled[0] - scaled[1]:.2f}x"
    return f"{shown} (goal <= {target}: NOT met, {over} over)"


def report(results: dict[int, dict[str, tuple]], ddp: dict[int, dict], args: argparse.Namespace, device: torch.device) -> str:
    rules = [name for name in results[next(iter(results))] if ENTRY[name] == "adacov_fast"]
    fast_text = "; ".join(f"{name} = AdaCov({refresh_settings(name)})" for name in rules) or "no fast AdaCov timed"
    lines = [
        f"Machine: {machine_description(device)}",
        f"Net: ConvNet6 widths {'-'.join(map(str, args.widths))}, {args.in_channels} input channel(s), {args.classes} "
        f"classes, batch {args.batch}, synthetic 32x32 batches; {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up rounds. {fast_text}; the K-FAC family with curvature and "
        "inverses every 10 steps (benchmarks/kfac_cost.py splits their cost); the others as their configs set them.",
        "",
        "| kernel | optimizer | train step median (ms) | vs Adam | train step mean (ms) | vs Adam "
        "| optimizer step median (ms) | optimizer step mean (ms) | optimizer time over Adam's, per Adam step "
        "| state (MB) | kernels decomposed per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    overhead = overheads(results)
    for k, per_opt in results.items():
        base_median, base_mean = per_opt["adam"][:2]
        for name, (median, mean, opt_median, opt_mean, state, decomposed) in per_opt.items():
            share = "" if decomposed is None else f"{100 * decomposed:.1f} %"
            lines.append(
                f"| {k}x{k} | {name} | {median * 1e3:.1f} | {100 * (median / base_median - 1):+.1f} % "
                f"| {mean * 1e3:.1f} | {100 * (mean / base_mean - 1):+.1f} % | {opt_median * 1e3:.1f} "
                f"| {opt_mean * 1e3:.1f} | {100 * overhead[k, name]:+.1f} % | {state:.1f} | {share} |"
            )
    lines += [
        "",
        "The forward and backward passes are the same for every optimizer, so the column 'optimizer time over",
        "Adam's, per Adam step', the mean optimizer-step time above Adam's divided by Adam's mean training step, is",
        "the overhead free of their noise. Means include fast AdaCov's eigendecompositions; medians hide them.",
    ]
    if ddp:
        threads = max(1, (os.cpu_count() or 1) // max(args.ddp_ranks))
        lines += [
            "",
            f"AdaCov's optimizer step per rank under torch.distributed (gloo, {threads} torch thread(s) per rank in "
            f"every run; each rank the same gradient, as DDP averages it, a new batch's at every step; median of "
            f"{args.ddp_rounds} steps after {DDP_WARMUP}, slowest rank; benchmarks/ddp_step.py):",
            "",
            "| kernel | optimizer | ranks | optimizer step per rank (ms) | overhead over Adam per rank (ms) "
            "| overhead vs 1 rank |",
            "|---|---|---|---|---|---|",
        ]
        for k, per_ranks in ddp.items():
            for name in ("adacov", "adacov_fast"):
                alone = per_ranks[min(per_ranks)][name][1]
                for ranks, found in per_ranks.items():
                    step, extra = found[name]
                    lines.append(f"| {k}x{k} | {name} | {ranks} | {step * 1e3:.1f} | {extra * 1e3:.1f} | {extra / alone:.2f} |")
    lines += ["", "Goals (issue 23), measured in this run:"]
    for k, goal in FAST_GOALS.items():
        for name, label in (("adacov_fast", "fast AdaCov"), ("adacov_fast_compiled", "fast AdaCov, step compiled")):
            if (k, name) in overhead:
                lines.append(f"- {label} at {k}x{k}: optimizer time over Adam's, per Adam step, {_goal(overhead[k, name], goal)}")
    for k, per_ranks in ddp.items():
        if 1 in per_ranks and 2 in per_ranks:
            ratio = per_ranks[2]["adacov"][1] / per_ranks[1]["adacov"][1]
            lines.append(f"- exact AdaCov at {k}x{k}: overhead per rank with 2 ranks over 1 rank, {_goal(ratio, DDP_GOAL, 'x')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT, choices=list(OPTIMIZERS), help=f"default: {' '.join(DEFAULT)}")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--widths", type=int, nargs=6, default=[32, 32, 64, 64, 128, 128], help="the 6 conv widths")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--ddp-ranks", type=int, nargs="*", default=[1, 2], help="gloo ranks to time AdaCov with (none: skip)")
    parser.add_argument("--ddp-rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--csv", type=Path, help="also write the step times per (kernel size, optimizer) here")
    args = parser.parse_args(argv)
    names = ["adam"] + [n for n in args.optimizers if n != "adam"]
    device = torch.device(args.device)
    results = {k: time_kernel_size(k, names, args, device) for k in args.kernel_sizes}
    ddp = {k: ddp_overheads(k, args) for k in args.kernel_sizes} if args.ddp_ranks and device.type == "cpu" else {}
    publish(report(results, ddp, args, device), args.out, "Optimizer step time", "optimizer_step.py", argv)
    if args.csv:
        step_table(results).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
