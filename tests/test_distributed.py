"""Data-parallel training (torchrun, DDP with gloo on CPU) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adacov import AdaCov
from adacov.errors import RunError
from adacov.training.distributed import Replicas
from models.conv6 import ConvNet6
from tests.conftest import LONG, ROOT, SMALL, cli_env, run_cli, wait_for_rows

# Weight tolerance: Adam's update is well conditioned, so two half-batch gradients averaged agree with the
# full-batch one to float32 rounding. AdaCov and MBF invert covariances built from a few steps, which
# amplifies that rounding (test_splitting_a_batch_only_moves_adacov_by_float_rounding). The ranks
# themselves stay bit-identical (checked each epoch).
WEIGHT_ATOL = {"adam": 1e-6, "adacov": 5e-4, "mbf": 5e-4}


def torchrun(args: list[str], processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(ROOT / "train.py"), *args]


def _adacov_weights_after_16_steps(split_batch: bool, dtype: torch.dtype) -> torch.Tensor:
    """The small conv6 net's weights after 16 AdaCov steps on random batches of 32, with each gradient
    taken on the whole batch or as the mean of its two halves' gradients (what 2 DDP ranks compute)."""
    torch.manual_seed(0)
    model = ConvNet6(3, [4, 4, 8, 8, 8, 8], in_channels=3, image_size=32, num_classes=100).to(dtype)
    optimizer = AdaCov(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(16):
        x = torch.randn(32, 3, 32, 32, generator=generator, dtype=dtype)
        y = torch.randint(0, 100, (32,), generator=generator)
        optimizer.zero_grad()
        for part in (slice(0, 16), slice(16, 32)) if split_batch else (slice(0, 32),):
            loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
            (loss / 2 if split_batch else loss).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_splitting_a_batch_only_moves_adacov_by_float_rounding():
    """In one process: float32 rounding, magnified by AdaCov's inverse root, stays inside WEIGHT_ATOL;
    in float64 the split and whole-batch trajectories agree to rounding (measured: 3e-4 and 4e-16)."""
    for dtype, bound in ((torch.float32, WEIGHT_ATOL["adacov"]), (torch.float64, 1e-12)):
        difference = (_adacov_weights_after_16_steps(True, dtype) - _adacov_weights_after_16_steps(False, dtype)).abs().max()
        assert difference < bound, (dtype, difference.item())


@pytest.mark.parametrize("optimizer", ["adam", "adacov", "mbf"])
def test_two_processes_match_one_process(tmp_path, optimizer):
    args = [*SMALL, "device=cpu", "wandb.mode=disabled", "epochs=2", f"optimizer={optimizer}", "optimizer.lr=0.003"]
    one = run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"]), cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr  # includes each epoch's check that both ranks' states are identical

    a, b = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert a.step.tolist() == b.step.tolist() == list(range(1, 17))
    assert a.loss.iloc[-1] < a.loss.iloc[0] - 0.01  # the weights moved, so the comparison means something
    torch.testing.assert_close(torch.tensor(b.loss.values), torch.tensor(a.loss.values), rtol=1e-5, atol=1e-6)
    wa = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=WEIGHT_ATOL[optimizer])
    assert json.loads((tmp_path / "two" / "environment.json").read_text())["processes"] == 2


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc): the processes a Slurm job step signals."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in process_tree(int(child)))]


def test_sigterm_to_every_torchrun_process_checkpoints_and_resumes_bit_exactly(tmp_path):
    """As Slurm does on preemption: SIGTERM to torchrun's agent and to each worker. The agent forwards
    its copy, so each worker gets SIGTERM twice; they still stop together at a step, rank 0
    checkpoints, and the resumed run logs exactly the uninterrupted two-process run's losses."""
    args = [*LONG, "device=cpu", "wandb.mode=disabled"]
    full = subprocess.run(torchrun([*args, f"hydra.run.dir={tmp_path / 'full'}"]), cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert full.returncode == 0, full.stderr

    run_dir = tmp_path / "cut"
    process = subprocess.Popen(torchrun([*args, f"hydra.run.dir={run_dir}"]), cwd=tmp_path, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_rows(run_dir / "metrics.csv", 40, process)  # in epoch 2
    job = process_tree(process.pid)
    assert len(job) == 3  # the agent and two workers
    for pid in job:
        os.kill(pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert stderr.count("error: SIGTERM at step") == 2, stderr  # one line from each worker
    position = torch.load(run_dir / "checkpoint.pt", weights_only=False)["position"]
    assert 40 <= position["step"] < 96
    assert pd.read_csv(run_dir / "metrics.csv").step.tolist() == list(range(1, position["step"] + 1))

    resumed = subprocess.run(torchrun([*args, f"hydra.run.dir={run_dir}", "resume=true"]), cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    columns = ["step", "epoch", "loss"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full" / "metrics.csv")[columns], pd.read_csv(run_dir / "metrics.csv")[columns])


def test_global_batch_is_split_into_the_ranks_slices():
    from adacov.data import make_synthetic

    data = make_synthetic(train_size=64, test_size=8, num_classes=10, image_size=8, channels=3, seed=0)
    whole = list(data.train_batches(16, torch.Generator().manual_seed(3)))
    parts = [list(data.train_batches(16, torch.Generator().manual_seed(3), shard=(r, 2))) for r in range(2)]
    later = list(data.train_batches(16, torch.Generator().manual_seed(3), skip=2))
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), x)
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), y)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[2:], later, strict=True))


def _check_ranks(rank: int, init_file: str, offset: float, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        Replicas(rank, 2).check_in_sync([torch.ones(3), torch.full((2,), 1.0 + offset * rank)])
        queue.put((rank, "in sync"))
    except RunError as error:
        queue.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("offset", "expected"), [(0.0, "in sync"), (1e-7, "differ")])
def test_check_in_sync_raises_on_every_rank_when_states_differ(tmp_path, offset, expected):
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_check_ranks, args=(r, str(tmp_path / "init"), offset, queue)) for r in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert set(results) == {0, 1} and all(expected in message for message in results.values())
