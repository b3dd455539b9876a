"""How close fast AdaCov's step stays to the exact one along a training trajectory, and what each way of
refreshing its cached bases costs.

Trains the 6-conv net with fast AdaCov (the registry's settings; warm-ups of one epoch) on CIFAR-shaped
synthetic data. After every step past the warm-up it computes, from the optimizer's state, the step exact
AdaCov would take (a fresh eigendecomposition of every kernel's C_s) and compares the directions of all
convolution kernels with it: fast AdaCov's own, and those of other refresh rules run beside it on the same
gradients (each keeps its own bases and eigenvalue estimates; C and m depend on the gradients only):

- every T steps, all kernels at once (fast mode before issue 23);
- staggered, 1/T of each tensor's kernels per step, with or without the drift check (threshold 0), for
  several T and thresholds;
- staggered with a QR refresh: one power iteration ``Q <- qr(C_s Q)`` with Q's columns sorted by their
  Rayleigh quotients first, as SOAP refreshes its bases, instead of eigh;
- staggered with Q stored in float16 (half the bytes of the basis).

Reports per rule the mean relative error and cosine to the exact direction (all kernels together), the worst
cosine of a single layer, the kernels decomposed and checked per step, and the cost per step those imply,
from per-kernel costs of eigh, the QR refresh and the drift check measured in the same run on the
trajectory's last covariances.

    python benchmarks/fast_adacov_direction.py --kernel-sizes 3 5 --epochs 3 --out results/fast_adacov_direction_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from adacov import AdaCov
from adacov.data import make_synthetic
from adacov.optim.adacov import BASIS, BASIS_EIG_COV, BASIS_EIG_DIAG, EXP_AVG, STEP, folded_covariance, offdiagonal_scale
from adacov.optim.matrix_functions import apply_inverse_root, blend_offdiagonal, offdiagonal_mass, symmetric_eigh
from adacov.optim.registry import OPTIMIZERS
from bench_report import machine_description, publish
from decomposition_counter import DecompositionCounter
from models import ConvNet6


@dataclass(frozen=True)
class Rule:
    """A way to refresh cached bases: which kernels are due (``staggered``: 1/T of each tensor per step; else all
    every T steps), the drift threshold among them (0: all due ones), eigh or one QR power iteration, Q's dtype."""

    name: str
    every: int
    threshold: float = 0.0
    staggered: bool = True
    qr: bool = False
    basis_dtype: torch.dtype = torch.float32


def rules() -> list[Rule]:
    """The rules compared, the same in every run (the optimizer's own settings are its first row)."""
    return [
        Rule("all kernels every 10 steps (before issue 23)", 10, staggered=False),
        Rule("staggered, T=10, no drift check", 10),
        *(Rule(f"staggered, T={t}, no drift check", t) for t in (20, 50, 100)),
        *(Rule(f"staggered, T={t}, drift > {tau:g}", t, tau) for t in (10, 5) for tau in (0.1, 0.2)),
        Rule("staggered, T=10, QR refresh (SOAP)", 10, qr=True),
        Rule("staggered, T=10, Q in float16", 10, basis_dtype=torch.float16),
    ]


