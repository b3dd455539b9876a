"""What the K-FAC family costs at the paper's widths: per training step, split by schedule, against Adam; and per
inversion of one factor, by the way it is inverted, against the factor's size.

Each variant trains its own copy of the 6-conv net (widths 32-32-64-64-128-128, CIFAR-shaped batch)
beside torch.optim.Adam, interleaved round by round, in three schedules (SENG's curvature and its solve
are refreshed together, so its whole refresh counts as curvature):

- ``base``: curvature and inverses only at step 1 (``curvature_every = inverse_every`` beyond the run):
  the forward, backward and the preconditioned update;
- ``curvature``: the factors (and EKFAC's moments) every step, inverses only at step 1;
- ``both``: factors and inverses (or eigenbases) every step.

Medians over rounds after the first step give ``curvature = t_curvature - t_base`` and
``inverse = t_both - t_curvature``, and the amortized step for ``curvature_every = Tc`` and
``inverse_every = Ti`` is ``t_base + curvature / Tc + inverse / Ti``, reported as a ratio to Adam's
median step for (Tc, Ti) = (10, 10), (10, 100) and (1, 10). Memory is the optimizer state's size
(factors, inverses or eigenbases, moments, momentum) after the run.

The inversion table takes the net's own factors (K-FAC's ``A`` and ``G`` of every layer after one batch, at each
kernel size) and times, per factor size ``n``, one inversion by each way of :mod:`adacov.optim.factor_inverse`:
K-FAC's damped Cholesky inverse, ``eigh``, the randomized SVD (RS-KFAC) and the sketched ``eigh`` (SRE-KFAC) at
ranks ``r`` from ``n / 32`` to ``n / 2`` and at the configs' rule ``max(32, ceil(n / 10))`` (oversampling 10, 3 power
iterations), and one Brand update (B-KFAC) by ``N = batch`` columns, the linear layer's batch term, where
``r + N < n``. Medians over ``rounds`` repetitions; "pays up to" is the largest rank of the grid at which a way
is faster than ``eigh``.

    python benchmarks/kfac_cost.py --out results/kfac_cost_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from adacov import KFAC, kfac_param_groups
from adacov.optim.factor_inverse import (
    brand_update,
    damped_cholesky_inverse,
    eigh_decomposition,
    factor_rank,
    randomized_svd,
    sketched_eigh,
)
from adacov.optim.kfac import FACTOR_IN, FACTOR_OUT
from adacov.optim.registry import OPTIMIZERS
from adacov.training.loop import optimizer_state_bytes
from bench_report import machine_description, publish
from models import ConvNet6

# Each variant as its config sets it, apart from the schedule (and the lr, which does not change the cost).
VARIANTS: dict[str, dict] = {
    "kfac": {}, "ekfac": {}, "tkfac": {}, "tekfac": {}, "rs_kfac": {}, "sre_kfac": {}, "b_kfac": {}, "b_r_kfac": {},
    "b_kfac_c": {}, "kld_wrm_so": {}, "kld_wrm_q": {}, "seng": {"damping": 1e-3}, "whitening": {},
    "whitening_recursive": {},
}  # fmt: skip
NEVER = 10**9  # a schedule period beyond any run: only step 1 does it
SCHEDULES = {"base": (NEVER, NEVER), "curvature": (1, NEVER), "both": (1, 1)}
AMORTIZED = [(10, 10), (10, 100), (1, 10)]
RANK_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
OVERSAMPLE, NITER = 10, 3


def build(name: str, model: nn.Module, curvature_every: int, inverse_every: int) -> torch.optim.Optimizer:
    """The variant ``name`` from the registry with the given schedule (SENG: one period for both)."""
    schedule = {"update_freq": curvature_every} if name == "seng" else {"curvature_every": curvature_every, "inverse_every": inverse_every}
    return OPTIMIZERS[name].build(model, lr=1e-4, **VARIANTS[name], **schedule)


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
            runs[(name, schedule)] = (model, build(name, model, curvature_every, inverse_every))
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
        f"Machine: {machine_description(torch.device('cpu'))}" + (f". {args.note}" if args.note else ""),
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
        "RS-KFAC, SRE-KFAC and the B-KFACs decompose at rank max(32, ceil(n / 10)); the B-KFACs Brand-update, on every",
        "curvature step, the factors whose batch term has fewer than n - r columns (here the linear layer's input",
        "factor: 128 columns, n = 2049). KLD-WRM is K-FAC plus gradient buffers (Q: the batch factors and the last",
        "step). SENG's Tc is its update_freq: its per-sample Gram matrices and their Cholesky factors count as",
        "curvature. Whitening averages and decomposes the input factors only (recursive: one O(n^2) shrink).",
    ]
    return "\n".join(lines)


def net_factors(kernel_size: int, batch: int) -> dict[int, Tensor]:
    """One factor of each size ``n`` of the paper-width net: K-FAC's ``A`` and ``G`` of every layer after one batch."""
    torch.manual_seed(0)
    model = ConvNet6(kernel_size=kernel_size)
    optimizer = KFAC(kfac_param_groups(model), lr=0.0, curvature_every=1, inverse_every=NEVER)
    nn.functional.cross_entropy(model(torch.randn(batch, 3, 32, 32)), torch.randint(0, 100, (batch,))).backward()
    optimizer.step()
    factors = [state[key] for state in optimizer.state.values() for key in (FACTOR_IN, FACTOR_OUT) if key in state]
    return {factor.shape[0]: factor for factor in factors}


