"""The report of experiment=loop_methods_*: SALR on and off, the three data orders, and the batch-size lr rule.

One directory holds the runs of all three studies (each run named by every setting they vary). A study is a
slice of them, all at ``rr`` unless it varies the order: SALR on and off at the experiment's batch size (the
one SALR's runs use) for every lr that has SALR runs; the orders without SALR at that batch size and the tuned
lr (``lr_step = 0``); the batch study without SALR, every batch size and lr. The sharpness at the end of each
SALR-study run is measured from its checkpoint (``measure_sharpness``) into ``sharpness.json``, which the
report reads, so the report itself needs no checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from pandas.api.types import is_numeric_dtype

from adacov.errors import UserError
from adacov.report.figure import NAMES, _ordered
from adacov.training.checkpoint import CHECKPOINT
from adacov.training.run_logger import CONFIG, ENVIRONMENT, EPOCHS
from adacov.training.salr import SALR_LOG
from adacov.training.sharpness import salr_sharpness, top_hessian_eigenvalue

SHARPNESS = "sharpness.json"
ORDERS = ("rr", "so", "ig")
FLAT = 0.1  # a batch size whose best final loss is within 10% of ln(classes), a uniform prediction's, trained at no lr
BATCH_NOTE = (
    "Final train loss (mean over seeds; inf: diverged) at each lr; **bold**: the grid's best; refined: the minimum "
    "of a parabola in log10(lr) through the best point and its neighbours (the grid's best where that is an edge); "
    "flat: the best final loss within 10% of ln(classes), a uniform prediction's loss (no lr trained), left out of "
    "the fit of alpha."
)


def load_runs(root: Path) -> pd.DataFrame:
    """One row per run below ``root``: its settings, final metrics, mean epoch time and measured sharpness.

    A run that stopped early or at a non-finite loss is ``diverged`` with an infinite final train loss.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"runs directory {root} does not exist: pass the directory experiment=loop_methods_* wrote into"
        )
    rows = []
    for env_file in sorted(root.rglob(ENVIRONMENT)):
        info = json.loads(env_file.read_text())
        run_dir = env_file.parent
        epochs = pd.read_csv(run_dir / EPOCHS) if (run_dir / EPOCHS).is_file() else pd.DataFrame(columns=["train_loss"])
        finished = len(epochs) == int(info["epochs"]) and math.isfinite(float(epochs.train_loss.iloc[-1]))
        sharpness = json.loads((run_dir / SHARPNESS).read_text()) if (run_dir / SHARPNESS).is_file() else {}
        rows.append({
            "run": run_dir.name,
            "path": str(run_dir),
            "optimizer": info["optimizer"],
            "batch_size": int(info["batch_size"]),
            "lr": float(info["lr"][0]),
            "lr_step": int(info["config"].get("lr_step", 0)),
            "data_order": info.get("data_order", "rr"),
            "salr": bool(info.get("salr", False)),
            "seed": int(info["seed"]),
            "epochs": int(info["epochs"]),
            "first_epoch_loss": float(epochs.train_loss.iloc[0]) if len(epochs) else math.nan,
            "final_train_loss": float(epochs.train_loss.iloc[-1]) if finished else math.inf,
            "final_test_acc": float(epochs.test_acc.iloc[-1]) if finished else math.nan,
            "epoch_time_s": float(epochs.epoch_time_s.mean()) if finished else math.nan,
            "diverged": not finished,
            "salr_sharpness": sharpness.get("salr_sharpness", math.nan),
            "hessian_top": sharpness.get("hessian_top_eigenvalue", math.nan),
            "device": info.get("device_name", ""),
        })  # fmt: skip
    if not rows:
        raise UserError(f"no runs below {root}: expected directories with {ENVIRONMENT} (from train.py)")
    return pd.DataFrame(rows)


def base_batch(runs: pd.DataFrame) -> int:
    """The experiment's own batch size: the one the SALR and so / ig runs used (of all runs, where there are none)."""
    varied = runs[runs.salr | (runs.data_order != "rr")]
    return int((varied if not varied.empty else runs).batch_size.mode().iloc[0])


def salr_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """SALR on and off (rr, base batch) at each optimizer's learning rates and epoch count that have SALR runs."""
    base = runs[(runs.batch_size == base_batch(runs)) & (runs.data_order == "rr")]
    with_salr = set(zip(base[base.salr].optimizer, base[base.salr].lr, base[base.salr].epochs))
    return base[[key in with_salr for key in zip(base.optimizer, base.lr, base.epochs)]]


