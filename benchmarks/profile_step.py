"""Where AdaCov's step spends its time, by the regions AdaCov marks for torch.profiler, and fast AdaCov's cached
step against its memory-bandwidth floor.

On the paper-width 6-conv net (CPU), with the gradients of one batch: exact AdaCov's step, and fast AdaCov's step
after its first (``basis_refresh_warmup=0``, the registry's refresh settings otherwise; with ``--compile`` also with
``compile_step=True``): the cached-basis step of every kernel, the drift check of the kernels whose turn it is,
and the decomposition of those that drifted. Of 3 profiled steps, the one with the median whole-step time is
reported. Each region's time includes the operators
inside it; the rest of the step (the Adam rule for biases and the linear layer, bookkeeping) is the remainder.

The floor: the bytes the cached step must read and write (gradient, m, folded C, Q, lambda_C and lambda_D of every
kernel, the parameter; the Adam rule's tensors), over the bandwidth of ``a.add_(b)`` measured in the same run on
buffers as large as those bytes. The cached step is timed alone (``basis_refresh_every`` so large that no kernel
is checked), by wall clock, median of 9 steps; with ``--compile`` also with ``compile_step=True``.

Then the cached step's two products with the bases, the rotation ``[g, m]^T Q`` and the back-rotation ``Q y``
(``bmm`` of one row per kernel): per tensor as the optimizer runs them, with every kernel of the net in one call,
and with ``--compile`` also as sums compiled by ``torch.compile`` (inductor fuses them into loops; the rotation as
a sum over the rows of ``Q``, as ``compile_step`` runs it), each against one plain read of the bases
(``Q.sum()``).

    python benchmarks/profile_step.py --compile --out results/profile_step_cpu.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from adacov import AdaCov
from adacov.optim.adacov import BASIS, EXP_AVG
from adacov.optim.compiled_step import cpu_vector_width, has_cxx_compiler
from adacov.optim.matrix_functions import folded_width
from adacov.optim.registry import OPTIMIZERS
from bench_report import machine_description, publish
from models import ConvNet6

REGIONS = ("adacov::covariance_update", "adacov::eigh", "adacov::apply_inverse_root", "adacov::store_basis",
           "adacov::drift_check", "adacov::cached_basis_step")  # fmt: skip
REPEATS = 3
STEP_REGION = "Optimizer.step#AdaCov.step"
FLOOR_GOAL = 2.0  # issue 23: the cached step within 2x of its floor


def profiled_ms(optimizer: AdaCov) -> dict[str, float]:
    """Milliseconds of ``optimizer.step()`` and of each AdaCov region inside it, for the median (by whole
    step) of REPEATS profiled steps."""
    samples = []
    for _ in range(REPEATS):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer.step()
        samples.append({event.key: event.cpu_time_total / 1e3 for event in prof.key_averages()})
    middle = sorted(samples, key=lambda s: s[STEP_REGION])[REPEATS // 2]  # one whole step, so its parts add up
    return {name: middle.get(name, 0.0) for name in (STEP_REGION, *REGIONS)}


def cached_step_bytes(model: nn.Module) -> int:
    """Bytes the cached step reads and writes: per kernel block ``d^2`` (Q) ``+ 2 d (d // 2 + 1)`` (folded C, read
    and written) ``+ 8 d`` (gradient; m, lambda_C, parameter read and written; lambda_D); 7 per other entry
    (gradient; m, v, parameter read and written)."""
    floats = 0
    for p in model.parameters():
        d = math.prod(p.shape[2:]) if p.dim() >= 3 else 1
        blocks = p.numel() // d
        floats += blocks * (d * d + 2 * d * folded_width(d) + 8 * d) if d > 1 else 7 * p.numel()
    return floats * 4


def bandwidth(nbytes: int) -> float:
    """Bytes per second of ``a.add_(b)`` (reads a and b, writes a) on float32 buffers of ``nbytes / 2`` each."""
    a, b = torch.rand(nbytes // 8), torch.rand(nbytes // 8)
    return 3 * a.numel() * 4 / median_seconds(lambda: a.add_(b))


def median_seconds(fn, repeats: int = 9) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def rotate(gm: Tensor, Q: Tensor) -> Tensor:
    """The cached step's products: ``y = [g, m]^T Q`` ``[B, 2, d]``, then ``Q y_m`` ``[B, d]``."""
    y = torch.bmm(gm, Q)
    return torch.bmm(y[:, 1:], Q.mT).squeeze(1)


