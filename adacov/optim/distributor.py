"""Sharing batched block computations (decompositions) among the ranks of a process group.

Under data parallelism every rank holds the same optimizer state and sees the same averaged gradient, so every
rank would decompose every block. A :class:`Distributor` instead splits each batch of blocks into shares balanced
by cost (greedy, costliest blocks first, as Distributed Shampoo and KAISA assign theirs), runs each rank's share on
that rank, and all-gathers the results, so every rank ends with every block's result and the state stays
identical. A share's blocks are dealt out across its batch rather than taken as one contiguous range: blocks of
one size still differ in cost from layer to layer (a kernel with a zero gradient decomposes at once), and with
contiguous halves of the paper's net one of two ranks waited in the all-gather for the other. The
optimizers describe their work as :class:`Job` s and keep their math free of process-group code; on one process
a job runs whole, with no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Distributor", "Job", "Rows", "assign_shares", "dealt_rows"]

# The blocks a job computes: a range of them (a slice with step 1), or their indices in ascending order.
Rows = slice | Tensor

# torch >= 2.11 names the single-tensor all-gather all_gather_single; older releases all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Job:
    """``blocks`` same-size blocks whose results ``compute(rows)`` returns as a tensor ``[len(rows), width]``, in the
    order of ``rows``; each block costs ``cost`` (e.g. ``d^3`` for a ``d x d`` decomposition)."""

    blocks: int
    cost: int
    width: int
    dtype: torch.dtype
    device: torch.device
    compute: Callable[[Rows], Tensor]


@lru_cache(maxsize=256)
def assign_shares(jobs: tuple[tuple[int, int], ...], world_size: int) -> tuple[tuple[int, ...], ...]:
    """For each job ``(blocks, cost per block)``, how many of its blocks each rank takes, in rank order
    (``dealt_rows`` says which).

    The greedy schedule: jobs by decreasing cost per block, each block to the rank with the least cost so far
    (ties: the lower rank). For ``n`` blocks of cost ``c`` and loads ``L``, rank ``r``'s ``j``-th block would
    arrive at load ``L_r + j c``, so the ``n`` blocks go to the ``n`` smallest of those slots, ordered by load then
    rank: one stable sort instead of ``n`` heap operations.
    """
    loads = torch.zeros(world_size, dtype=torch.int64)
    counts: dict[int, tuple[int, ...]] = {}
    for index in sorted(range(len(jobs)), key=lambda i: -jobs[i][1]):
        blocks, cost = jobs[index]
        slots = loads[:, None] + cost * torch.arange(blocks, dtype=torch.int64)  # [world_size, blocks], rank-major
        first = torch.sort(slots.flatten(), stable=True).indices[:blocks]
        share = torch.bincount(first // blocks, minlength=world_size)
        loads += cost * share
        counts[index] = tuple(share.tolist())
    return tuple(counts[i] for i in range(len(jobs)))


@lru_cache(maxsize=256)
def dealt_rows(share: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Each rank's blocks of a job that ``share`` splits: ascending indices, spread over the whole job.

    Rank ``r``'s ``j``-th block is placed at ``j / share[r]`` of the job (ties: the lower rank), so equal shares
    deal the blocks out in turn (rank ``r`` of ``n`` takes ``r, r + n, r + 2n, ...``) and unequal ones in
    proportion.
    """
    owners = torch.cat([torch.full((count,), rank) for rank, count in enumerate(share)])
    places = torch.cat([torch.arange(count, dtype=torch.float64) / count for count in share])
    owners = owners[torch.sort(places, stable=True).indices]
    return tuple(torch.nonzero(owners == rank).flatten() for rank in range(len(share)))


class Distributor:
    """Runs :class:`Job` s on the ranks of the default process group when it has more than one rank and sharing
    is ``enabled``; otherwise runs each job whole on this process."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @property
    def world_size(self) -> int:
        """The ranks sharing the work now (1 without an initialized process group, or when disabled)."""
        if not (self.enabled and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    def run(self, jobs: Sequence[Job]) -> list[Tensor]:
        """Every job's results ``[blocks, width]`` on every rank; each rank computes only its share.

        Jobs of one dtype and device travel in one all-gather: each rank's shares, flattened and padded to the
        largest rank's size. Every rank must call this with the same jobs (sizes and costs), as DDP guarantees.
        """
        world_size = self.world_size
        if world_size == 1:
            return [job.compute(slice(0, job.blocks)) for job in jobs]
        counts = assign_shares(tuple((job.blocks, job.cost) for job in jobs), world_size)
        results: list[Tensor | None] = [None] * len(jobs)
        kinds: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            kinds.setdefault((job.dtype, job.device), []).append(index)
        for indices in kinds.values():
            for index, gathered in zip(indices, _gather([jobs[i] for i in indices], [counts[i] for i in indices])):
                results[index] = gathered
        return results


def _gather(jobs: list[Job], counts: list[tuple[int, ...]]) -> list[Tensor]:
    """Compute this rank's share of each job, all-gather all ranks' shares, and reassemble each job's rows."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = [[r.to(job.device) for r in dealt_rows(share)] for job, share in zip(jobs, counts)]
    mine = [job.compute(dealt[rank]).reshape(-1) for job, dealt in zip(jobs, rows)]
    sizes = [sum(share[r] * job.width for job, share in zip(jobs, counts)) for r in range(world_size)]
    payload = torch.zeros(max(sizes), dtype=jobs[0].dtype, device=jobs[0].device)
    torch.cat(mine, out=payload[: sizes[rank]])
    received = torch.empty(world_size * max(sizes), dtype=payload.dtype, device=payload.device)
    _all_gather(received, payload)
    received = received.view(world_size, max(sizes))
    outputs = [torch.empty(job.blocks, job.width, dtype=job.dtype, device=job.device) for job in jobs]
    for r in range(world_size):
        offset = 0
        for job, dealt, out in zip(jobs, rows, outputs):
            count = dealt[r].numel()
            out.index_copy_(0, dealt[r], received[r, offset : offset + count * job.width].view(count, job.width))
            offset += count * job.width
    return outputs
