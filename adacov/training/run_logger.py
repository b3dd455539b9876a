"""A run's record: CSV files in its directory (the source of truth) mirrored to Weights & Biases."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.csv"
EPOCHS = "epochs.csv"
ENVIRONMENT = "environment.json"
CONFIG = "config.yaml"
# Written where a run stopped on a divergence, with the error's line; resume=true leaves such a run as it is
# (it would diverge again at the same step: a resumed run repeats the uninterrupted one bit for bit).
DIVERGED = "diverged.txt"
METRIC_FIELDS = ("step", "epoch", "loss", "step_time_s")
EPOCH_FIELDS = ("epoch", "step", "train_loss", "test_loss", "test_acc", "epoch_time_s", "peak_mem_mb", "optimizer_state_mb")


class CsvLog:
    """Rows appended to a CSV file, each row one ``write`` of a complete line, flushed at once."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.path, self.fields = path, tuple(fields)
        if not path.is_file() or path.stat().st_size == 0:
            path.write_text(",".join(self.fields) + "\n")
        self._file = open(path, "a", newline="")

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        buffer = io.StringIO()
        csv.DictWriter(buffer, self.fields, lineterminator="\n").writerows(rows)
        self._file.write(buffer.getvalue())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_csv(path: Path, key: str, last: int) -> None:
    """Keep the header and the complete rows whose ``key`` is at most ``last``; drop a torn last line."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    if not lines:
        return
    header = lines[0]
    index = header.rstrip("\n").split(",").index(key)
    kept = [header]
    for line in lines[1:]:
        cells = line.rstrip("\n").split(",")
        if not line.endswith("\n") or len(cells) <= index:
            break
        if int(float(cells[index])) <= last:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def environment(device: torch.device) -> dict[str, Any]:
    """Software and hardware a run ran on, for the results' provenance."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(torch.get_num_threads()),
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "command": " ".join(sys.argv),
    }
    return info


class RunLogger:
    """Writes ``metrics.csv`` (per step), ``epochs.csv`` (per epoch), the resolved config and the
    environment into ``run_dir``, and logs the same metrics to W&B unless ``wandb_mode`` is
    ``disabled``. A W&B failure only warns: the local files are the record.
    """

    def __init__(
        self,
        run_dir: Path,
        config_yaml: str,
        run_info: dict[str, Any],
        wandb_settings: dict[str, Any],
        resume_step: int | None,
        resume_epoch: int | None,
    ) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for name in (METRICS, EPOCHS):
                (run_dir / name).unlink(missing_ok=True)
        else:
            truncate_csv(run_dir / METRICS, "step", resume_step)
            truncate_csv(run_dir / EPOCHS, "epoch", resume_epoch)
        (run_dir / CONFIG).write_text(config_yaml)
        (run_dir / ENVIRONMENT).write_text(json.dumps(run_info, indent=2) + "\n")
        self.metrics = CsvLog(run_dir / METRICS, METRIC_FIELDS)
        self.epochs = CsvLog(run_dir / EPOCHS, EPOCH_FIELDS)
        self.wandb = _start_wandb(run_dir, run_info, wandb_settings, resumed=resume_step is not None)

    def log_steps(self, rows: list[dict[str, Any]]) -> None:
        self.metrics.append(rows)
        if self.wandb is not None:
            for row in rows:
                self._wandb_log({"train/loss": row["loss"], "train/step_time_s": row["step_time_s"], "epoch": row["epoch"]}, row["step"])

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.epochs.append([row])
        if self.wandb is not None:
            self._wandb_log({f"epoch/{k}": v for k, v in row.items() if k != "step"}, row["step"])

    def record_divergence(self, message: str) -> None:
        """Put the divergence into the W&B run's summary (``diverged``), as ``diverged.txt`` holds it locally."""
        if self.wandb is not None:
            try:
                self.wandb.summary["diverged"] = message
            except Exception as error:  # noqa: BLE001 - W&B must never hide the divergence itself
                warnings.warn(f"W&B summary failed ({one_line(error)}); {self.run_dir} records the divergence")

    def close(self) -> None:
        self.metrics.close()
        self.epochs.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as error:  # noqa: BLE001 - W&B must never fail a finished run
                warnings.warn(f"W&B finish failed ({one_line(error)}); the local files in {self.run_dir} are complete")

    def _wandb_log(self, values: dict[str, Any], step: int) -> None:
        try:
            self.wandb.log(values, step=step)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            warnings.warn(f"W&B logging stopped ({one_line(error)}); training goes on, {self.run_dir} keeps the record")
            self.wandb = None


def _start_wandb(run_dir: Path, run_info: dict[str, Any], settings: dict[str, Any], resumed: bool):
    if settings["mode"] == "disabled":
        return None
    try:
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=settings["project"],
            entity=settings.get("entity"),
            mode=settings["mode"],
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            name=run_info["run_name"],
            group=f"{run_info['optimizer']}-k{run_info['kernel_size']}",
            tags=list(settings.get("tags") or []),
            config={**run_info["config"], "run": {k: v for k, v in run_info.items() if k != "config"}},
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=settings["init_timeout"]),
        )
    except Exception as error:  # noqa: BLE001 - any W&B failure falls back to the local files
        warnings.warn(f"W&B could not start ({one_line(error)}); training goes on, {run_dir} keeps the record")
        return None


def one_line(error: Exception) -> str:
    """The error's message on one line (W&B's network errors span several)."""
    return " ".join(str(error).split())


def cpu_name(threads: int) -> str:
    """How runs name a CPU device: ``CPU (1 thread)``, ``CPU (2 threads)``."""
    return f"CPU ({threads} thread{'' if threads == 1 else 's'})"