def rotate_reduced(gm: Tensor, Q: Tensor) -> Tensor:
    """``rotate`` as sums, the form inductor fuses into loops without temporaries: the rotation as a sum over the
    rows of ``Q`` (as a reduction over ``Q``'s middle dimension, inductor opens an OpenMP region per kernel)."""
    y = sum(gm[:, :, i, None] * row[:, None] for i, row in enumerate(Q.unbind(1)))
    return (Q * y[:, 1].unsqueeze(-2)).sum(-1)


def rotation_ms(optimizer: AdaCov, compiled: bool) -> dict[str, float]:
    """Milliseconds (median of 9) of the cached step's two products per tensor, in one call for every kernel, and
    compiled (``compiled``), and of one read of every basis."""
    blocks = [(torch.stack([p.grad.reshape(-1, s[BASIS].shape[-1]), s[EXP_AVG].reshape(-1, s[BASIS].shape[-1])], 1), s[BASIS])
              for p, s in optimizer.state.items() if BASIS in s]  # fmt: skip
    gm, Q = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    found = {
        "per tensor": 1e3 * median_seconds(lambda: [rotate(*b) for b in blocks]),
        "one call": 1e3 * median_seconds(lambda: rotate(gm, Q)),
        "read Q": 1e3 * median_seconds(Q.sum),
        "Q MB": Q.numel() * Q.element_size() / 2**20,
    }
    if compiled:
        with cpu_vector_width():
            fused, eager = torch.compile(rotate_reduced, dynamic=False), rotate(gm, Q)
            torch.testing.assert_close(fused(gm, Q), eager, rtol=1e-4, atol=1e-6 * float(eager.abs().max()))
            found["compiled"] = 1e3 * median_seconds(lambda: fused(gm, Q))
    return found


