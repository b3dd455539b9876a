"""Figure 1: training loss against epochs (and against training seconds), one panel per kernel size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from adacov.report.runs import Run  # noqa: E402

NAMES = {
    "adam": "Adam", "adacov": "AdaCov", "adacov_fast": "AdaCov (fast)", "eadam": "EAdam", "mbf": "MBF",
    "kfac": "K-FAC", "ekfac": "EKFAC", "tkfac": "TKFAC", "tekfac": "TEKFAC", "soap": "SOAP", "shampoo": "Shampoo",
    "kron": "PSGD-Kron", "adahessian": "AdaHessian", "sophia": "Sophia-H", "sgd": "SGD",
}  # fmt: skip
ORDER = list(NAMES)
# Above this many optimizers a figure is a comparison: logarithmic loss axis, one legend beside the panels.
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


def plot_figure(runs: list[Run], out: Path, x: str = "epoch", window: int = 10, formats=("png",), title: str = "") -> list[Path]:
    """Write ``out.{format}``: a panel per kernel size, a line per optimizer (mean, +-1 std band over seeds).

    With more than ``CROWDED`` optimizers (the comparison) the loss axis is logarithmic, from half the lowest
    mean loss to 1.2x the highest starting one, so that one optimizer's early spike does not flatten the
    others, and one legend beside the panels replaces a legend in each.
    """
    kernels = sorted({r.kernel_size for r in runs})
    optimizers = _ordered({r.optimizer for r in runs})
    crowded = len(optimizers) > CROWDED
    colors = {name: plt.get_cmap("tab10" if len(optimizers) <= 10 else "tab20")(i % 20) for i, name in enumerate(optimizers)}
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.6 * len(kernels), 4.2), squeeze=False, sharey=True)
    starts, lows, legend = [], [], {}
    for ax, k in zip(axes[0], kernels):
        for name in optimizers:
            group = [r for r in runs if r.kernel_size == k and r.optimizer == name]
            if not group:
                continue
            c = curve(group, x, window)
            seeds = len(group)
            label = NAMES.get(name, name) + (f" (mean ± 1 std, {seeds} seeds)" if seeds > 1 and not crowded else "")
            (line,) = ax.plot(c[x], c["mean"], color=colors[name], lw=1.2, label=label)
            legend.setdefault(label, line)
            starts.append(c["mean"].iloc[0])
            lows.append(c["mean"].min())
            if seeds > 1:
                ax.fill_between(c[x], c["mean"] - c["std"], c["mean"] + c["std"], color=colors[name], alpha=0.25, lw=0)
        ax.set_title(f"{k}x{k} filters")
        ax.set_xlabel("epochs" if x == "epoch" else "training time (s, sum of step times)")
        ax.grid(alpha=0.3)
        if not crowded:
            ax.legend()
    axes[0][0].set_ylabel(f"training loss (moving average of {window} steps)")
    if crowded:
        axes[0][0].set_yscale("log")
        axes[0][0].set_ylim(0.5 * min(lows), 1.2 * max(starts))
        fig.legend(legend.values(), legend.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), title="mean ± 1 std over seeds")
    else:
        axes[0][0].set_ylim(bottom=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths = []
    for fmt in formats:
        path = out.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=130, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths
