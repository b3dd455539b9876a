"""Data-parallel training of one run over the processes ``torchrun`` starts (DDP).

Every rank draws the same global batch and trains on its contiguous slice; DDP averages the
gradients, so each rank's optimizer sees the single-process gradient and its state stays identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from adacov.errors import RunError, UserError


@dataclass(frozen=True)
class Replicas:
    """This process's place among the ``world_size`` ranks of a run (1 rank: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module whose backward averages gradients over the ranks (the model itself on one rank)."""
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over the ranks (``tensor`` itself on one rank)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: Tensor) -> Tensor:
        """The elementwise mean of ``tensor`` over the ranks (``tensor`` itself on one rank)."""
        return self.sum(tensor) / self.world_size if self.distributed else tensor

    def check_in_sync(self, tensors: Iterable[Tensor]) -> None:
        """Raise unless every rank holds bit-identical ``tensors`` (weights, optimizer state) to rank 0's.

        Compares each tensor's float64 sum and sum of squares, so one broadcast and one all-reduce of
        two numbers per tensor suffice; every rank raises together, none is left waiting.
        """
        if not self.distributed:
            return
        sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors])
        reference = sums.clone()
        dist.broadcast(reference, src=0)
        differ = self.sum(torch.tensor([float(not torch.equal(sums, reference))], device=sums.device))
        if differ.item():
            raise RunError(
                f"the {self.world_size} processes' weights or optimizer states differ: they must stay identical; "
                "check that every rank runs the same code and config"
            )

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start_replicas(device_name: str, batch_size: int) -> tuple[Replicas, str]:
    """Join the process group ``torchrun`` describes in the environment; return it and this rank's device.

    Without ``WORLD_SIZE > 1`` in the environment this is a plain run on ``device_name``. Ranks on
    CUDA use ``cuda:LOCAL_RANK`` and NCCL; on CPU they use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Replicas(), device_name
    if batch_size % world_size:
        raise UserError(f"batch_size={batch_size} is not allowed with {world_size} processes: use a multiple of {world_size}")
    replicas = Replicas(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(replicas.local_rank)
        device_name = f"cuda:{replicas.local_rank}"
    else:
        device_name = "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return replicas, device_name