def profile_kernel_size(kernel_size: int, batch: int, compiled: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    torch.manual_seed(0)
    model = ConvNet6(kernel_size=kernel_size)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    nn.functional.cross_entropy(model(x), y).backward()
    exact = AdaCov(model.parameters())
    for _ in range(2):
        exact.step()
    found = {"exact": profiled_ms(exact)}
    fast = AdaCov(model.parameters(), **{**OPTIMIZERS["adacov_fast"].kwargs, "basis_refresh_warmup": 0})
    for _ in range(2):
        fast.step()
    found["fast"] = profiled_ms(fast)
    if compiled:
        fast_compiled = AdaCov(model.parameters(), compile_step=True,
                               **{**OPTIMIZERS["adacov_fast"].kwargs, "basis_refresh_warmup": 0})  # fmt: skip
        for _ in range(2):
            fast_compiled.step()  # the first compiles
        found["fast, compiled"] = profiled_ms(fast_compiled)
    cached = AdaCov(model.parameters(), **{**OPTIMIZERS["adacov_fast"].kwargs, "basis_refresh_warmup": 0, "basis_refresh_every": 10**9})
    cached.step()
    nbytes = cached_step_bytes(model)
    rate = bandwidth(nbytes)
    measured = median_seconds(cached.step)
    floor = {"MB": nbytes / 2**20, "GB/s": rate / 1e9, "floor ms": 1e3 * nbytes / rate, "cached ms": 1e3 * measured}
    if compiled:
        fused = AdaCov(model.parameters(), compile_step=True,
                       **{**OPTIMIZERS["adacov_fast"].kwargs, "basis_refresh_warmup": 0, "basis_refresh_every": 10**9})  # fmt: skip
        fused.step()  # compiles, and decomposes every kernel once
        floor["compiled ms"] = 1e3 * median_seconds(fused.step)
    return found, floor | rotation_ms(cached, compiled)


def report(results: dict[int, tuple[dict, dict]], batch: int) -> str:
    fast = ", ".join(f"{k}={v}" for k, v in {**OPTIMIZERS["adacov_fast"].kwargs, "basis_refresh_warmup": 0}.items())
    lines = [
        f"Machine: {machine_description(torch.device('cpu'))}",
        f"Net: ConvNet6 widths 32-32-64-64-128-128, gradients of one batch of {batch}; of {REPEATS} profiled steps, "
        f"the one with the median whole-step time. Fast: AdaCov({fast}), from its third step.",
        "",
        "| kernel | step | whole step (ms) | " + " | ".join(f"`{r}` (ms)" for r in REGIONS) + " | rest (ms) |",
        "|---|---|---|" + "---|" * (len(REGIONS) + 1),
    ]
    for k, (modes, _) in results.items():
        for mode, ms in modes.items():
            rest = ms[STEP_REGION] - sum(ms[r] for r in REGIONS)
            cells = " | ".join(f"{ms[r]:.1f}" for r in REGIONS)
            lines.append(f"| {k}x{k} | {mode} | {ms[STEP_REGION]:.1f} | {cells} | {rest:.1f} |")
    lines += [
        "",
        "Fast AdaCov's cached step (every kernel, no check or decomposition; wall clock, median of 9) against its "
        "memory-bandwidth floor, the bytes it must move over `a.add_(b)`'s bandwidth on buffers of that size:",
        "",
        "| kernel | bytes moved (MB) | bandwidth (GB/s) | floor (ms) | cached step (ms) | cached step / floor "
        "| compiled (`compile_step=True`, ms) | compiled / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    steps = {"cached ms": "", "compiled ms": ", compiled"}
    for k, (_, f) in results.items():
        cells = [f"{f[key]:.1f} | {f[key] / f['floor ms']:.2f}" if key in f else "- | -" for key in steps]
        lines.append(f"| {k}x{k} | {f['MB']:.1f} | {f['GB/s']:.1f} | {f['floor ms']:.1f} | {' | '.join(cells)} |")
    lines += ["", "Goal (issue 23): the cached step within 2x of its floor, measured in this run:"]
    for k, (_, f) in results.items():
        for key, label in ((key, label) for key, label in steps.items() if key in f):
            ratio = f[key] / f["floor ms"]
            verdict = "met" if ratio <= FLOOR_GOAL else f"NOT met, {ratio / FLOOR_GOAL:.2f}x the goal"
            lines.append(f"- {k}x{k}{label}: {ratio:.2f}x the floor (goal <= {FLOOR_GOAL:.0f}x: {verdict})")
    lines += [
        "",
        "Of the cached step, the rotation `[g, m]^T Q` and the back-rotation `Q y` (`bmm`, one row per kernel; median "
        "of 9), against one read of the bases (`Q.sum()`); bandwidths count the bases' bytes read twice, and once:",
        "",
        "| kernel | bases Q (MB) | per tensor, as the step (ms) | every kernel in one call (ms) | compiled (ms) "
        "| read Q once (ms) | rotations' bandwidth (GB/s) | read's bandwidth (GB/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, (_, f) in results.items():
        compiled = f"{f['compiled']:.1f}" if "compiled" in f else "-"
        lines.append(f"| {k}x{k} | {f['Q MB']:.1f} | {f['per tensor']:.1f} | {f['one call']:.1f} | {compiled} | {f['read Q']:.1f} "
                     f"| {2 * f['Q MB'] * 2**20 / 1e6 / f['per tensor']:.1f} | {f['Q MB'] * 2**20 / 1e6 / f['read Q']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time the rotations compiled by torch.compile")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.compile and not has_cxx_compiler():
        parser.error("--compile needs a C++ compiler (g++, c++ or clang++ on PATH, or CXX): torch.compile builds CPU kernels with it")
    results = {k: profile_kernel_size(k, args.batch, args.compile) for k in args.kernel_sizes}
    publish(report(results, args.batch), args.out, "Where AdaCov's step spends its time", "profile_step.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
