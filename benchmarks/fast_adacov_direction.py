"""How close fast AdaCov's step is to the exact one along a real training trajectory.

Trains the 6-conv net with fast AdaCov (cached basis, refreshed every T steps) on CIFAR-shaped
synthetic data and, after each step, recomputes from the optimizer's state the direction that the
exact algorithm would take (a fresh eigendecomposition of C_s) and the one the cached basis gives.
It also evaluates one Ogita-Aishima refinement of the cached basis (Ogita & Aishima 2018, the
paper's reference [6]) as an alternative to a fresh eigendecomposition: its direction error and its
cost next to eigh's. Reports cosine similarity and relative error per epoch, the cached step's length
relative to the exact one, and the median over blocks of the cached smallest eigenvalue estimate over
the exact smallest eigenvalue (each bias-corrected, plus cov_eps^2, as the inverse root uses them).

    python benchmarks/fast_adacov_direction.py --kernel-sizes 3 5 --epochs 3 --out results/fast_adacov_direction_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from adacov import AdaCov
from adacov.data import make_synthetic
from adacov.optim.adacov import BASIS, BASIS_EIG_COV, BASIS_EIG_DIAG, EXP_AVG, EXP_COV, STEP, offdiagonal_scale
from adacov.optim.matrix_functions import apply_inverse_root, blend_offdiagonal, symmetric_eigh
from bench_report import publish
from models import ConvNet6


def ogita_aishima(A: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One refinement step of approximate eigenvectors ``X`` of symmetric ``A`` (batched).

    R = I - X^T X, S = X^T A X, lambda_i = S_ii / (1 - R_ii); E_ij = (S_ij + lambda_j R_ij) /
    (lambda_j - lambda_i) for well separated pairs (gap > delta), R_ij / 2 otherwise;
    X <- X + X E. delta = 2 (||S - diag(lambda)|| + ||A|| ||R||), Frobenius norms per block.
    """
    d = A.shape[-1]
    eye = torch.eye(d, dtype=A.dtype, device=A.device)
    R = eye - X.mT @ X
    S = X.mT @ A @ X
    lam = S.diagonal(dim1=-2, dim2=-1) / (1 - R.diagonal(dim1=-2, dim2=-1))
    off = S - torch.diag_embed(lam)
    delta = 2 * (off.flatten(1).norm(dim=1) + A.flatten(1).norm(dim=1) * R.flatten(1).norm(dim=1))
    gap = lam[:, None, :] - lam[:, :, None]
    separated = gap.abs() > delta[:, None, None]
    E = torch.where(separated, (S + R * lam[:, None, :]) / torch.where(separated, gap, torch.ones_like(gap)), R / 2)
    E.diagonal(dim1=-2, dim2=-1).copy_(R.diagonal(dim1=-2, dim2=-1) / 2)
    return X + X @ E, lam


