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

pytestmark = pytest.mark.numerics

# In float64 a global batch split over two ranks gives the single-process gradient to ~1e-16 relative, and
# every optimizer here damps what rounding could magnify (Adam's eps, AdaCov's cov_eps, MBF's damping), so
# 16 steps at lr 3e-3 stay within ~1e-12 of one process on any CPU kernel set. Measured under each kernel
# set (results/ddp_rounding_cpu.md): at most 1.7e-15 (weights) and 3.9e-16 (relative loss). EKFAC's
# eigenvectors within clusters of close eigenvalues turn by rounding / gap, which it then magnifies: 1.8e-10
# and 1e-13 under AVX2, so it gets 100x that. A wrong gradient average (a sum, a missed rank) moves weights
# by ~lr = 3e-3.
# Per optimizer: (weight atol, relative loss tolerance).
FLOAT64_TOLERANCES = {"adam": (1e-10, 1e-12), "adacov": (1e-10, 1e-12), "mbf": (1e-10, 1e-12), "ekfac": (1e-8, 1e-11)}
# In float32 that rounding is ~1e-7, and where a gradient entry is near zero, Adam's m_hat / sqrt(v_hat) is
# close to its sign, so the split can move a weight by up to a full learning rate; how often depends on the
# CPU's kernels (Adam's weights 1.2e-3 apart on an AMD EPYC with AVX-512; 2e-7 on each kernel set of the
# machine behind results/ddp_rounding_cpu.md). Float32 only shows that the ranks stay identical (checked
# every epoch) and that the losses agree loosely: measured within 1e-7 relative on every kernel set, while
# logging one rank's half-batch loss instead of the global batch's would differ by ~1e-2.
FLOAT32_LOSS_RTOL = 1e-3


def torchrun(args: list[str], processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(ROOT / "train.py"), *args]


def _adacov_weights_after_16_steps(split_batch: bool) -> torch.Tensor:
    """The small conv6 net's float64 weights after 16 AdaCov steps on random batches of 32, with each
    gradient taken on the whole batch or as the mean of its two halves' gradients (what 2 DDP ranks compute)."""
    torch.manual_seed(0)
    model = ConvNet6(3, [4, 4, 8, 8, 8, 8], in_channels=3, image_size=32, num_classes=100).double()
    optimizer = AdaCov(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(16):
        x = torch.randn(32, 3, 32, 32, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 100, (32,), generator=generator)
        optimizer.zero_grad()
        for part in (slice(0, 16), slice(16, 32)) if split_batch else (slice(0, 32),):
            loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
            (loss / 2 if split_batch else loss).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_splitting_a_batch_moves_adacov_only_by_rounding_in_float64():
    """The premise of FLOAT64_TOLERANCES, in one process: AdaCov's inverse root, which magnifies gradient
    differences by up to 1 / cov_eps, leaves a split batch within rounding of the whole one in float64."""
    difference = (_adacov_weights_after_16_steps(True) - _adacov_weights_after_16_steps(False)).abs().max()
    assert difference < 1e-12, difference.item()


def _one_and_two_processes(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """Train ``args`` in one process and in two torchrun processes; return both run directories."""
    one = run_cli([*args, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"]), cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr  # includes each epoch's check that both ranks' states are identical
    assert json.loads((tmp_path / "two" / "environment.json").read_text())["processes"] == 2
    return tmp_path / "one", tmp_path / "two"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.parametrize("optimizer", list(FLOAT64_TOLERANCES))
def test_two_processes_take_the_steps_of_one_process_in_float64(tmp_path, optimizer):
    """EKFAC averages its factor and moment statistics over the ranks. It runs with one batch's curvature and a
    basis every step: the linear layer's input factor (32 samples, 129 inputs) has a null space whose basis eigh
    picks arbitrarily, and rounding alone would pick another (see test_kfac's float32 test)."""
    every = ["optimizer.curvature_every=1", "optimizer.inverse_every=1", "optimizer.stat_decay=0.0"] if optimizer == "ekfac" else []
    args = [*SMALL, "device=cpu", "wandb.mode=disabled", "epochs=2", f"optimizer={optimizer}", "optimizer.lr=0.003", "dtype=float64", *every]
    one, two = _one_and_two_processes(tmp_path, args)
    a, b = pd.read_csv(one / "metrics.csv"), pd.read_csv(two / "metrics.csv")
    assert a.step.tolist() == b.step.tolist() == list(range(1, 17))
    assert a.loss.iloc[-1] < a.loss.iloc[0] - 0.01  # the weights moved, so the comparison means something
    weight_atol, loss_rtol = FLOAT64_TOLERANCES[optimizer]
    torch.testing.assert_close(torch.tensor(b.loss.values), torch.tensor(a.loss.values), rtol=loss_rtol, atol=0)
    wa, wb = _weights(one), _weights(two)
    assert all(w.dtype == torch.float64 for w in wa.values())
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=weight_atol)


def test_two_processes_in_float32_stay_in_sync_and_agree_loosely(tmp_path):
    args = [*SMALL, "device=cpu", "wandb.mode=disabled", "epochs=2", "optimizer=adacov", "optimizer.lr=0.003"]
    one, two = _one_and_two_processes(tmp_path, args)
    a, b = pd.read_csv(one / "metrics.csv"), pd.read_csv(two / "metrics.csv")
    assert a.step.tolist() == b.step.tolist() == list(range(1, 17))
    torch.testing.assert_close(torch.tensor(b.loss.values), torch.tensor(a.loss.values), rtol=FLOAT32_LOSS_RTOL, atol=0)
    assert all(w.dtype == torch.float32 for w in _weights(two).values())


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
