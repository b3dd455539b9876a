"""train.py as a user runs it: bad values, multirun sweeps, kill and resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import ROOT, SMALL, SMALL_MODEL, run_cli

BAD = [
    (["optimizer=foo"], "optimizer=foo is not allowed"),
    (["model.kernel_size=4"], "model.kernel_size=4 is not allowed"),
    (["epochs=-1"], "epochs=-1 is not allowed"),
    (["batch_size=0"], "batch_size=0 is not allowed"),
    (["data=cifar100", "data.download=false", "paths.data_dir=/nonexistent/cifar"], "CIFAR-100 not found"),
    (["device=tpu"], "device='tpu' is not allowed"),
    (["optimizer=adacov", "optimizer.cov_eps=0"], "Invalid cov_eps: 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_fail_with_one_line(tmp_path, args, message):
    data = [] if any(a.startswith("data=") for a in args) else SMALL[:3]
    result = run_cli([*data, *SMALL_MODEL, "epochs=1", *args], cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not list((tmp_path / "runs").rglob("metrics.csv"))


def test_multirun_2x2_gives_4_run_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "optimizer=adam,adacov", "model.kernel_size=3,5", *SMALL, "epochs=1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(runs) == 4
    for run in runs:
        assert len(pd.read_csv(run / "metrics.csv")) == 8 and len(pd.read_csv(run / "epochs.csv")) == 1


def test_sigkill_after_first_epoch_then_resume_logs_the_uninterrupted_steps(tmp_path):
    args = [*SMALL, "data.train_size=1024", "optimizer=adacov", "epochs=3"]
    full = run_cli([*args, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    run_dir = tmp_path / "killed"
    env_args = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(env_args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 120
    while time.time() < deadline:
        epochs = run_dir / "epochs.csv"
        if (run_dir / "checkpoint.pt").is_file() and epochs.is_file() and len(epochs.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_rows = len(pd.read_csv(run_dir / "metrics.csv"))
    assert 32 <= killed_rows < 96  # killed in epoch 2 or 3

    resumed = run_cli([*args, f"hydra.run.dir={run_dir}", "resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = pd.read_csv(tmp_path / "full" / "metrics.csv"), pd.read_csv(run_dir / "metrics.csv")
    pd.testing.assert_frame_equal(a[["step", "epoch", "loss"]], b[["step", "epoch", "loss"]])


def test_paper_experiment_sweep_feeds_plot_curves(tmp_path):
    """The committed paper sweep, shrunk: 3 optimizers x 2 kernel sizes (one seed), then Figure 1 / Table 1."""
    import plot_curves

    result = run_cli(
        ["-m", "experiment=paper", *SMALL, "data.train_size=64", "epochs=1", "seed=0"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "runs" / "paper" / "synthetic"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        f"{o}_k{k}_seed0" for o in ("adacov", "adam", "mbf") for k in (3, 5)
    ]
    assert plot_curves.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert sorted(table.kernel.unique()) == ["3x3", "5x5"] and set(table.optimizer) == {"Adam", "AdaCov", "MBF"}
