"""The comparison's figures: AdaCov against each family in small multiples, and the ranking as a dot plot."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import pandas as pd  # noqa: E402

from adacov.report.figure import NAMES, curve, save_figure as _save  # noqa: E402
from adacov.report.runs import Run  # noqa: E402

# The methods AdaCov is compared with, grouped by what their preconditioner is.
FAMILIES = {
    "Adam-like and mini-block": ["eadam", "mbf", "sgd"],
    "K-FAC family": ["kfac", "ekfac", "tkfac", "tekfac", "kld_wrm_so", "kld_wrm_q"],
    "Low-rank K-FACs": ["rs_kfac", "sre_kfac", "b_kfac", "b_r_kfac", "b_kfac_c"],
    "SENG and whitening": ["seng", "whitening", "whitening_recursive"],
    "Kronecker peers": ["soap", "shampoo", "kron"],
    "Hessian-based": ["adahessian", "sophia"],
}
SUBJECTS = {  # drawn on top, in every panel: AdaCov, fast AdaCov, and fast AdaCov under another refresh rule
    "adacov": ("#d62728", "-"), "adacov_fast": ("#ff7f0e", "--"), "adacov_fast_t5_drift": ("#e377c2", ":"),
}  # fmt: skip
REFERENCE = "adam"  # drawn in every panel as the baseline
MEMBER_COLORS = ["#4c72b0", "#55a868", "#8172b2", "#937860", "#64b5cd", "#8c8c8c"]  # muted; a family has at most 6
FAMILY_COLORS = {
    "Adam-like and mini-block": "#4c72b0", "K-FAC family": "#55a868", "Low-rank K-FACs": "#64b5cd",
    "SENG and whitening": "#8c8c8c", "Kronecker peers": "#8172b2", "Hessian-based": "#937860",
}  # fmt: skip


def family_of(name: str) -> str:
    return next((family for family, members in FAMILIES.items() if name in members), "other")


def plot_comparison(runs: list[Run], out: Path, x: str = "epoch", window: int = 10, formats=("png",), title: str = "") -> list[Path]:
    """Write ``out.{format}``: a row per kernel size, a column per family present in ``runs``.

    Each panel draws the family's members (mean over seeds, thin, muted), Adam as a dotted black reference,
    and AdaCov and fast AdaCov on top (mean and +-1 std band, thick, strong colours). The loss axis is
    logarithmic and shared, so panels compare across families.
    """
    kernels = sorted({r.kernel_size for r in runs})
    present = {r.optimizer for r in runs}
    families = [f for f, members in FAMILIES.items() if present & set(members)]
    others = sorted(present - set(SUBJECTS) - {REFERENCE} - {m for members in FAMILIES.values() for m in members})
    if others:
        families.append("other")
    fig, axes = plt.subplots(
        len(kernels), len(families), figsize=(3.9 * len(families), 3.3 * len(kernels)), squeeze=False, sharex=True, sharey=True
    )
    lows, starts = [], []
    for row, k in enumerate(kernels):
        at_k = [r for r in runs if r.kernel_size == k]
        for col, family in enumerate(families):
            ax = axes[row][col]
            members = others if family == "other" else [m for m in FAMILIES[family] if m in present]
            for i, name in enumerate(members):
                _draw(ax, at_k, name, x, window, MEMBER_COLORS[i % len(MEMBER_COLORS)], "-", 1.3, band=False, lows=lows, starts=starts)
            _draw(ax, at_k, REFERENCE, x, window, "#222222", ":", 1.5, band=False, lows=lows, starts=starts)
            for name, (color, style) in SUBJECTS.items():
                _draw(ax, at_k, name, x, window, color, style, 2.6, band=True, lows=lows, starts=starts)
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(family, fontsize=11)
            if row == len(kernels) - 1:
                ax.set_xlabel("epochs" if x == "epoch" else "training time (s, sum of step times)")
        axes[row][0].set_ylabel(f"{k}x{k} filters: training loss\n(moving average of {window} steps)")
    for col, family in enumerate(families):  # one legend per column, on top, for the lines of every row
        members = others if family == "other" else FAMILIES[family]
        drawn = {label: line for ax in axes[:, col] for line, label in zip(*ax.get_legend_handles_labels())}
        order = [_label(name) for name in [*members, REFERENCE, *SUBJECTS] if _label(name) in drawn]
        axes[0][col].legend([drawn[label] for label in order], order, fontsize=7.5, loc="upper right")
    axes[0][0].set_yscale("log")
    if lows:
        axes[0][0].set_ylim(0.8 * min(lows), 1.25 * max(starts))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out, formats)


def _label(name: str) -> str:
    return NAMES.get(name, name) + (" (reference)" if name == REFERENCE else "")


def _draw(ax, runs: list[Run], name: str, x: str, window: int, color: str, style: str, width: float, band: bool, lows, starts) -> None:
    group = [r for r in runs if r.optimizer == name]
    if not group:
        return
    c = curve(group, x, window)
    ax.plot(c[x], c["mean"], color=color, ls=style, lw=width, label=_label(name), zorder=3 if band else 2)
    if band and len(group) > 1:
        ax.fill_between(c[x], (c["mean"] - c["std"]).clip(lower=1e-6), c["mean"] + c["std"], color=color, alpha=0.18, lw=0, zorder=1)
    lows.append(c["mean"].min())
    starts.append(c["mean"].iloc[0])


def final_metrics(runs: list[Run]) -> pd.DataFrame:
    """Per kernel size and optimizer: mean and std over the seeds that finished of the last epoch's train loss and
    test accuracy (NaN where none did), how many finished ("seeds"), and how many stopped early ("stopped")."""
    rows = [
        {"k": r.kernel_size, "optimizer": r.optimizer, "finished": not (r.epochs.empty or r.stopped_early),
         "loss": math.nan if r.epochs.empty else float(r.epochs.train_loss.iloc[-1]),
         "acc": math.nan if r.epochs.empty else float(r.epochs.test_acc.iloc[-1])}
        for r in runs
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.loc[~frame.finished, ["loss", "acc"]] = math.nan
    table = frame.groupby(["k", "optimizer"]).agg(
        loss=("loss", "mean"), loss_std=("loss", "std"), acc=("acc", "mean"), acc_std=("acc", "std"),
        seeds=("finished", "sum"), stopped=("finished", lambda f: int((~f).sum())),
    )  # fmt: skip
    return table.fillna({"loss_std": 0.0, "acc_std": 0.0}).reset_index()


def _dot_color(name: str) -> str:
    """A method's colour in the dot plots: its own for AdaCov's, its family's for the others."""
    return SUBJECTS[name][0] if name in SUBJECTS else FAMILY_COLORS.get(family_of(name), "#222222")


