"""Full vs packed (upper-triangle) storage of AdaCov's covariance blocks, and AdaCov's memory.

A symmetric ``d x d`` block has ``d (d + 1) / 2`` distinct entries, so packed storage would hold
``[B, d (d + 1) / 2]`` instead of ``[B, d, d]``: 56 % of the bytes for 3x3 kernels, 52 % for 5x5.
It changes two operations, timed here side by side on the block count of the paper-width net:

- the per-step average ``C <- beta2 C + (1 - beta2) g g^T``: full, AdaCov's own ``update_covariance``
  (in place, broadcast outer product); packed, by gathering ``g_i`` and ``g_j`` for ``i <= j`` into reused
  buffers (the fastest of the packed forms tried: a direct ``g[:, iu] * g[:, ju]`` or slicing the full
  outer product was slower) and one ``lerp_``;
- building eigh's input ``C_s`` (off-diagonals scaled by ``s``): full, AdaCov's
  ``blend_offdiagonal``; packed, scaling and scattering into the lower triangle, the only one eigh reads.

It also reports what exact and fast AdaCov hold after a few steps (``AdaCov.memory_bytes``) and the
median time of their whole optimizer step, to put the differences in proportion.

    python benchmarks/covariance_storage.py --out results/covariance_storage_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adacov import AdaCov
from adacov.optim.adacov import update_covariance
from adacov.optim.matrix_functions import blend_offdiagonal
from bench_report import machine_description, publish
from models import ConvNet6

BETA2 = 0.999
S = 0.5


def median_ms(fn: Callable[[], object], rounds: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


class PackedCovariance:
    """The upper triangles ``[B, d(d+1)/2]`` of symmetric blocks, with the two operations AdaCov needs.

    Entry ``k`` holds ``(rows[k], cols[k])``, ``rows[k] <= cols[k]`` (``torch.triu_indices`` order).
    """

    def __init__(self, values: torch.Tensor, d: int) -> None:
        self.values = values
        self.rows, self.cols = torch.triu_indices(d, d, device=values.device)
        self.lower_flat = self.cols * d + self.rows  # (i, j), i <= j, is (j, i) of the lower triangle
        self._g_rows, self._g_cols = torch.empty_like(values), torch.empty_like(values)

    @classmethod
    def pack(cls, C: torch.Tensor) -> PackedCovariance:
        d = C.shape[-1]
        rows, cols = torch.triu_indices(d, d, device=C.device)
        return cls(C[:, rows, cols].contiguous(), d)

    def update(self, g: torch.Tensor, beta2: float) -> None:
        """``C <- beta2 C + (1 - beta2) g g^T`` for the stored entries: gathers ``g_i``, ``g_j`` into reused buffers."""
        torch.index_select(g, 1, self.rows, out=self._g_rows)
        torch.index_select(g, 1, self.cols, out=self._g_cols)
        self.values.lerp_(self._g_rows.mul_(self._g_cols), 1.0 - beta2)

    def eigh_input(self, s: float, out: torch.Tensor) -> torch.Tensor:
        """The lower triangle of ``s C + (1 - s) diag(C)`` written into ``out`` ``[B, d, d]`` (all that eigh reads)."""
        scale = torch.full(self.rows.shape, s, dtype=self.values.dtype, device=self.values.device)
        scale[self.rows == self.cols] = 1.0
        out.view(out.shape[0], -1).index_copy_(1, self.lower_flat, self.values * scale)
        return out


def storage_timings(blocks: int, d: int, rounds: int) -> dict[str, float]:
    """Median ms of the average update and of building eigh's input, full and packed."""
    g = torch.randn(blocks, d)
    full = torch.randn(blocks, d, d)
    packed = PackedCovariance.pack(full)
    eigh_input = torch.empty_like(full)
    return {
        "update_full": median_ms(lambda: update_covariance(full, g, BETA2), rounds),
        "update_packed": median_ms(lambda: packed.update(g, BETA2), rounds),
        "blend_full": median_ms(lambda: blend_offdiagonal(full, S, out=eigh_input), rounds),
        "blend_packed": median_ms(lambda: packed.eigh_input(S, eigh_input), rounds),
        "full_mb": full.numel() * full.element_size() / 2**20,
        "packed_mb": packed.values.numel() * packed.values.element_size() / 2**20,
    }


def adacov_memory_and_step(kernel_size: int, batch: int, rounds: int) -> dict[str, tuple[dict[str, int], float]]:
    """``memory_bytes()`` after 11 steps and the median optimizer step (ms) of exact and fast AdaCov."""
    torch.manual_seed(0)
    model = ConvNet6(kernel_size=kernel_size)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    nn.functional.cross_entropy(model(x), y).backward()
    found = {}
    fast = {"basis_refresh_every": 10, "basis_refresh_warmup": 0, "basis_drift_threshold": 0.2}
    for name, kwargs in {"exact": {}, "fast": fast}.items():
        optimizer = AdaCov(model.parameters(), **kwargs)
        for _ in range(11):
            optimizer.step()
        found[name] = (optimizer.memory_bytes(), median_ms(optimizer.step, rounds, warmup=0))
    return found


def report(results: dict[int, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine_description(torch.device('cpu'))}",
        f"Blocks: every conv weight of ConvNet6 widths 32-32-64-64-128-128 stacked, as AdaCov stacks them; "
        f"median of {args.rounds} rounds. AdaCov steps: the same net, gradients of one batch of {args.batch}, "
        "fast = AdaCov(basis_refresh_every=10, basis_refresh_warmup=0, basis_drift_threshold=0.2), median over "
        "the rounds (fast: refresh steps included).",
        "",
        "| kernel | blocks | covariance full / packed (MB) | update full (ms) | update packed (ms) "
        "| eigh input full (ms) | eigh input packed (ms) | exact AdaCov step (ms) | fast AdaCov step (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in results.items():
        lines.append(
            f"| {k}x{k} | {r['blocks']} | {r['full_mb']:.1f} / {r['packed_mb']:.1f} | {r['update_full']:.1f} "
            f"| {r['update_packed']:.1f} | {r['blend_full']:.1f} | {r['blend_packed']:.1f} "
            f"| {r['adacov']['exact'][1]:.0f} | {r['adacov']['fast'][1]:.1f} |"
        )
    keys = sorted({key for r in results.values() for mode in r["adacov"].values() for key in mode[0]})
    lines += [
        "",
        "Memory held by AdaCov (MB), `AdaCov.memory_bytes()` after 11 steps:",
        "",
        "| kernel | mode | " + " | ".join(keys) + " | total |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]
    for k, r in results.items():
        for mode, (held, _) in r["adacov"].items():
            cells = " | ".join(f"{held.get(key, 0) / 2**20:.1f}" for key in keys)
            lines.append(f"| {k}x{k} | {mode} | {cells} | {sum(held.values()) / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    results = {}
    for k in args.kernel_sizes:
        convs = [m for m in ConvNet6(kernel_size=k).modules() if isinstance(m, nn.Conv2d)]
        blocks = sum(c.weight.shape[0] * c.weight.shape[1] for c in convs)
        results[k] = {"blocks": blocks, **storage_timings(blocks, k * k, args.rounds)}
        results[k]["adacov"] = adacov_memory_and_step(k, args.batch, args.rounds)
    publish(report(results, args), args.out, "Covariance storage: full vs packed", "covariance_storage.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
