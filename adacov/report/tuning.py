"""The learning-rate sweep's report: each optimizer's best lr per kernel size, by mean final train loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from adacov.errors import UserError  # noqa: E402
from adacov.report.figure import NAMES, _ordered  # noqa: E402
from adacov.training.checkpoint import CHECKPOINT  # noqa: E402
from adacov.training.run_logger import DIVERGED, ENVIRONMENT, EPOCHS  # noqa: E402

COLUMNS = ["optimizer", "k", "lr", "seed", "final_train_loss", "final_test_acc", "diverged", "lr_step"]

NOTES = """\
Each cell is the mean final-epoch train loss over the seeds at that learning rate. A run that stopped at a
non-finite loss, or logged fewer epochs than it was given, counts as an infinite loss (its mean is inf); a run
still under way (a checkpoint to resume from, or no epoch and no divergence logged yet) is left out. The
best lr has the lowest mean; "edge" marks a best lr at the end of its grid, where a wider grid might do better."""


def load_trials(root: Path) -> pd.DataFrame:
    """One row per run below ``root``: optimizer, kernel size, lr, seed, final train loss and test accuracy.

    A run still under way is left out, so that a sweep stopped part way plans it again and ``resume=true``
    finishes it: one that holds a checkpoint short of its epochs, or that logged neither an epoch nor its
    divergence (stopped before its first checkpoint)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs directory {root} does not exist: pass the directory experiment=tune wrote into")
    rows = []
    for env_file in sorted(root.rglob(ENVIRONMENT)):
        info = json.loads(env_file.read_text())
        run = env_file.parent
        epochs = pd.read_csv(run / EPOCHS) if (run / EPOCHS).is_file() else pd.DataFrame(columns=["train_loss", "test_acc"])
        finished = len(epochs) == int(info["epochs"]) and math.isfinite(float(epochs.train_loss.iloc[-1]))
        if not finished and not (run / DIVERGED).is_file() and ((run / CHECKPOINT).is_file() or epochs.empty):
            continue
        rows.append({
            "optimizer": info["optimizer"],
            "k": int(info["kernel_size"]),
            "lr": float(info["config"]["optimizer"]["lr"]),
            "lr_step": info["config"].get("lr_step", math.nan),  # half-decades from a centre lr, where the sweep used them
            "seed": int(info["seed"]),
            "final_train_loss": float(epochs.train_loss.iloc[-1]) if finished else math.inf,
            "final_test_acc": float(epochs.test_acc.iloc[-1]) if finished else math.nan,
            "diverged": not finished,
        })  # fmt: skip
    if not rows:
        raise UserError(f"no runs below {root}: expected directories with {ENVIRONMENT} (from train.py)")
    return pd.DataFrame(rows, columns=COLUMNS)


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean final train loss (inf if any seed diverged) and test accuracy per optimizer, kernel size and lr."""
    grouped = trials.groupby(["optimizer", "k", "lr"])
    return pd.DataFrame({
        "mean_train_loss": grouped.final_train_loss.mean(),
        "mean_test_acc": grouped.final_test_acc.mean(),
        "seeds": grouped.seed.count(),
        "diverged": grouped.diverged.sum(),
    }).reset_index()  # fmt: skip


def best_learning_rates(summary: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and kernel size: the lr with the lowest mean loss, that loss, and whether it is a grid edge."""
    rows = []
    for (name, k), group in summary.groupby(["optimizer", "k"]):
        best = group.loc[group.mean_train_loss.idxmin()] if group.mean_train_loss.lt(math.inf).any() else None
        rows.append({
            "optimizer": name,
            "k": k,
            "best_lr": float(best.lr) if best is not None else math.nan,
            "mean_train_loss": float(best.mean_train_loss) if best is not None else math.inf,
            "mean_test_acc": float(best.mean_test_acc) if best is not None else math.nan,
            "edge": best is not None and best.lr in (group.lr.min(), group.lr.max()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def edge_extensions(trials: pd.DataFrame, best: pd.DataFrame, max_step: int = 3, untrained_loss: float = math.inf) -> list[str]:
    """Hydra overrides for one more grid point beyond every best lr that lies on an edge of its grid.

    For sweeps that place their grid by ``lr_step`` (half-decades from a centre, experiment=tune_fashion_mnist):
    one line per kernel size and new step, ``optimizer=a,b model.kernel_size=k lr_step=s``, so that each line
    is one multirun. A grid where every lr diverged, or whose best mean loss is still at or above
    ``untrained_loss`` (a uniform prediction's, ``ln(classes)``: no lr of the grid trained), is extended
    downwards. No step goes beyond ``max_step`` half-decades from the centre, so that a loop that extends until
    nothing is left ends, also when resumed.
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for pick in best.itertuples():
        steps = trials[(trials.optimizer == pick.optimizer) & (trials.k == pick.k)].dropna(subset=["lr_step"])
        untrained = pick.mean_train_loss >= untrained_loss
        if steps.empty or not (pick.edge or untrained or math.isnan(pick.best_lr)):
            continue
        at_best = steps[steps.lr == pick.best_lr].lr_step
        low, high = int(steps.lr_step.min()), int(steps.lr_step.max())
        upwards = not untrained and len(at_best) and int(at_best.iloc[0]) == high and high != low
        step = high + 1 if upwards else low - 1
        if abs(step) <= max_step:
            groups.setdefault((int(pick.k), step), []).append(pick.optimizer)
    return [f"optimizer={','.join(names)} model.kernel_size={k} lr_step={step}" for (k, step), names in sorted(groups.items())]


def config_snippets(best: pd.DataFrame) -> str:
    """The ``tuned`` block to paste into each configs/optimizer/<name>.yaml."""
    lines = []
    for name in _ordered(best.optimizer.unique()):
        rows = best[best.optimizer == name].sort_values("k")
        values = ", ".join(f"{int(r.k)}: {yaml_float(r.best_lr)}" for r in rows.itertuples() if math.isfinite(r.best_lr))
        lines.append(f"{name}.yaml:\n  tuned:\n    lr: {{{values}}}")
    return "\n".join(lines)


def yaml_float(value: float) -> str:
    """``1.0e-3``: the way the configs write a learning rate."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def tuning_markdown(summary: pd.DataFrame, best: pd.DataFrame, header: str) -> str:
    sections = [f"# Learning-rate sweep\n\n{header}\n"]
    for k in sorted(summary.k.unique()):
        rows = []
        for name in _ordered(summary[summary.k == k].optimizer.unique()):
            group = summary[(summary.k == k) & (summary.optimizer == name)].sort_values("lr")
            pick = best[(best.k == k) & (best.optimizer == name)].iloc[0]
            cells = " ".join(f"{lr:.0e}: {loss:.3f}" if math.isfinite(loss) else f"{lr:.0e}: diverged" for lr, loss in zip(group.lr, group.mean_train_loss))
            rows.append({
                "optimizer": NAMES.get(name, name),
                "mean final train loss by lr": cells,
                "best lr": f"{pick.best_lr:.0e}" + (" (edge)" if pick.edge else ""),
                "its train loss": f"{pick.mean_train_loss:.3f}",
                "its test acc": f"{pick.mean_test_acc:.3f}",
            })  # fmt: skip
        table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f", disable_numparse=True)
        sections.append(f"## {k}x{k}\n\n{table}\n")
    sections.append(NOTES + "\n")
    return "\n".join(sections)


def plot_tuning(summary: pd.DataFrame, out: Path) -> Path:
    """Mean final train loss against lr (log scale), a line per optimizer, a panel per kernel size."""
    kernels = sorted(summary.k.unique())
    names = _ordered(summary.optimizer.unique())
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(kernels), figsize=(6 * len(kernels), 4.6), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], kernels):
        for name in names:
            group = summary[(summary.k == k) & (summary.optimizer == name)].sort_values("lr")
            finite = group[group.mean_train_loss < math.inf]
            ax.plot(finite.lr, finite.mean_train_loss, "o-", color=colors[name], lw=1.2, ms=3, label=NAMES.get(name, name))
        ax.set_xscale("log")
        ax.set_title(f"{k}x{k} filters")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean final-epoch train loss")
    axes[0][0].set_ylim(0, 2.5)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
