"""Compose the real Hydra config, shrunk to seconds on CPU, for tests of the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from adacov.config import register_resolvers
from models.conv6 import ConvNet6

register_resolvers()
ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SMALL_MODEL = ["model.channels=[4,4,8,8,8,8]", "batch_size=32"]
SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=64", *SMALL_MODEL]
LONG = [*SMALL, "data.train_size=1024", "optimizer=adacov", "epochs=3"]  # 32 steps per epoch


def compose_config(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """The train config with ``overrides`` applied, writing into ``tmp_path`` with W&B off."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["device=cpu", "wandb.mode=disabled", "epochs=2", *overrides],
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.runs_dir = str(tmp_path / "runs")
        del cfg.hydra
    return cfg


@pytest.fixture
def small_config(tmp_path):
    return lambda *overrides: compose_config(tmp_path, [*SMALL, *overrides])


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a training subprocess: W&B off unless the run's config says otherwise."""
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(extra or {})}


def run_cli(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in ``cwd`` (runs land in ``cwd/runs``), W&B off unless overridden."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=cli_env(env_extra), capture_output=True, text=True, **kwargs
    )


def wait_for_rows(path: Path, rows: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the CSV at ``path`` holds more than ``rows`` lines while ``process`` runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) > rows:
            return
        time.sleep(0.002)  # the run goes on between polls: keep the window before a signal short
    raise AssertionError(f"{path} did not reach {rows} rows")


@pytest.fixture
def nan_at_step_5(monkeypatch):
    """Make the net's 5th training forward pass return NaN logits (an injected fault)."""
    forward, calls = ConvNet6.forward, []

    def poisoned(self, x):
        logits = forward(self, x)
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(ConvNet6, "forward", poisoned)
