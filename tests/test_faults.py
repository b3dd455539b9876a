"""Faults a long run meets: SIGTERM / SIGINT (preemption, Ctrl-C), a non-finite loss, a failing W&B."""

from __future__ import annotations

import signal
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch

from adacov.errors import DivergenceError, NonFiniteLossError
from adacov.training import train
from adacov.training.checkpoint import CHECKPOINT
from adacov.training.loop import finished_record
from adacov.training.run_logger import DIVERGED
from tests.conftest import LONG, ROOT, SMALL, cli_env, run_cli, wait_for_rows


def start_training(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    result = run_cli([*LONG, f"hydra.run.dir={run_dir}"], cwd=run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.numerics
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_checkpoints_and_resume_gives_the_uninterrupted_losses(tmp_path, uninterrupted, signum):
    run_dir = tmp_path / "run"
    process = start_training([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for_rows(run_dir / "metrics.csv", 40, process)  # in epoch 2
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + signum
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {signal.Signals(signum).name} at step") and "resume=true" in lines[-1], stderr
    position = torch.load(run_dir / CHECKPOINT, weights_only=False)["position"]
    logged = pd.read_csv(run_dir / "metrics.csv")
    assert position["step"] == 32 * position["epoch"] + position["batch"] and 40 <= position["step"] < 96
    assert logged.step.tolist() == list(range(1, position["step"] + 1))  # flushed up to the checkpoint

    resumed = run_cli([*LONG, f"hydra.run.dir={run_dir}", "resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    full, cut = pd.read_csv(uninterrupted / "metrics.csv"), pd.read_csv(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(full[["step", "epoch", "loss"]], cut[["step", "epoch", "loss"]])
    pd.testing.assert_frame_equal(pd.read_csv(uninterrupted / "epochs.csv")[["epoch", "train_loss", "test_loss"]],
                                  pd.read_csv(run_dir / "epochs.csv")[["epoch", "train_loss", "test_loss"]])
    # the interrupted epoch's time counts both processes: at least the sum of all its steps' times
    epoch = position["epoch"] + 1
    steps = cut[(cut.step > 32 * (epoch - 1)) & (cut.step <= 32 * epoch)]
    assert pd.read_csv(run_dir / "epochs.csv").set_index("epoch").epoch_time_s[epoch] >= steps.step_time_s.sum()


@pytest.mark.numerics
def test_sigkill_after_first_epoch_then_resume_logs_the_uninterrupted_steps(tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    process = start_training([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for_rows(run_dir / "epochs.csv", 1, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 32 <= len(pd.read_csv(run_dir / "metrics.csv")) < 96  # killed in epoch 2 or 3

    resumed = run_cli([*LONG, f"hydra.run.dir={run_dir}", "resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    full, cut = pd.read_csv(uninterrupted / "metrics.csv"), pd.read_csv(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(full[["step", "epoch", "loss"]], cut[["step", "epoch", "loss"]])


def test_resume_leaves_a_finished_record_as_it_is(small_config, tmp_path):
    """resume=true (make compare RESUME=true) neither trains a finished run over nor rewrites its record (its config
    and environment keep the command that trained it), with its checkpoint or without (committed runs keep none);
    a record that stops short of the epochs asked for, with no checkpoint to continue from, trains from the start."""
    last = train(small_config("optimizer=adam", "epochs=2"))
    files = ("metrics.csv", "epochs.csv", "config.yaml", "environment.json")
    recorded = {name: (tmp_path / name).read_bytes() for name in files}
    for checkpoint_kept in (True, False):
        if not checkpoint_kept:
            (tmp_path / CHECKPOINT).unlink()
        again = train(small_config("optimizer=adam", "epochs=2", "resume=true", "log_every=7"))
        assert again == pytest.approx(last, nan_ok=True)
        assert {name: (tmp_path / name).read_bytes() for name in files} == recorded
    assert not (tmp_path / CHECKPOINT).exists()

    torn = recorded["epochs.csv"].splitlines(keepends=True)
    (tmp_path / "epochs.csv").write_bytes(b"".join(torn[:-1]) + torn[-1][:4])  # killed while writing epoch 2's row
    assert finished_record(tmp_path, 2) is None

    longer = train(small_config("optimizer=adam", "epochs=3", "resume=true"))
    assert longer["epoch"] == 3 and pd.read_csv(tmp_path / "metrics.csv").step.tolist() == list(range(1, 25))


def test_nonfinite_loss_stops_the_run_and_keeps_the_steps_before_it(small_config, tmp_path, nan_at_step_5):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5: the run stopped; the 4 steps before it are logged"):
        train(small_config("optimizer=adam", "epochs=1"))
    assert pd.read_csv(tmp_path / "metrics.csv").step.tolist() == [1, 2, 3, 4]
    assert not (tmp_path / CHECKPOINT).exists()


def test_resume_leaves_a_diverged_run_as_it_is(small_config, tmp_path, nan_at_step_5):
    """A divergence is recorded in diverged.txt; resume=true repeats its error without training the run again or
    rewriting its record (it would diverge at the same step); a run trained anew there removes the stale record."""
    with pytest.raises(NonFiniteLossError):
        train(small_config("optimizer=adam", "epochs=1"))
    assert "loss is nan at step 5" in (tmp_path / DIVERGED).read_text()
    files = ("metrics.csv", "epochs.csv", "config.yaml", "environment.json", DIVERGED)
    recorded = {name: (tmp_path / name).read_bytes() for name in files}
    with pytest.raises(DivergenceError, match=r"loss is nan at step 5.*resume=true leaves a diverged run as it is"):
        train(small_config("optimizer=adam", "epochs=1", "resume=true", "log_every=7"))
    assert {name: (tmp_path / name).read_bytes() for name in files} == recorded
    train(small_config("optimizer=adam", "epochs=1", "resume=false"))  # the fixture's 5th forward has passed
    assert not (tmp_path / DIVERGED).exists() and pd.read_csv(tmp_path / "metrics.csv").step.tolist() == list(range(1, 9))


def test_nonfinite_loss_skip_leaves_the_weights_and_optimizer_untouched(small_config, tmp_path, nan_at_step_5):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run itself must not warn: the skip is reported on stdout
        last = train(small_config("optimizer=adam", "epochs=1", "nonfinite_loss=skip"))
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics.step.tolist() == list(range(1, 9)) and metrics.loss.isna().tolist() == [False] * 4 + [True] + [False] * 3
    assert last["train_loss"] == pytest.approx(metrics.loss.dropna().mean())
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {7}  # 8 batches, one skipped
    assert all(torch.isfinite(p).all() for p in torch.load(tmp_path / CHECKPOINT, weights_only=False)["model"].values())


def test_a_failed_decomposition_is_a_divergence_that_keeps_the_steps_before_it(small_config, tmp_path, monkeypatch):
    """MBF at 5x5 on Fashion-MNIST blew up to a loss of 1e14, then its Cholesky failed on the next step."""
    step, calls = torch.optim.Adam.step, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise torch.linalg.LinAlgError("injected: Cholesky failed on 1 blocks")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing)
    with pytest.raises(DivergenceError, match=r"step failed at step 5 \(injected.*\): the run diverged; the 4 steps before it"):
        train(small_config("optimizer=adam", "epochs=1"))
    assert pd.read_csv(tmp_path / "metrics.csv").step.tolist() == [1, 2, 3, 4]
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_diverging_job_ends_only_itself_in_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *SMALL, "optimizer=sgd", "optimizer.lr=1e12,1e-3", "epochs=1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the training loss is nan" in errors[0], result.stderr
    finished = [len(pd.read_csv(path)) for path in sorted(sweep.rglob("epochs.csv"))]
    assert sorted(finished) == [0, 1]
    logs = {path.parent.name: path.read_text() for path in sweep.rglob("train.log")}  # each run's log says how it ended
    stopped = next(text for name, text in logs.items() if "lr=1000000000000" in name)
    assert "[ERROR] - the training loss is nan at step" in stopped and "epoch 1/1" not in stopped
    assert "[INFO] - epoch 1/1: train loss" in next(text for name, text in logs.items() if "lr=0.001" in name)


def test_diverging_run_exits_with_one_line(tmp_path):
    result = run_cli([*SMALL, "optimizer=sgd", "optimizer.lr=1e12", "epochs=1", "wandb.mode=disabled"], cwd=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: the training loss is nan at step"), result.stderr
    assert "nonfinite_loss=skip" in errors[0] and "Traceback" not in result.stderr
    assert len(pd.read_csv(next(tmp_path.rglob("metrics.csv")))) >= 1


def test_wandb_that_cannot_write_its_dir_only_warns(small_config, tmp_path):
    (tmp_path / "wandb").write_text("a file where W&B wants its directory")
    with pytest.warns(UserWarning, match="W&B could not start.*training goes on"):
        train(small_config("epochs=1", "wandb.mode=offline"))
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 8 and len(pd.read_csv(tmp_path / "epochs.csv")) == 1


def test_wandb_online_without_network_only_warns(small_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.warns(UserWarning, match="W&B could not start.*training goes on"):
        train(small_config("epochs=1", "wandb.mode=online", "wandb.init_timeout=5"))
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 8 and len(pd.read_csv(tmp_path / "epochs.csv")) == 1


def test_wandb_failing_mid_run_only_warns(small_config, tmp_path, monkeypatch):
    import wandb.sdk.wandb_run

    def broken(self, *args, **kwargs):
        raise OSError("injected: the W&B service went away")

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken)
    with pytest.warns(UserWarning, match="W&B logging stopped.*training goes on"):
        train(small_config("epochs=2", "wandb.mode=offline"))
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 16 and len(pd.read_csv(tmp_path / "epochs.csv")) == 2