def order_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The data orders without SALR at the base batch and the tuned lr, for the optimizers and epoch count that
    ran so or ig."""
    chosen = runs[(runs.batch_size == base_batch(runs)) & (runs.lr_step == 0) & ~runs.salr]
    varied = chosen[chosen.data_order != "rr"]
    return chosen[chosen.optimizer.isin(varied.optimizer) & chosen.epochs.isin(varied.epochs)]


def measure_sharpness(run_dir: Path, images: int = 2048, iterations: int = 20) -> dict[str, float]:
    """SALR's sharpness estimate (the default settings: clamped, 5 + 5 steps of 1e-3) and the Hessian's top
    eigenvalue (power iteration, ``iterations`` Hessian-vector products) of the mean training cross-entropy
    at the run's final weights, in float64, on its first ``images`` training images without augmentation
    (normalized as in training), with the net in training mode as during training."""
    from adacov.training.loop import instantiate

    cfg = OmegaConf.load(run_dir / CONFIG)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, in_channels=data.channels, image_size=data.image_size, num_classes=data.num_classes)
    model.load_state_dict(torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["model"])
    model = model.double().train()
    mean, std = (t.double() for t in data.normalizer())
    x = (data.train_x[:images].double().div(255) - mean) / std
    y = data.train_y[:images]
    generator = torch.Generator().manual_seed(0)
    return {
        "salr_sharpness": salr_sharpness(model, x, y),
        "hessian_top_eigenvalue": top_hessian_eigenvalue(model, x, y, iterations, generator),
        "images": int(x.shape[0]),
        "iterations": iterations,
    }


def measure_missing(runs: pd.DataFrame, images: int) -> list[str]:
    """Write ``sharpness.json`` for each finished run of the SALR study that has a checkpoint and no such file yet."""
    measured = []
    for run in salr_runs(runs).itertuples():
        run_dir = Path(run.path)
        if run.diverged or (run_dir / SHARPNESS).is_file() or not (run_dir / CHECKPOINT).is_file():
            continue
        (run_dir / SHARPNESS).write_text(json.dumps(measure_sharpness(run_dir, images), indent=2) + "\n")
        measured.append(run.run)
    return measured


def salr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and lr0, SALR off and on: mean ± std over seeds."""
    columns = ["final_train_loss", "final_test_acc", "salr_sharpness", "hessian_top", "epoch_time_s"]
    return _by_setting(salr_runs(runs), ["lr", "salr"], columns)


def order_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and data order: mean ± std over seeds."""
    return _by_setting(order_runs(runs), ["data_order"], ["final_train_loss", "final_test_acc"])


def _by_setting(runs: pd.DataFrame, settings: list[str], columns: list[str]) -> pd.DataFrame:
    """Mean and std of ``columns`` per optimizer and ``settings``, in the report's order (orders as rr, so, ig)."""
    rows = []
    for values, group in runs.groupby(["optimizer", *settings]):
        row = dict(zip(["optimizer", *settings], values)) | {"seeds": len(group), "diverged": int(group.diverged.sum())}
        for column in columns:
            row[column] = group[column].mean()
            row[f"{column}_std"] = group[column].std()
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    rank = {name: i for i, name in enumerate([*_ordered(table.optimizer.unique()), *ORDERS])}
    by = ["optimizer", *settings]
    return table.sort_values(by, key=lambda c: c if is_numeric_dtype(c) else c.map(rank)).reset_index(drop=True)


def batch_table(runs: pd.DataFrame, classes: int) -> pd.DataFrame:
    """Per optimizer and batch size (rr, no SALR): mean final train loss at each lr, the grid's best lr and
    the best lr refined by a parabola in ``log10(lr)`` through the best point and its two neighbours. ``flat``:
    the best final loss is above ``1 - FLAT`` times ``ln(classes)``, a uniform prediction's loss over the task's
    ``classes``, so no lr trained and the row has no best lr to speak of (an lr that blew up does not move that
    reference). At the base batch only the seeds and epoch count of the other batch sizes' runs count (the other
    studies ran it on more seeds, maybe for longer)."""
    chosen = runs[(runs.data_order == "rr") & ~runs.salr]
    others = chosen[chosen.batch_size != base_batch(runs)]
    if not others.empty:
        chosen = chosen[chosen.seed.isin(others.seed) & chosen.epochs.isin(others.epochs)]
    rows = []
    for (optimizer, batch), group in chosen.groupby(["optimizer", "batch_size"]):
        losses = group.groupby("lr").final_train_loss.mean().sort_index()
        if losses.size < 2:
            continue
        best = int(np.argmin(losses.values))
        edge = best in (0, losses.size - 1)
        flat = bool(losses.values[best] > (1 - FLAT) * math.log(classes))
        refined = (
            losses.index[best]
            if edge or not np.isfinite(losses.values[best - 1 : best + 2]).all()
            else _vertex(losses, best)
        )
        rows.append({
            "optimizer": optimizer, "batch_size": batch, "best_lr": float(losses.index[best]), "refined_lr": float(refined),
            "best_loss": float(losses.values[best]), "edge": edge, "flat": flat, "seeds": int(group.seed.nunique()),
            "losses": {float(lr): float(v) for lr, v in losses.items()},
        })  # fmt: skip
    return pd.DataFrame(rows)


