"""Figure 1: training loss against epochs (and against training seconds), one panel per kernel size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
import pandas as pd  # noqa: E402

from adacov.report.runs import Run  # noqa: E402

NAMES = {
    "adam": "Adam", "adacov": "AdaCov", "adacov_fast": "AdaCov (fast)",
    # fast AdaCov under other refresh rules, labelled by optimizer_name=... (docs/fast-adacov.md)
    "adacov_fast_t10_drift": "AdaCov (fast, T=10, drift 0.2)", "adacov_fast_t5_drift": "AdaCov (fast, T=5, drift 0.2)",
    "eadam": "EAdam", "mbf": "MBF",
    "kfac": "K-FAC", "ekfac": "EKFAC", "tkfac": "TKFAC", "tekfac": "TEKFAC", "rs_kfac": "RS-KFAC",
    "sre_kfac": "SRE-KFAC", "b_kfac": "B-KFAC", "b_r_kfac": "B-R-KFAC", "b_kfac_c": "B-KFAC-c",
    "kld_wrm_so": "KLD-WRM (SO)", "kld_wrm_q": "KLD-WRM (Q)", "seng": "SENG", "whitening": "Whitening",
    "whitening_recursive": "Whitening (recursive)", "soap": "SOAP", "shampoo": "Shampoo", "kron": "PSGD-Kron",
    "adahessian": "AdaHessian", "sophia": "Sophia-H", "sgd": "SGD",
}  # fmt: skip
ORDER = list(NAMES)
ACCURACY_TICKS = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
# Above this many optimizers a figure is a comparison (adacov.report.comparison_figure).
CROWDED = 6


def moving_average(values: pd.Series, window: int = 10) -> pd.Series:
    """Mean of the last ``window`` values (fewer at the start), as the paper smooths its curves."""
    return values.rolling(window, min_periods=1).mean()


def curve(runs: list[Run], x: str, window: int) -> pd.DataFrame:
    """Smoothed loss of several seeds aligned on the step: columns ``x``, ``mean``, ``std``, ``n``."""
    losses, xs = [], []
    for run in runs:
        steps = run.metrics.set_index("step")
        losses.append(moving_average(steps["loss"], window))
        if x == "epoch":
            xs.append(steps.index.to_series() / int(run.info["steps_per_epoch"]))
        else:
            xs.append(steps["step_time_s"].cumsum())
    loss, where = pd.concat(losses, axis=1), pd.concat(xs, axis=1)
    return pd.DataFrame({x: where.mean(axis=1), "mean": loss.mean(axis=1), "std": loss.std(axis=1).fillna(0), "n": loss.count(axis=1)})


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def accuracy_curve(runs: list[Run]) -> pd.DataFrame:
    """Test accuracy after each epoch over several seeds: columns ``epoch``, ``mean``, ``std``, ``n``."""
    acc = pd.concat([r.epochs.set_index("epoch")["test_acc"] for r in runs], axis=1)
    return pd.DataFrame({"mean": acc.mean(axis=1), "std": acc.std(axis=1).fillna(0), "n": acc.count(axis=1)}).reset_index()


def plot_figure(runs: list[Run], out: Path, x: str = "epoch", window: int = 10, formats=("png",), title: str = "") -> list[Path]:
    """Write ``out.{format}``: a panel per kernel size, a line per optimizer (mean, +-1 std band over seeds).

    The loss axis ends at 1.1x the highest first-step loss; a seed that stopped early (diverged) is marked x
    at its last step, on the axis's top edge. Against epochs, a second row shows each seed's test accuracy
    after each epoch, when the runs logged it. For a few optimizers, as in the paper; a comparison of many is drawn by
    :mod:`adacov.report.comparison_figure`.
    """
    kernels = sorted({r.kernel_size for r in runs})
    optimizers = _ordered({r.optimizer for r in runs})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(optimizers)}
    accuracy = x == "epoch" and all("test_acc" in r.epochs for r in runs)
    rows = 2 if accuracy else 1
    fig, axes = plt.subplots(
        rows, len(kernels), figsize=(4.6 * len(kernels), 4.2 + 2.8 * (rows - 1)), squeeze=False, sharey="row",
        height_ratios=[3, 2][:rows],
    )  # fmt: skip
    # The loss axis ends a little above the initial loss: a diverging seed would otherwise flatten every curve.
    start = 1.1 * max(float(r.metrics.loss.iloc[0]) for r in runs)
    for ax, k in zip(axes[0], kernels):
        for name in optimizers:
            group = [r for r in runs if r.kernel_size == k and r.optimizer == name]
            if not group:
                continue
            c = curve(group, x, window)
            seeds, stopped = len(group), sum(r.stopped_early for r in group)
            label = NAMES.get(name, name) + (f" (mean ± 1 std, {seeds} seeds" + (f"; {stopped} stopped early, x)" if stopped else ")") if seeds > 1 else "")
            ax.plot(c[x], c["mean"], color=colors[name], lw=1.2, label=label)
            if seeds > 1:
                ax.fill_between(c[x], c["mean"] - c["std"], c["mean"] + c["std"], color=colors[name], alpha=0.25, lw=0)
            for run in (r for r in group if r.stopped_early):
                ax.plot(c[x][run.metrics.step.iloc[-1]], start, marker="x", ms=8, mew=2, color=colors[name], clip_on=False)
        ax.set_title(f"{k}x{k} filters")
        ax.set_xlabel("epochs" if x == "epoch" else "training time (s, sum of step times)")
        ax.grid(alpha=0.3)
        ax.legend()
    if accuracy:
        _plot_accuracy(axes[1], runs, kernels, optimizers, colors)
    axes[0][0].set_ylabel(f"training loss (moving average of {window} steps)")
    axes[0][0].set_ylim(0, start)
    if title:
        fig.suptitle(title + (" (bottom: test accuracy)" if accuracy else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, formats)


def save_figure(fig, out: Path, formats) -> list[Path]:
    """Write ``out.{format}`` for each format and close ``fig``. A PDF carries no creation date, so that the same
    runs give the same bytes and a rebuilt report changes only where its runs did."""
    paths = []
    for fmt in formats:
        path = out.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"CreationDate": None} if fmt == "pdf" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def _plot_accuracy(axes, runs: list[Run], kernels: list[int], optimizers: list[str], colors: dict) -> None:
    """One panel per kernel size: each seed's test accuracy after each epoch, on a logit axis.

    Seeds, not a mean with bars: where some seeds of an optimizer stay at chance and others learn, a mean
    lies between them and describes none. The logit axis keeps a difference of one point near 90 %
    visible on the same panel as a seed at chance (10 %).
    """
    for ax, k in zip(axes, kernels):
        for name in optimizers:
            for run in (r for r in runs if r.kernel_size == k and r.optimizer == name and not r.epochs.empty):
                ax.plot(run.epochs.epoch, run.epochs.test_acc, color=colors[name], marker="o", ms=3, lw=1, alpha=0.7)
        ax.set_yscale("logit")
        ax.set_yticks(ACCURACY_TICKS, [f"{100 * t:g} %" for t in ACCURACY_TICKS])
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("epochs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, each seed (logit axis)")