def directions(optimizer: AdaCov, p: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
    """Exact, cached-basis and refined directions (and seconds) from the state after the last step, and
    ``"floor"``: per block, the cached smallest eigenvalue estimate over the exact one, both as the
    inverse root sees them (bias-corrected, plus ``cov_eps^2``)."""
    state, group = optimizer.state[p], optimizer.param_groups[0]
    t = int(state[STEP].item())
    d = state[EXP_COV].shape[-1]
    s = offdiagonal_scale(t, group["offdiag_warmup"])
    scale, shift = 1.0 / (1.0 - group["betas"][1] ** t), group["cov_eps"] ** 2
    m = state[EXP_AVG].view(-1, d)
    C_s = blend_offdiagonal(state[EXP_COV], s, out=torch.empty_like(state[EXP_COV]))
    start = time.perf_counter()
    w, Q = symmetric_eigh(C_s)
    exact = apply_inverse_root(Q, w, m, shift, scale)
    exact_time = time.perf_counter() - start
    eig = torch.lerp(state[BASIS_EIG_DIAG], state[BASIS_EIG_COV], s)
    cached = apply_inverse_root(state[BASIS], eig, m, shift, scale)
    start = time.perf_counter()
    X, lam = ogita_aishima(C_s, state[BASIS])
    refined = apply_inverse_root(X, lam, m, shift, scale)
    refined_time = time.perf_counter() - start
    floor = (eig.min(-1).values.clamp_min(0) * scale + shift) / (w.min(-1).values.clamp_min(0) * scale + shift)
    return {"exact": (exact, exact_time), "cached": (cached, 0.0), "refined": (refined, refined_time), "floor": (floor, 0.0)}


def trajectory(kernel_size: int, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    data = make_synthetic(train_size=args.steps_per_epoch * args.batch, test_size=10, seed=0)
    model = ConvNet6(kernel_size=kernel_size, channels=args.channels)
    optimizer = AdaCov(
        model.parameters(),
        offdiag_warmup=args.steps_per_epoch,
        basis_refresh_every=args.every,
        basis_refresh_warmup=args.steps_per_epoch,
    )
    mean, std = data.normalizer()
    probe = model.features[2].weight  # the second convolution
    rows = []
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(epoch)
        for x, y in data.train_batches(args.batch, generator):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model((x.float() / 255 - mean) / std), y).backward()
            optimizer.step()
            if BASIS not in optimizer.state[probe]:
                continue
            found = directions(optimizer, probe)
            exact = found["exact"][0].flatten()
            row = {"epoch": epoch + 1, "step": int(optimizer.state[probe][STEP].item())}
            for name in ("cached", "refined"):
                approx = found[name][0].flatten()
                row[f"{name}_cos"] = nn.functional.cosine_similarity(approx, exact, dim=0).item()
                row[f"{name}_rel"] = ((approx - exact).norm() / exact.norm()).item()
            row["cached_norm"] = (found["cached"][0].norm() / found["exact"][0].norm()).item()
            row["floor"] = found["floor"][0].median().item()
            row["eigh_s"], row["refine_s"] = found["exact"][1], found["refined"][1]
            rows.append(row)
    return rows


def summarize(kernel_size: int, rows: list[dict]) -> list[str]:
    lines = []
    for epoch in sorted({r["epoch"] for r in rows}):
        group = [r for r in rows if r["epoch"] == epoch]
        lines.append(
            f"| {kernel_size}x{kernel_size} | {epoch} | {len(group)} | {statistics.mean(r['cached_cos'] for r in group):.5f} "
            f"| {min(r['cached_cos'] for r in group):.5f} | {statistics.mean(r['cached_rel'] for r in group):.4f} "
            f"| {statistics.mean(r['refined_cos'] for r in group):.5f} | {statistics.mean(r['refined_rel'] for r in group):.4f} "
            f"| {1e3 * statistics.median(r['eigh_s'] for r in group):.1f} | {1e3 * statistics.median(r['refine_s'] for r in group):.1f} "
            f"| {statistics.mean(r['cached_norm'] for r in group):.4f} | {statistics.mean(r['floor'] for r in group):.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--channels", type=int, nargs=6, default=[16, 16, 32, 32, 64, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    header = [
        f"Fast AdaCov (basis_refresh_every={args.every}, basis_refresh_warmup = offdiag_warmup = one epoch of "
        f"{args.steps_per_epoch} steps) on CIFAR-shaped synthetic data, ConvNet6 widths {'-'.join(map(str, args.channels))}, "
        f"batch {args.batch}, CPU with {torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "Directions of the second convolution's weight, compared with the exact step computed from the same state "
        "after every step that has a cached basis (the first epoch refreshes every step, so it is exact). The last two "
        "columns are means over the epoch's steps; the smallest-eigenvalue ratio is a median over the blocks.",
        "",
        "| kernel | epoch | steps | cached cos (mean) | cached cos (min) | cached rel. err | one Ogita-Aishima step: cos "
        "| rel. err | eigh (ms) | refinement (ms) | cached / exact step length | cached / exact smallest eigenvalue |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = [line for k in args.kernel_sizes for line in summarize(k, trajectory(k, args))]
    title = "Fast AdaCov: direction error along a trajectory"
    publish("\n".join(header + body), args.out, title, "fast_adacov_direction.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