def _ranked_label(row: pd.Series) -> str:
    """The optimizer's name, and how many of its seeds stopped early (diverged) where any did."""
    name = NAMES.get(row.optimizer, row.optimizer)
    if not row.stopped:
        return name
    total = row.seeds + row.stopped
    return f"{name} ({'all' if not row.seeds else row.stopped} of {total} stopped early)"


def plot_ranking(runs: list[Run], out: Path, formats=("png",), title: str = "") -> list[Path]:
    """Write ``out.{format}``: per kernel size, the methods ranked by final train loss (log axis) and, beside it,
    their test accuracy, as dots with +-1 std bars over the seeds that finished; AdaCov and fast AdaCov in their
    strong colours, the others in their family's colour, Adam's mean as a dotted line. A label says how many seeds
    stopped early; a method none of whose seeds finished is listed last, without a dot."""
    finals = final_metrics(runs)
    kernels = sorted(finals.k.unique())
    height = max(2.6, 0.28 * finals.optimizer.nunique() + 1.0)
    fig, axes = plt.subplots(len(kernels), 2, figsize=(10, height * len(kernels)), squeeze=False)
    for row, k in enumerate(kernels):
        table = finals[finals.k == k].sort_values("loss", ascending=False, na_position="first").reset_index(drop=True)
        for col, (metric, label) in enumerate((("loss", "final train loss (log scale)"), ("acc", "final test accuracy"))):
            ax = axes[row][col]
            for i, r in table.iterrows():
                ax.errorbar(r[metric], i, xerr=r[f"{metric}_std"], fmt="o", color=_dot_color(r.optimizer),
                            ms=8 if r.optimizer in SUBJECTS else 5, capsize=2.5, lw=1.4)  # fmt: skip
            reference = table[table.optimizer == REFERENCE]
            if not reference.empty:
                ax.axvline(float(reference[metric].iloc[0]), color="#222222", ls=":", lw=1.2)
            ax.set_yticks(range(len(table)))
            ax.set_yticklabels([_ranked_label(r) for _, r in table.iterrows()])
            for tick, name in zip(ax.get_yticklabels(), table.optimizer):
                if name in SUBJECTS:
                    tick.set_color(SUBJECTS[name][0])
                    tick.set_fontweight("bold")
            if metric == "loss":
                ax.set_xscale("log")
                low, high = ax.get_xlim()
                # 1-2-5 ticks while they fit; over more than three decades (a diverging method) powers of ten
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if high / low <= 1000 else (1.0,)))
                ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.grid(alpha=0.3, axis="x", which="both")
            ax.set_title(f"{k}x{k} filters: {'lower' if metric == 'loss' else 'higher'} is better (mean ± 1 std over seeds)", fontsize=9)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in FAMILY_COLORS.items() if f in set(finals.optimizer.map(family_of))]
    handles.append(plt.Line2D([], [], color="#222222", ls=":", label="Adam's mean"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, -0.01))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out, formats)


