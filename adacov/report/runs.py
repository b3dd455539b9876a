"""Finding and reading logged runs: any layout of run directories below a root."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from adacov.errors import UserError
from adacov.training.checkpoint import CHECKPOINT
from adacov.training.run_logger import DIVERGED, ENVIRONMENT, EPOCH_FIELDS, EPOCHS, METRICS, cpu_name

LABELS = ("optimizer", "kernel_size", "seed", "data", "batch_size", "epochs", "steps_per_epoch", "device_name")


@dataclass
class Run:
    """One run directory: its labels (from environment.json), per-step and per-epoch tables."""

    path: Path
    info: dict
    metrics: pd.DataFrame
    epochs: pd.DataFrame

    @property
    def optimizer(self) -> str:
        return self.info["optimizer"]

    @property
    def kernel_size(self) -> int:
        return int(self.info["kernel_size"])

    @property
    def stopped_early(self) -> bool:
        """Whether the run logged fewer epochs than its config asked for (it diverged, or is still running)."""
        return len(self.epochs) < int(self.info.get("epochs", len(self.epochs)))

    @property
    def under_way(self) -> bool:
        """Whether the run stopped early holding a checkpoint to resume from: still training, or stopped by a signal
        (a divergence leaves ``diverged.txt``; committed runs keep no checkpoint)."""
        return self.stopped_early and (self.path / CHECKPOINT).is_file() and not (self.path / DIVERGED).is_file()


def load_runs(root: Path) -> list[Run]:
    """Every run below ``root`` (a directory holding metrics.csv and environment.json).

    Incomplete rows (a run killed while writing) are dropped with a warning, and so is a run still under way
    (:attr:`Run.under_way`): its last epoch is not its final one. A directory that is missing or holds no run
    raises a UserError.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs directory {root} does not exist: pass the directory train.py wrote runs into")
    runs = []
    for metrics_file in sorted(root.rglob(METRICS)):
        run_dir = metrics_file.parent
        env_file = run_dir / ENVIRONMENT
        if not env_file.is_file():
            warnings.warn(f"skipping {run_dir}: no {ENVIRONMENT}")
            continue
        info = _current_labels(json.loads(env_file.read_text()))
        metrics = _read_complete(metrics_file, ("step", "loss", "step_time_s"))
        epochs = _read_complete(run_dir / EPOCHS, ("epoch",)) if (run_dir / EPOCHS).is_file() else pd.DataFrame()
        if metrics.empty:
            warnings.warn(f"skipping {run_dir}: no complete step in {METRICS}")
            continue
        run = Run(run_dir, info, metrics, epochs)
        if run.under_way:
            warnings.warn(f"skipping {run_dir}: {len(epochs)} of its {info['epochs']} epochs and a checkpoint, still under way")
            continue
        runs.append(run)
    if not runs:
        raise UserError(f"no runs below {root}: expected directories with {METRICS} and {ENVIRONMENT} (from train.py)")
    return runs


def _current_labels(info: dict) -> dict:
    """``info`` with a CPU run's device named as :func:`cpu_name` names it now, from its recorded thread count:
    older runs wrote ``CPU (1 threads)``, which would reach figure titles and make equal settings look different."""
    if info.get("device") == "cpu" and "torch_threads" in info:
        info["device_name"] = cpu_name(int(info["torch_threads"]))
    return info


def _read_complete(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    table = pd.read_csv(path, on_bad_lines="skip")
    complete = table.dropna(subset=[c for c in required if c in table.columns])
    if len(complete) < len(table):
        warnings.warn(f"{path}: dropped {len(table) - len(complete)} incomplete rows (truncated file?)")
    return complete.reset_index(drop=True)


def check_consistent(runs: list[Run]) -> list[str]:
    """Settings that differ between runs that are compared (data, batch, epochs, device), as messages."""
    problems = []
    for key in ("data", "batch_size", "epochs", "device_name"):
        values = sorted({str(r.info.get(key)) for r in runs})
        if len(values) > 1:
            problems.append(f"runs differ in {key}: {', '.join(values)}")
    return problems


def runs_from_wandb(path: str, out: Path) -> Path:
    """Download the runs of W&B project ``ENTITY/PROJECT`` into ``out`` in train.py's file layout."""
    import wandb

    api = wandb.Api()
    for remote in api.runs(path):
        labels = remote.config.get("run")
        if not labels:
            warnings.warn(f"skipping W&B run {remote.id}: not logged by train.py")
            continue
        run_dir = out / remote.id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ENVIRONMENT).write_text(json.dumps(labels, indent=2))
        steps = pd.DataFrame(remote.scan_history(keys=["_step", "epoch", "train/loss", "train/step_time_s"]))
        steps = steps.rename(columns={"_step": "step", "train/loss": "loss", "train/step_time_s": "step_time_s"})
        steps[["step", "epoch", "loss", "step_time_s"]].to_csv(run_dir / METRICS, index=False)
        epoch_keys = [f"epoch/{k}" for k in EPOCH_FIELDS if k != "step"]
        epochs = pd.DataFrame(remote.scan_history(keys=["_step", *epoch_keys]), columns=["_step", *epoch_keys])  # header kept without rows
        epochs.columns = [c.removeprefix("epoch/") for c in epochs.columns]
        epochs.rename(columns={"_step": "step"}).to_csv(run_dir / EPOCHS, index=False)
        if remote.summary.get("diverged"):
            (run_dir / DIVERGED).write_text(f"{remote.summary['diverged']}\n")
    return out
