"""The training loop: learning, logging, resume, and identical initial weights across optimizers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from adacov.training import train
from adacov.training.checkpoint import CHECKPOINT


@pytest.mark.parametrize("optimizer", ["adam", "adacov", "sgd"])
def test_two_epochs_on_synthetic_data_lower_the_loss(small_config, tmp_path, optimizer):
    last = train(small_config(f"optimizer={optimizer}", "optimizer.lr=0.01" if optimizer != "sgd" else "seed=0"))
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert list(metrics.columns[:4]) == ["step", "epoch", "loss", "step_time_s"]
    assert metrics.step.tolist() == list(range(1, 17))  # 256 // 32 = 8 steps per epoch, 2 epochs
    assert metrics.epoch.iloc[-1] == 2.0 and (metrics.step_time_s > 0).all()
    assert epochs.epoch.tolist() == [1, 2]
    assert {"test_loss", "test_acc", "peak_mem_mb", "optimizer_state_mb"} <= set(epochs.columns)
    assert metrics.loss.iloc[-4:].mean() < metrics.loss.iloc[:4].mean()
    assert last["train_loss"] == pytest.approx(metrics.loss.iloc[8:].mean())
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "environment.json").is_file()


def test_same_seed_gives_same_initial_weights_for_every_optimizer(small_config, tmp_path):
    from adacov.training.loop import instantiate

    weights = []
    for optimizer in ("adam", "adacov"):
        cfg = small_config(f"optimizer={optimizer}")
        torch.manual_seed(cfg.seed)
        model = instantiate(cfg.model, in_channels=3, image_size=32, num_classes=100)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(*weights)


@pytest.mark.numerics
def test_resume_continues_exactly(tmp_path, small_config):
    from tests.conftest import SMALL, compose_config

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(compose_config(full_dir, [*SMALL, "optimizer=adacov", "epochs=3"]))
    train(compose_config(cut_dir, [*SMALL, "optimizer=adacov", "epochs=1"]))
    # A crash in epoch 2 leaves extra rows and a torn line behind the epoch-1 checkpoint.
    with open(cut_dir / "metrics.csv", "a") as f:
        f.write("9,1.125,4.5,0.1\n10,1.25,4.4")
    train(compose_config(cut_dir, [*SMALL, "optimizer=adacov", "epochs=3", "resume=true"]))
    full, cut = pd.read_csv(full_dir / "metrics.csv"), pd.read_csv(cut_dir / "metrics.csv")
    pd.testing.assert_frame_equal(full[["step", "epoch", "loss"]], cut[["step", "epoch", "loss"]])
    a = torch.load(full_dir / CHECKPOINT, weights_only=False)["model"]
    b = torch.load(cut_dir / CHECKPOINT, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(cut_dir / "epochs.csv").epoch.tolist() == [1, 2, 3]


def test_resuming_a_finished_run_returns_its_last_epoch_and_logs_nothing_new(small_config, tmp_path):
    first = train(small_config("epochs=2"))
    again = train(small_config("epochs=2", "resume=true"))
    assert again == first and again["epoch"] == 2
    assert pd.read_csv(tmp_path / "metrics.csv").step.tolist() == list(range(1, 17))
    assert pd.read_csv(tmp_path / "epochs.csv").epoch.tolist() == [1, 2]


def test_rerun_without_resume_starts_over(small_config, tmp_path):
    train(small_config("epochs=2"))
    train(small_config("epochs=1"))
    assert pd.read_csv(tmp_path / "metrics.csv").step.tolist() == list(range(1, 9))


def test_wandb_offline_writes_a_local_run(small_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_config("epochs=1", "wandb.mode=offline")
    train(cfg)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