# The cost plot's loss axis ends at this multiple of Adam's final loss; a method above it (one that blew up or
# never trained) is drawn at the top edge as a triangle with its mean in its label, so it does not squash the rest.
COST_PLOT_TOP = 2.0


def plot_cost(comparison: pd.DataFrame, out: Path, formats=("png",), title: str = "") -> list[Path]:
    """Write ``out.{format}``: per kernel size, each method's final train loss (mean +- 1 std over seeds) against its
    step time over Adam's from the benchmark (``comparison``'s "step time vs Adam, bench"), so that what a method
    gains and what it costs read off one plot: below Adam's dotted line it ends lower, right of 1 it costs more.
    The loss axis ends at ``COST_PLOT_TOP`` times Adam's final loss (where a panel has Adam)."""
    keys = {shown: name for name, shown in NAMES.items()}
    kernels = list(dict.fromkeys(comparison.kernel))
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.4 * len(kernels), 4.4), squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        table = comparison[comparison.kernel == kernel]
        names = table.optimizer.map(lambda shown: keys.get(shown, shown))
        reference = table[names == REFERENCE]["final train loss"]
        top = COST_PLOT_TOP * float(reference.iloc[0]) if not reference.empty else math.inf
        points = []
        for name, (_, r) in zip(names, table.iterrows()):
            color = _dot_color(name)
            x, y, spread = r["step time vs Adam, bench"], r["final train loss"], r["± std"]
            size, off_scale = 8 if name in SUBJECTS else 5, y > top
            if off_scale:
                ax.plot(x, top, marker="^", ls="", color=color, ms=size, clip_on=False)
            else:
                ax.errorbar(x, y, yerr=0 if math.isnan(spread) else spread, fmt="o", color=color, ms=size, capsize=2.5, lw=1.2)
            if math.isfinite(x) and math.isfinite(y):  # a method without a bench ratio or a finished seed has no point
                points.append({"name": name, "shown": r.optimizer, "x": x, "y": min(y, top), "loss": y, "off": off_scale})
            if name == REFERENCE:
                ax.axhline(y, color="#222222", ls=":", lw=1.2)
        row = 0
        for group in _close_groups(points):
            first = group[0]
            label = ", ".join(p["shown"] for p in group)
            if first["off"]:
                losses = ", ".join(format(p["loss"], ".3g") for p in group)
                label, row = f"{label} ({losses}, off scale)", row + 1
            ax.annotate(label, (first["x"], first["y"]), xytext=(5, -10 * row if first["off"] else 3), textcoords="offset points",
                        fontsize=8, color=_dot_color(first["name"]), fontweight="bold" if first["name"] in SUBJECTS else "normal")  # fmt: skip
        if math.isfinite(top):
            ax.set_ylim(top=top)
        ax.margins(x=0.15)  # room for the labels right of the points
        ax.set_title(f"{kernel} filters", fontsize=10)
        ax.set_xlabel("step time over Adam's (benchmark, interleaved)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final train loss (mean ± 1 std over seeds; axis to {COST_PLOT_TOP:g}x Adam's)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out, formats)


def _close_groups(points: list[dict], near: float = 0.03) -> list[list[dict]]:
    """The points in groups that share one label: single linkage within ``near`` of the panel's x and y ranges (the
    five low-rank K-FACs end as one cluster), never across the plot's edge; AdaCov's methods keep their own labels.
    Off-scale groups come last, left to right, so that their labels stack down from the top edge."""
    xs, ys = [p["x"] for p in points] or [0.0], [p["y"] for p in points] or [0.0]
    dx, dy = near * (max(xs) - min(xs) or 1.0), near * (max(ys) - min(ys) or 1.0)
    groups: list[list[dict]] = []
    for point in points:
        joined = [g for g in groups if point["name"] not in SUBJECTS and any(
            q["name"] not in SUBJECTS and q["off"] == point["off"] and abs(q["x"] - point["x"]) <= dx
            and abs(q["y"] - point["y"]) <= dy for q in g)]  # fmt: skip
        groups = [g for g in groups if g not in joined] + [sum(joined, []) + [point]]
    groups = [sorted(g, key=points.index) for g in groups]
    return sorted(groups, key=lambda g: (g[0]["off"], g[0]["x"] if g[0]["off"] else points.index(g[0])))


__all__ = ["FAMILIES", "family_of", "final_metrics", "plot_comparison", "plot_cost", "plot_ranking"]
