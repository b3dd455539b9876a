"""What the K-FAC family costs per training step at the paper's widths, split by schedule, against Adam.

Each variant trains its own copy of the 6-conv net (widths 32-32-64-64-128-128, CIFAR-shaped batch)
beside torch.optim.Adam, interleaved round by round, in three schedules:

- ``base``: curvature and inverses only at step 1 (``curvature_every = inverse_every`` beyond the run):
  the forward, backward and the preconditioned update;
- ``curvature``: the factors (and EKFAC's moments) every step, inverses only at step 1;
- ``both``: factors and inverses (or eigenbases) every step.

Medians over rounds after the first step give ``curvature = t_curvature - t_base`` and
``inverse = t_both - t_curvature``, and the amortized step for ``curvature_every = Tc`` and
``inverse_every = Ti`` is ``t_base + curvature / Tc + inverse / Ti``, reported as a ratio to Adam's
median step for (Tc, Ti) = (10, 10), (10, 100) and (1, 10). Memory is the optimizer state's size
(factors, inverses or eigenbases, moments, momentum) after the run.

    python benchmarks/kfac_cost.py --out results/kfac_cost_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from adacov import EKFAC, KFAC, TEKFAC, TKFAC, kfac_param_groups
from adacov.training.loop import optimizer_state_bytes
from bench_report import machine_description, publish
from models import ConvNet6

VARIANTS = {"kfac": KFAC, "ekfac": EKFAC, "tkfac": TKFAC, "tekfac": TEKFAC}
NEVER = 10**9  # a schedule period beyond any run: only step 1 does it
SCHEDULES = {"base": (NEVER, NEVER), "curvature": (1, NEVER), "both": (1, 1)}
AMORTIZED = [(10, 10), (10, 100), (1, 10)]


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def measure(kernel_size: int, names: list[str], rounds: int, batch: int) -> dict[str, dict[str, float]]:
    """Median step seconds of Adam and of every (variant, schedule), interleaved; and each variant's state MB."""
    torch.manual_seed(0)
    template = ConvNet6(kernel_size=kernel_size)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    runs: dict[tuple[str, str], tuple[nn.Module, torch.optim.Optimizer]] = {}
    adam_model = ConvNet6(kernel_size=kernel_size)
    adam_model.load_state_dict(template.state_dict())
    runs[("adam", "")] = (adam_model, torch.optim.Adam(adam_model.parameters(), lr=1e-3, foreach=True))
    for name in names:
        for schedule, (curvature_every, inverse_every) in SCHEDULES.items():
            model = ConvNet6(kernel_size=kernel_size)
            model.load_state_dict(template.state_dict())
            optimizer = VARIANTS[name](kfac_param_groups(model), lr=1e-4, curvature_every=curvature_every, inverse_every=inverse_every)
            runs[(name, schedule)] = (model, optimizer)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for r in range(rounds + 1):  # round 0 is step 1 of every run: curvature and inverses for all, not timed
        for key in keys if r % 2 == 0 else keys[::-1]:
            seconds = step_seconds(*runs[key], x, y)
            if r > 0:
                samples[key].append(seconds)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    found: dict[str, dict[str, float]] = {"adam": {"step": medians[("adam", "")], "state_mb": optimizer_state_bytes(runs[("adam", "")][1]) / 2**20}}
    for name in names:
        base, curvature, both = (medians[(name, s)] for s in SCHEDULES)
        found[name] = {
            "base": base,
            "curvature": curvature - base,
            "inverse": both - curvature,
            "state_mb": optimizer_state_bytes(runs[(name, "both")][1]) / 2**20,
        }
    return found


def report(results: dict[int, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    schedule_columns = " | ".join(f"Tc={tc}, Ti={ti}: x Adam" for tc, ti in AMORTIZED)
    lines = [
        f"Machine: {machine_description(torch.device('cpu'))}",
        f"Net: ConvNet6 widths 32-32-64-64-128-128, batch {args.batch}, CIFAR-shaped input; {args.rounds} interleaved "
        "rounds after step 1; medians. Tc = curvature_every, Ti = inverse_every.",
        "",
        f"| kernel | variant | Adam step (ms) | base step (ms) | curvature update (ms) | inverses / eigenbases (ms) | {schedule_columns} | state (MB) |",
        "|---|---|---|---|---|---|" + "---|" * len(AMORTIZED) + "---|",
    ]
    for k, found in results.items():
        adam = found["adam"]["step"]
        for name in (n for n in found if n != "adam"):
            f = found[name]
            amortized = [(f["base"] + f["curvature"] / tc + f["inverse"] / ti) / adam for tc, ti in AMORTIZED]
            lines.append(
                f"| {k}x{k} | {name} | {adam * 1e3:.0f} | {f['base'] * 1e3:.0f} | {f['curvature'] * 1e3:.0f} | {f['inverse'] * 1e3:.0f} | "
                + " | ".join(f"{a:.2f}" for a in amortized)
                + f" | {f['state_mb']:.1f} |"
            )
        lines.append(f"| {k}x{k} | adam (state) | | | | | " + " | " * (len(AMORTIZED) - 1) + f" | {found['adam']['state_mb']:.1f} |")
    lines += [
        "",
        "Amortized step = base + curvature / Tc + inverse / Ti, divided by Adam's median step from the same rounds.",
        "K-FAC and TKFAC invert their damped factors by batched Cholesky; EKFAC and TEKFAC take eigenbases by",
        "batched eigh and, on every curvature step, the second moments of the per-sample gradients in them.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    results = {k: measure(k, args.variants, args.rounds, args.batch) for k in args.kernel_sizes}
    publish(report(results, args), args.out, "K-FAC family: cost per training step", "kfac_cost.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
