"""AdaCov under torch.distributed: the ranks share each step's decompositions and take the single-process steps.

Two gloo ranks (spawned, as tests/test_distributed.py starts them) each compute the whole batch's gradient, which
is what DDP's averaged gradient is, so the comparison isolates the optimizer: float64 weights after 8 steps equal
one process's within rounding, each rank decomposes only its share, and checkpoints move between 1 and 2 ranks.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adacov import AdaCov
from adacov.optim import adacov as adacov_module
from adacov.optim.distributor import assign_shares, dealt_rows
from tests.helpers import batches, loss_and_backward, small_convnet

pytestmark = pytest.mark.numerics

STEPS, SAVED_AT = 8, 4
MODES = {
    "exact": dict(lr=1e-2, offdiag_warmup=5.0),
    "fast": dict(lr=1e-2, offdiag_warmup=5.0, basis_refresh_every=3, basis_refresh_warmup=2, basis_drift_threshold=2.0),
}
BLOCKS = {9: 6, 25: 12}  # small_convnet: a 3x3 conv [3, 2] and a 5x5 conv [4, 3]; the 1x1 conv takes the diagonal rule


def _train(mode: str, first: int = 1, checkpoint: Path | None = None, save: Path | None = None, **kw) -> list[torch.Tensor]:
    """Steps ``first..STEPS`` of ``mode`` on small_convnet in float64, from ``checkpoint`` if given (saved after
    step ``first - 1``); with ``save``, rank 0 (or the only process) saves model and optimizer after SAVED_AT."""
    net = small_convnet()
    optimizer = AdaCov(net.parameters(), **MODES[mode], **kw)
    if checkpoint is not None:
        saved = torch.load(checkpoint)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    for t, (x, y) in enumerate(batches(STEPS)[first - 1 :], start=first):
        loss_and_backward(net, x, y)
        optimizer.step()
        if save is not None and t == SAVED_AT and not (dist.is_initialized() and dist.get_rank()):
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, save)
    return [p.detach().clone() for p in net.parameters()]


def _rank(rank: int, directory: str, queue) -> None:
    """One of two ranks: every mode uninterrupted (saving after SAVED_AT), resumed from one process's checkpoint,
    and exact mode with sharing turned off; the blocks each eigh call decomposed along the way."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/init", rank=rank, world_size=2)
    counts: list[int] = []
    real = adacov_module.symmetric_eigh

    def counting(A, out=None):
        counts.append(A.shape[0])
        return real(A, out=out)

    adacov_module.symmetric_eigh = counting
    try:
        found = {}
        for mode in MODES:
            counts.clear()
            found[mode] = (_train(mode, save=Path(directory, f"{mode}-2.pt")), list(counts))
            found[f"{mode} from 1 rank"] = (_train(mode, SAVED_AT + 1, Path(directory, f"{mode}-1.pt")), [])
        counts.clear()
        found["exact, not shared"] = (_train("exact", shard_decompositions=False), list(counts))
        queue.put((rank, {key: ([w.numpy() for w in weights], n) for key, (weights, n) in found.items()}))  # by value
    except Exception:  # the parent stops both ranks at once instead of waiting out the other one's collective
        queue.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """One process's checkpoints, then both ranks' results (one spawn for every check of this file)."""
    directory = tmp_path_factory.mktemp("ranks")
    for mode in MODES:
        _train(mode, save=directory / f"{mode}-1.pt")
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_rank, args=(r, str(directory), queue)) for r in range(2)]
    for process in processes:
        process.start()
    results: dict[int, dict | str] = {}
    try:
        while len(results) < len(processes):
            rank, found = queue.get(timeout=300)
            assert not isinstance(found, str), f"rank {rank} failed:\n{found}"
            results[rank] = found
    finally:
        for process in processes:
            process.join(timeout=60 if len(results) == len(processes) else 0)
            if process.is_alive():
                process.terminate()
    return directory, results


def _assert_close(found: list, expected: list[torch.Tensor]) -> None:
    for a, b in zip(found, expected):
        torch.testing.assert_close(torch.as_tensor(a), b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_take_the_single_process_steps_and_stay_identical(two_ranks, mode):
    _, results = two_ranks
    expected = _train(mode)
    for rank in (0, 1):
        _assert_close(results[rank][mode][0], expected)
    assert all((a == b).all() for a, b in zip(results[0][mode][0], results[1][mode][0]))


def test_each_rank_decomposes_its_share(two_ranks):
    """Exact mode: every step, the 5x5 blocks (cost 25^3) split 6 / 6, then the 3x3 blocks 3 / 3; with sharing
    off, every rank decomposes every block. Fast mode: the two ranks' shares add up to one process's blocks."""
    _, results = two_ranks
    for rank in (0, 1):
        assert results[rank]["exact"][1] == [3, 6] * STEPS
        assert results[rank]["exact, not shared"][1] == [6, 12] * STEPS
    assert sum(results[0]["fast"][1]) + sum(results[1]["fast"][1]) == _single_process_blocks("fast")


def _single_process_blocks(mode: str) -> int:
    counts: list[int] = []
    real = adacov_module.symmetric_eigh
    adacov_module.symmetric_eigh = lambda A, out=None: counts.append(A.shape[0]) or real(A, out=out)
    try:
        _train(mode)
    finally:
        adacov_module.symmetric_eigh = real
    return sum(counts)


@pytest.mark.parametrize("mode", list(MODES))
def test_checkpoints_move_between_one_and_two_ranks(two_ranks, mode):
    """Saved by two ranks and resumed in one process, or saved by one process and resumed on two ranks: the
    uninterrupted single-process run's weights."""
    directory, results = two_ranks
    expected = _train(mode)
    _assert_close(_train(mode, SAVED_AT + 1, directory / f"{mode}-2.pt"), expected)
    for rank in (0, 1):
        _assert_close(results[rank][f"{mode} from 1 rank"][0], expected)


def test_shares_follow_the_greedy_schedule_by_cost():
    """Costliest blocks first, each to the least loaded rank (ties to the lower rank)."""
    assert assign_shares(((12, 25**3), (6, 9**3)), 2) == ((6, 6), (3, 3))
    assert assign_shares(((5, 1),), 3) == ((2, 2, 1),)
    assert assign_shares(((1, 100), (3, 40)), 2) == ((1, 0), (0, 3))  # 100 | 40 40 40 -> loads 100 / 120
    assert sum(assign_shares(((31840, 25**3),), 4)[0]) == 31840


def test_shares_are_dealt_out_across_the_job():
    """Each rank's blocks spread over the whole job: equal shares in turn, unequal ones in proportion; together
    every block once."""
    assert [r.tolist() for r in dealt_rows((3, 3))] == [[0, 2, 4], [1, 3, 5]]
    assert [r.tolist() for r in dealt_rows((2, 2, 1))] == [[0, 3], [1, 4], [2]]
    assert [r.tolist() for r in dealt_rows((4, 2))] == [[0, 2, 3, 5], [1, 4]]  # places 0 1/4 1/2 3/4 | 0 1/2
    assert [r.tolist() for r in dealt_rows((1, 0))] == [[0], []]
    rows = dealt_rows((7, 6, 6))
    assert torch.sort(torch.cat(rows)).values.tolist() == list(range(19))
    assert all(abs(r.double().mean() - 9) <= 1 for r in rows)  # each rank's blocks centred on the job's