def seconds(call: Callable[[], object], rounds: int) -> float:
    """Median wall time of ``call`` over ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inversion_times(factor: Tensor, columns: int, rounds: int) -> dict[str, dict[int, float]]:
    """Seconds per inversion of ``factor`` ``[n, n]`` by each way: ``{way: {rank: seconds}}`` (rank n: exact)."""
    n = factor.shape[0]
    stacked, generator = factor.unsqueeze(0), torch.Generator().manual_seed(0)
    ranks = sorted({max(1, round(f * n)) for f in RANK_FRACTIONS} | {factor_rank(n, 0.1, 32)} - {n})
    times: dict[str, dict[int, float]] = {
        "cholesky": {n: seconds(lambda: damped_cholesky_inverse(stacked, torch.tensor([1e-3])), rounds)},
        "eigh": {n: seconds(lambda: eigh_decomposition(stacked), rounds)},
        "rsvd": {},
        "sketched eigh": {},
        "brand": {},
    }
    new_columns = torch.randn(1, n, columns, generator=generator) * factor.diagonal().mean().sqrt()
    eigh = times["eigh"][n]
    for rank in ranks:  # a way slower than eigh at one rank is not timed at larger ones
        sketch = torch.randn(1, n, min(n, rank + OVERSAMPLE), generator=generator)
        basis, values = randomized_svd(stacked, sketch, NITER, rank)
        ways = {
            "rsvd": lambda: randomized_svd(stacked, sketch, NITER, rank),
            "sketched eigh": lambda: sketched_eigh(stacked, sketch, NITER, rank),
            "brand": (lambda: brand_update(basis, values, new_columns, 0.95)) if rank + columns < n else None,
        }
        for way, call in ways.items():
            if call is not None and all(t < eigh for t in times[way].values()):
                times[way][rank] = seconds(call, rounds)
    return times


def inversion_report(results: dict[int, dict[str, dict[int, float]]], columns: int, threads: int) -> list[str]:
    lines = [
        "",
        f"## Time per inversion of one factor ({threads} torch thread{'' if threads == 1 else 's'})",
        "",
        "The net's own factors after one batch; ms, median over rounds. rsvd / sketched eigh / brand at rank r, and at "
        "the configs' rule r = max(32, ceil(n / 10)); brand adds one batch of "
        f"{columns} columns (the linear layer's; a convolution's batch term has N H W >= 8192 columns, more than its n). "
        "> eigh: not timed, as the way was slower than eigh at a smaller rank; -: Brand does not apply (r + N >= n). "
        "Pays up to: the largest rank of the grid at which the way is faster than eigh.",
        "",
        "| n | cholesky | eigh | way | " + " | ".join(f"r = n/{round(1 / f)}" for f in RANK_FRACTIONS) + " | rule r | at rule r | pays up to |",
        "|---|---|---|---|" + "---|" * len(RANK_FRACTIONS) + "---|---|---|",
    ]
    for n, times in sorted(results.items()):
        eigh = times["eigh"][n]
        rule = factor_rank(n, 0.1, 32)
        for way in ("rsvd", "sketched eigh", "brand"):
            by_rank = times[way]
            cells = [_cell(by_rank, r, n, columns) for r in (max(1, round(f * n)) for f in RANK_FRACTIONS)]
            paying = [r for r, t in by_rank.items() if t < eigh]
            at_rule = "exact" if rule == n else _cell(by_rank, rule, n, columns)
            lines.append(
                f"| {n} | {times['cholesky'][n] * 1e3:.1f} | {eigh * 1e3:.1f} | {way} | " + " | ".join(cells)
                + f" | {rule} | {at_rule} | {f'r = {max(paying)} ({max(paying) / n:.2f} n)' if paying else 'never'} |"
            )
    return lines


def _cell(by_rank: dict[int, float], rank: int, n: int, columns: int) -> str:
    """ms at ``rank``; ``> eigh`` where a smaller rank was already slower; ``-`` where Brand does not apply."""
    if rank in by_rank:
        return f"{by_rank[rank] * 1e3:.1f}"
    return "-" if not by_rank and rank + columns >= n else "> eigh"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--note", default="", help="a line on the machine's load, written under the machine")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    results = {k: measure(k, args.variants, args.rounds, args.batch) for k in args.kernel_sizes}
    factors = {n: factor for k in args.kernel_sizes for n, factor in net_factors(k, args.batch).items()}
    inversions = {n: inversion_times(factor, args.batch, args.rounds) for n, factor in sorted(factors.items())}
    text = report(results, args) + "\n" + "\n".join(inversion_report(inversions, args.batch, torch.get_num_threads()))
    publish(text, args.out, "K-FAC family: cost per training step and per inversion", "kfac_cost.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