class Shadow:
    """One rule's bases ``Q`` and estimates ``lambda_C``, ``lambda_D`` for the stacked kernels of every conv layer."""

    def __init__(self, rule: Rule, sizes: list[int], d: int) -> None:
        self.rule, n = rule, sum(sizes)
        self.Q = torch.zeros(n, d, d)
        self.eig_cov, self.eig_diag = torch.zeros(n, d), torch.zeros(n, d)
        self.chunk = torch.cat([torch.arange(b) * rule.every // b for b in sizes])  # contiguous, as AdaCov's ranges
        self.decomposed, self.checked = [], []

    def step(self, t: int, warm: bool, g: Tensor, C: Tensor, C_s: Tensor, basis: Tensor, s: float, bc: float, shift: float) -> None:
        """Track ``lambda_C`` in the current bases, then refresh the due (and drifted) kernels from ``basis``, the
        eigenvectors of ``C_s`` (or one QR power iteration)."""
        beta2 = 0.999
        g_rot = torch.bmm(g.unsqueeze(1), self.Q).squeeze(1)
        self.eig_cov.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        rule = self.rule
        if warm:
            due = torch.ones(len(g), dtype=torch.bool)
        elif rule.staggered:
            due = self.chunk == (t - 1) % rule.every
        else:
            due = torch.full((len(g),), (t - 1) % rule.every == 0)
        if not warm:
            self.checked.append(due.float().mean().item())
            if rule.threshold and due.any():
                rows = due.nonzero().flatten()
                Q = self.Q[rows]
                due[rows] = offdiagonal_mass(Q.mT @ C_s[rows] @ Q, bc, shift) > rule.threshold
            self.decomposed.append(due.float().mean().item())
        if not due.any():
            return
        Q = qr_refresh(C_s[due], self.Q[due]) if rule.qr and not warm else basis[due]
        Q = Q.to(rule.basis_dtype).float()
        self.Q[due] = Q
        self.eig_cov[due] = (torch.bmm(C[due], Q) * Q).sum(-2)
        self.eig_diag[due] = (Q.square() * C[due].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)).sum(-2) * bc

    def direction(self, m: Tensor, s: float, bc: float, shift: float) -> Tensor:
        eig = self.eig_cov * (s * bc) + self.eig_diag * (1 - s)
        return apply_inverse_root(self.Q, eig, m, shift)


def qr_refresh(C_s: Tensor, Q: Tensor) -> Tensor:
    """One power iteration on the bases ``Q`` of ``C_s``: columns sorted by Rayleigh quotient (largest first),
    then ``qr(C_s Q)`` (SOAP's ``get_orthogonal_matrix_QR``)."""
    order = (Q * torch.bmm(C_s, Q)).sum(-2).argsort(-1, descending=True)
    Q = Q.gather(-1, order.unsqueeze(-2).expand_as(Q))
    return torch.linalg.qr(torch.bmm(C_s, Q)).Q


def per_kernel_ms(C: Tensor, C_s: Tensor, Q: Tensor, bc: float, shift: float) -> dict[str, float]:
    """Milliseconds per kernel of a refresh by eigh or by one QR power iteration, each with its lambda estimates,
    and of the drift check, on these blocks."""

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start) / len(C)

    def estimates(V: Tensor) -> None:
        (torch.bmm(C, V) * V).sum(-2)
        (V.square() * C.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)).sum(-2)

    return {
        "eigh": timed(lambda: estimates(symmetric_eigh(C_s)[1])),
        "qr": timed(lambda: estimates(qr_refresh(C_s, Q))),
        "check": timed(lambda: offdiagonal_mass(Q.mT @ C_s @ Q, bc, shift)),
    }