def _vertex(losses: pd.Series, best: int) -> float:
    """The minimum of the parabola through the best grid point and its neighbours, in ``log10(lr)``."""
    x = np.log10(losses.index.values[best - 1 : best + 2].astype(float))
    a, b, _ = np.polyfit(x, losses.values[best - 1 : best + 2], 2)
    return float(10 ** np.clip(-b / (2 * a), x[0], x[2])) if a > 0 else float(losses.index[best])


SCALING_EXPONENTS = {"none": 0.0, "square root": 0.5, "linear": 1.0}  # lr ~ B^alpha under each lr_scaling rule


def scaling_exponents(batch: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer, the slope ``alpha`` of ``log(refined best lr)`` against ``log(B)`` (least squares over the
    batch sizes that are not flat), and the nearest of the rules ``lr_scaling`` offers: linear scaling predicts 1,
    square-root scaling 0.5, none (one lr for every batch size) 0."""
    rows = []
    for optimizer, group in batch.groupby("optimizer"):
        fitted = group[~group.flat]
        if fitted.batch_size.nunique() < 2:
            continue
        alpha = float(np.polyfit(np.log(fitted.batch_size.values), np.log(fitted.refined_lr.values), 1)[0])
        closer = min(SCALING_EXPONENTS, key=lambda rule: abs(alpha - SCALING_EXPONENTS[rule]))
        rows.append({
            "optimizer": optimizer, "alpha": alpha, "closer_to": closer, "batch_sizes": ", ".join(map(str, fitted.batch_size)),
            "edge_points": int(fitted.edge.sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def report_markdown(runs: pd.DataFrame, batch: pd.DataFrame, header: str) -> str:
    """The three studies' tables as markdown, under ``header``; ``batch`` is ``batch_table(runs, classes)``."""
    lines = [header, ""]
    salr = salr_table(runs)
    if not salr.empty:
        lines += [
            "## SALR", "",
            ("| optimizer | lr0 | SALR | final train loss | test accuracy | SALR sharpness at the end "
             "| top Hessian eigenvalue | s per epoch | seeds |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for row in salr.itertuples():
            lines.append(
                f"| {NAMES.get(row.optimizer, row.optimizer)} | {row.lr:g} | {'on' if row.salr else 'off'} | "
                f"{_pm(row, 'final_train_loss', 4)} | "
                f"{_pm(row, 'final_test_acc', 4)} | {_pm(row, 'salr_sharpness', 4)} | {_pm(row, 'hessian_top', 1)} | "
                f"{_pm(row, 'epoch_time_s', 2)} | {row.seeds} |"
            )
        lines.append("")
    orders = order_table(runs)
    if not orders.empty:
        lines += [
            "## Data orders", "",
            "| optimizer | order | final train loss | test accuracy | seeds |",
            "|---|---|---|---|---|",
        ]  # fmt: skip
        for row in orders.itertuples():
            lines.append(
                f"| {NAMES.get(row.optimizer, row.optimizer)} | {row.data_order} | {_pm(row, 'final_train_loss', 4)} | "
                f"{_pm(row, 'final_test_acc', 4)} | {row.seeds} |"
            )
        lines.append("")
    if not batch.empty:
        lrs = sorted({lr for losses in batch.losses for lr in losses})
        lines += [
            "## Batch size and learning rate", "",
            BATCH_NOTE, "",
            "| optimizer | batch | " + " | ".join(f"{lr:g}" for lr in lrs) + " | refined best lr | seeds |",
            "|---|---|" + "---|" * len(lrs) + "---|---|",
        ]  # fmt: skip
        for row in batch.itertuples():
            cells = [_loss_cell(row.losses.get(lr), lr == row.best_lr) for lr in lrs]
            best = "flat" if row.flat else f"{row.refined_lr:.2g}" + (" (edge)" if row.edge else "")
            lines.append(
                f"| {NAMES.get(row.optimizer, row.optimizer)} | {row.batch_size} | {' | '.join(cells)} | {best} | {row.seeds} |"
            )
        lines += [
            "",
            "| optimizer | alpha in best lr ~ B^alpha | closer to | fitted on batch sizes | best lr on a grid edge |",
            "|---|---|---|---|---|",
        ]
        for row in scaling_exponents(batch).itertuples():
            lines.append(
                f"| {NAMES.get(row.optimizer, row.optimizer)} | {row.alpha:.2f} | {row.closer_to} | {row.batch_sizes} | "
                f"{row.edge_points} |"
            )
        lines.append("")
    return "\n".join(lines)


def _pm(row, column: str, digits: int) -> str:
    mean, std = getattr(row, column), getattr(row, f"{column}_std")
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _loss_cell(loss: float | None, best: bool) -> str:
    if loss is None:
        return ""
    text = "inf" if not math.isfinite(loss) else f"{loss:.3f}"
    return f"**{text}**" if best else text


def plot_report(runs: pd.DataFrame, batch: pd.DataFrame, out: Path) -> Path:
    """``out.png``: SALR's train loss and lr factor per epoch, the orders' train loss, the best lr per batch size
    (``batch``, from ``batch_table``)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(_ordered(runs.optimizer.unique()))}
    with_salr = salr_runs(runs)
    tuned = dict(zip(runs[runs.lr_step == 0].optimizer, runs[runs.lr_step == 0].lr))
    for (name, lr), group in with_salr.groupby(["optimizer", "lr"]):
        width = 1.6 if lr == tuned.get(name) else 0.8  # the tuned lr thick, others thin
        for salr, style in ((False, "-"), (True, "--")):
            runs_of = group[group.salr == salr]
            curve = _epoch_mean(runs_of, "train_loss")
            label = f"{NAMES.get(name, name)}, lr0 {lr:g}{', SALR' if salr else ''} ({len(runs_of)} seeds)"
            if curve is not None:
                axes[0, 0].plot(curve.index, curve.values, style, lw=width, color=colors[name], label=label)
            factors = _salr_factor_per_epoch(runs_of) if salr else None
            if factors is not None:
                axes[0, 1].plot(factors.index, factors.values, style, lw=width, color=colors[name], label=label)
    orders = order_runs(runs)
    for name, group in orders.groupby("optimizer"):
        for order, style in zip(ORDERS, ("-", "--", ":")):
            curve = _epoch_mean(group[group.data_order == order], "train_loss")
            if curve is not None:
                label = f"{NAMES.get(name, name)}, {order}"
                axes[1, 0].plot(curve.index, curve.values, style, color=colors[name], label=label)
    axes[0, 0].set(yscale="log", xlabel="epoch", ylabel="train loss (epoch mean)", title="SALR on and off")
    axes[0, 1].set(xlabel="epoch", ylabel="SALR's lr / lr0 (epoch mean)", title="the lr SALR set")
    axes[0, 1].axhline(1.0, color="grey", lw=0.8)
    axes[1, 0].set(yscale="log", xlabel="epoch", ylabel="train loss (epoch mean)", title="data orders (no SALR)")
    ax = axes[1, 1]
    for name, group in batch.groupby("optimizer") if not batch.empty else ():
        group = group[~group.flat].sort_values("batch_size")
        ax.plot(
            group.batch_size,
            group.refined_lr,
            "o-",
            color=colors[name],
            label=f"{NAMES.get(name, name)} (refined best)",
        )
        b0 = base_batch(runs)
        anchor = group[group.batch_size == b0]
        if not anchor.empty:
            lr0 = float(anchor.refined_lr.iloc[0])
            bs = np.array(sorted(group.batch_size))
            ax.plot(bs, lr0 * bs / b0, ":", color=colors[name], lw=0.9)
            ax.plot(bs, lr0 * np.sqrt(bs / b0), "--", color=colors[name], lw=0.9)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="best lr (final train loss)",
           title="best lr per batch size\n(dotted: linear, dashed: sqrt scaling from the base batch)")  # fmt: skip
    sizes = sorted(batch.batch_size.unique()) if not batch.empty else []
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    for axis in axes.flat:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _epoch_mean(group: pd.DataFrame, column: str) -> pd.Series | None:
    """``column`` of epochs.csv per epoch, the mean over the group's runs."""
    if group.empty:
        return None
    series = [pd.read_csv(Path(path) / EPOCHS).set_index("epoch")[column] for path in group.path]
    return pd.concat(series, axis=1).mean(axis=1)


def _salr_factor_per_epoch(group: pd.DataFrame) -> pd.Series | None:
    """SALR's lr factor per epoch: the mean over the epoch's measurements, then over the group's runs."""
    tables = []
    for path in group.path:
        run_dir = Path(path)
        if not (run_dir / SALR_LOG).is_file():
            continue
        steps_per_epoch = int(json.loads((run_dir / ENVIRONMENT).read_text())["steps_per_epoch"])
        table = pd.read_csv(run_dir / SALR_LOG)
        tables.append(table.groupby((table.step - 1) // steps_per_epoch + 1).lr_factor.mean())
    return pd.concat(tables, axis=1).mean(axis=1) if tables else None
