"""train.py as a user runs it: bad values and multirun sweeps."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.conftest import SMALL, SMALL_MODEL, run_cli

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


def test_only_rank_0_writes_the_hydra_files(tmp_path):
    """A torchrun rank other than 0 shares rank 0's run directory, so it leaves ``.hydra/`` to rank 0."""
    args = [*SMALL, "epochs=1", "device=cpu", "wandb.mode=disabled"]
    for rank in ("0", "1"):
        result = run_cli([*args, f"hydra.run.dir={tmp_path / rank}"], cwd=tmp_path, env_extra={"RANK": rank})
        assert result.returncode == 0, result.stderr
        assert (tmp_path / rank / "metrics.csv").is_file()  # no process group here: a plain run that logs
    assert (tmp_path / "0" / ".hydra" / "config.yaml").is_file() and (tmp_path / "0" / "train.log").is_file()
    assert not (tmp_path / "1" / ".hydra").exists() and not (tmp_path / "1" / "train.log").exists()
