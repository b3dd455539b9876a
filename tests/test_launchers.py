"""Sweeps through Hydra's launcher plugins: a local Ray cluster, joblib processes, Slurm configs."""

from __future__ import annotations

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIG_DIR, SMALL, run_cli

SWEEP = ["optimizer=adam,adacov", "seed=0,1", *SMALL, "epochs=1", "device=cpu", "wandb.mode=disabled"]
# A local Ray cluster that talks over loopback only, without usage reports, a dashboard or auth.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
RAY_LOCAL = [
    "+hydra.launcher.ray.init._node_ip_address=127.0.0.1",
    "+hydra.launcher.ray.init.include_dashboard=false",
    "+hydra.launcher.ray.init.num_cpus=2",
]


def assert_four_runs(sweep) -> None:
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    names = sorted(p.name for p in runs)
    assert len(runs) == 4 and all(any(f"optimizer={o}" in n and f"seed={s}" in n for n in names) for o in ("adam", "adacov") for s in (0, 1))
    for run in runs:
        assert pd.read_csv(run / "metrics.csv").step.tolist() == list(range(1, 9))
        assert pd.read_csv(run / "epochs.csv").epoch.tolist() == [1]
    losses = {tuple(pd.read_csv(run / "metrics.csv").loss.round(6)) for run in runs}
    assert len(losses) == 4  # four different runs, not one run four times


@pytest.mark.slow
def test_ray_launcher_runs_a_4_job_sweep_on_a_local_cluster(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=ray", *SWEEP, *RAY_LOCAL, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                     env_extra=RAY_ENV, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_four_runs(sweep)


@pytest.mark.slow
def test_joblib_launcher_runs_a_4_job_sweep_in_2_processes(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SWEEP, f"hydra.sweep.dir={sweep}"],
                     cwd=tmp_path, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_four_runs(sweep)


def launcher_config(choice: str, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("train", overrides=[f"hydra/launcher={choice}", *overrides], return_hydra_config=True).hydra.launcher


def test_slurm_gpu_asks_one_gpu_per_run_and_takes_partition_time_and_parallelism():
    launcher = launcher_config(
        "slurm_gpu", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30", "hydra.launcher.array_parallelism=4"
    )
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
    assert (launcher.partition, launcher.timeout_min, launcher.array_parallelism) == ("gpu", 30, 4)


def test_ray_cluster_joins_a_running_cluster_with_one_gpu_per_run():
    launcher = launcher_config("ray_cluster", "hydra.launcher.ray.init.address=10.0.0.1:6379")
    assert launcher._target_.endswith("ray_launcher.RayLauncher")
    assert launcher.ray.init.address == "10.0.0.1:6379" and launcher.ray.remote.num_gpus == 1
    assert launcher_config("ray").ray.init.address is None  # the plugin's own config starts a local cluster