def trajectory(kernel_size: int, args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, float]]:
    torch.manual_seed(0)
    data = make_synthetic(train_size=args.steps_per_epoch * args.batch, test_size=10, seed=0)
    model = ConvNet6(kernel_size=kernel_size, channels=args.channels)
    settings = OPTIMIZERS["adacov_fast"].kwargs
    optimizer = AdaCov(model.parameters(), **{**settings, "basis_refresh_warmup": args.steps_per_epoch},
                       offdiag_warmup=args.steps_per_epoch)  # fmt: skip
    convs = [p for p in model.parameters() if p.dim() == 4]
    sizes = [p.shape[0] * p.shape[1] for p in convs]
    d = kernel_size**2
    group = optimizer.param_groups[0]
    own = f"fast AdaCov: staggered, T={group['basis_refresh_every']}, drift > {group['basis_drift_threshold']:g} (default)"
    shadows = [Shadow(rule, sizes, d) for rule in rules()]
    names = [own, *(shadow.rule.name for shadow in shadows)]
    found: dict[str, dict] = {name: {"rel": [], "cos": [], "worst": []} for name in names}
    mean, std = data.normalizer()
    shift = group["cov_eps"] ** 2
    decomposed = 0
    for epoch in range(args.epochs):
        for x, y in data.train_batches(args.batch, torch.Generator().manual_seed(epoch)):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model((x.float() / 255 - mean) / std), y).backward()
            with DecompositionCounter() as counter:
                optimizer.step()
            states = [optimizer.state[p] for p in convs]
            t = int(states[0][STEP].item())
            s, bc = offdiagonal_scale(t, group["offdiag_warmup"]), 1.0 / (1.0 - group["betas"][1] ** t)
            C = torch.cat([folded_covariance(state) for state in states])
            m = torch.cat([state[EXP_AVG].view(-1, d) for state in states])
            g = torch.cat([p.grad.reshape(-1, d) for p in convs])
            C_s = blend_offdiagonal(C, s, out=torch.empty_like(C))
            w, V = symmetric_eigh(C_s)
            warm = t <= args.steps_per_epoch
            for shadow in shadows:
                shadow.step(t - args.steps_per_epoch, warm, g, C, C_s, V, s, bc, shift)
            if warm:
                continue
            decomposed += counter.blocks
            exact = apply_inverse_root(V, w, m, shift, bc)
            own_eig = torch.cat([st[BASIS_EIG_COV] * (s * bc) + st[BASIS_EIG_DIAG] * (1 - s) for st in states])
            own_direction = apply_inverse_root(torch.cat([st[BASIS] for st in states]), own_eig, m, shift)
            for name, direction in zip(names, [own_direction, *(sh.direction(m, s, bc, shift) for sh in shadows)]):
                found[name]["rel"].append(((direction - exact).norm() / exact.norm()).item())
                found[name]["cos"].append(nn.functional.cosine_similarity(direction.flatten(), exact.flatten(), 0).item())
                layers = zip(direction.split(sizes), exact.split(sizes))
                found[name]["worst"].append(min(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item() for a, b in layers))
    for shadow in shadows:
        found[shadow.rule.name] |= {"decomposed": statistics.mean(shadow.decomposed), "checked": statistics.mean(shadow.checked)}
    found[own] |= {"decomposed": decomposed / (sum(sizes) * args.epochs * args.steps_per_epoch - sum(sizes) * args.steps_per_epoch),
                   "checked": 1 / group["basis_refresh_every"]}  # fmt: skip
    costs = per_kernel_ms(C, C_s, torch.cat([st[BASIS] for st in states]), bc, shift)
    return found, costs


def summarize(kernel_size: int, found: dict[str, dict], costs: dict[str, float]) -> list[str]:
    lines = []
    for name, r in found.items():
        decomposed, checked = r.get("decomposed"), r.get("checked")
        if decomposed is None:
            share = cost = "see optimizer_step"
        else:
            per_step = decomposed * (costs["qr"] if "QR" in name else costs["eigh"]) + (checked * costs["check"] if "drift" in name else 0)
            share, cost = f"{100 * decomposed:.1f} % / {100 * checked:.1f} %", f"{1e3 * per_step:.1f}"
        lines.append(
            f"| {kernel_size}x{kernel_size} | {name} | {statistics.mean(r['rel']):.4f} | {max(r['rel']):.3f} "
            f"| {statistics.mean(r['cos']):.5f} | {min(r['cos']):.4f} | {min(r['worst']):.4f} | {share} | {cost} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--channels", type=int, nargs=6, default=[16, 16, 32, 32, 64, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    header = [
        f"Machine: {machine_description(torch.device('cpu'))}",
        f"ConvNet6 widths {'-'.join(map(str, args.channels))} on CIFAR-shaped synthetic data, batch {args.batch}, "
        f"{args.epochs} epochs of {args.steps_per_epoch} steps, trained by fast AdaCov with basis_refresh_warmup = "
        "offdiag_warmup = one epoch (which decomposes every kernel every step, so it is left out). After every later "
        "step, each rule's direction for all conv kernels is compared with the exact step from the same state.",
        "",
        "| kernel | rule | rel. error (mean) | rel. error (max) | cosine (mean) | cosine (min) | worst layer cosine "
        "| kernels decomposed / checked per step | refresh cost per step, per 1000 kernels (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    body, notes = [], []
    for k in args.kernel_sizes:
        found, costs = trajectory(k, args)
        body += summarize(k, found, costs)
        notes.append(f"{k}x{k}: per kernel, eigh with its estimates {1e3 * costs['eigh']:.2f} us, QR refresh "
                     f"{1e3 * costs['qr']:.2f} us, drift check {1e3 * costs['check']:.2f} us.")  # fmt: skip
    text = "\n".join(header + body + ["", "Per-kernel costs, measured on the trajectory's last covariances: " + " ".join(notes)])
    publish(text, args.out, "Fast AdaCov: direction error and refresh cost along a trajectory", "fast_adacov_direction.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
