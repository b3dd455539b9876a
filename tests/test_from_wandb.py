"""``plot_curves.py --from-wandb`` rebuilds the local run files from what a real run logged to W&B.

There is no W&B server here, so a training run logs offline through the real ``wandb`` client while
its ``Run.log`` calls are recorded; a small stand-in for ``wandb.Api`` then serves that history with
W&B's semantics (logs at the same step merge into one row; ``scan_history(keys)`` yields the rows
that hold every key asked for, ``_step`` included).
"""

from __future__ import annotations

from collections import defaultdict

import pandas as pd
import pytest

import plot_curves
from adacov.errors import NonFiniteLossError
from adacov.report import load_runs
from adacov.report.runs import runs_from_wandb
from adacov.training import train
from adacov.training.run_logger import DIVERGED


class RecordedRun:
    def __init__(self, run_id: str, config: dict) -> None:
        self.id, self.config = run_id, config
        self.rows: dict[int, dict] = defaultdict(dict)
        self.summary: dict = {}

    def scan_history(self, keys: list[str]):
        for step in sorted(self.rows):
            row = {"_step": step, **self.rows[step]}
            if all(k in row for k in keys):
                yield {k: row[k] for k in keys}


class RecordedApi:
    def __init__(self, runs: list[RecordedRun]) -> None:
        self._runs = runs

    def runs(self, path: str) -> list[RecordedRun]:
        assert path == "someone/adacov"
        return self._runs


@pytest.fixture
def wandb_server(monkeypatch) -> dict[str, RecordedRun]:
    """Records what real runs log to W&B (offline), history and summary updates, and serves it through ``wandb.Api``."""
    import wandb.sdk.wandb_run

    recorded: dict[str, RecordedRun] = {}
    log, update_summary = wandb.sdk.wandb_run.Run.log, wandb.sdk.wandb_run.Run._summary_update_callback

    def remote_of(run) -> RecordedRun:
        return recorded.setdefault(run.id, RecordedRun(run.id, dict(run.config)))

    def recording_log(run, data, step=None, **kwargs):
        remote_of(run).rows[step].update(data)
        return log(run, data, step=step, **kwargs)

    def recording_summary(run, record):
        remote_of(run).summary.update({".".join(item.key): item.value for item in record.update})
        return update_summary(run, record)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", recording_log)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "_summary_update_callback", recording_summary)
    monkeypatch.setattr(wandb, "Api", lambda: RecordedApi(list(recorded.values())))
    return recorded


@pytest.fixture
def logged_to_wandb(small_config, tmp_path, wandb_server):
    """Two real training runs (Adam, AdaCov) logged offline to W&B, with the history W&B received."""
    run_dirs = []
    for optimizer in ("adam", "adacov"):
        cfg = small_config("epochs=2", "wandb.mode=offline", f"optimizer={optimizer}")
        cfg.paths.output_dir = str(tmp_path / optimizer)
        train(cfg)
        run_dirs.append(tmp_path / optimizer)
    return run_dirs


def test_from_wandb_rebuilds_the_local_files(logged_to_wandb, tmp_path):
    downloaded = runs_from_wandb("someone/adacov", tmp_path / "downloaded")
    by_optimizer = {}
    for run_dir in downloaded.iterdir():
        by_optimizer[pd.read_json(run_dir / "environment.json", typ="series")["optimizer"]] = run_dir
    assert set(by_optimizer) == {"adam", "adacov"}
    for local in logged_to_wandb:
        remote = by_optimizer[local.name]
        columns = ["step", "epoch", "loss", "step_time_s"]
        pd.testing.assert_frame_equal(pd.read_csv(remote / "metrics.csv")[columns], pd.read_csv(local / "metrics.csv")[columns])
        local_epochs = pd.read_csv(local / "epochs.csv")
        pd.testing.assert_frame_equal(pd.read_csv(remote / "epochs.csv")[local_epochs.columns], local_epochs)


def test_plot_curves_from_wandb_writes_the_same_table_as_from_the_files(logged_to_wandb, tmp_path):
    assert plot_curves.main(["--from-wandb", "someone/adacov", "--out", str(tmp_path / "remote")]) == 0
    assert plot_curves.main([str(tmp_path), "--out", str(tmp_path / "local")]) == 0
    for name in ("final_losses.csv", "table1.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "remote" / name), pd.read_csv(tmp_path / "local" / name))
    assert (tmp_path / "remote" / "figure1.png").stat().st_size > 0


def test_a_diverged_run_stays_diverged_when_downloaded_and_one_under_way_is_left_out(small_config, tmp_path, wandb_server, nan_at_step_5):
    """The divergence goes into the W&B summary and comes back as diverged.txt: the run counts as stopped early.
    A local run that stopped short of its epochs holding a checkpoint is under way and left out, with a warning."""
    cfg = small_config("epochs=2", "wandb.mode=offline", "optimizer=adam")
    cfg.paths.output_dir = str(tmp_path / "local" / "diverged")
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    (downloaded,) = runs_from_wandb("someone/adacov", tmp_path / "downloaded").iterdir()
    assert "loss is nan at step 5" in (downloaded / DIVERGED).read_text()
    (run,) = load_runs(tmp_path / "downloaded")
    assert run.stopped_early and not run.under_way

    cfg = small_config("epochs=1", "optimizer=adam")
    under_way = tmp_path / "local" / "under_way"
    cfg.paths.output_dir = str(under_way)
    train(cfg)  # a 2-epoch run's first epoch, checkpointed
    (under_way / "environment.json").write_text((under_way / "environment.json").read_text().replace('"epochs": 1', '"epochs": 2'))
    with pytest.warns(UserWarning, match=r"skipping .*under_way: 1 of its 2 epochs and a checkpoint, still under way"):
        assert [r.path.name for r in load_runs(tmp_path / "local")] == ["diverged"]
