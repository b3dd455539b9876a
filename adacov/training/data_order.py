"""The order in which an epoch visits the training images (Mishchenko, Khaled & Richtarik 2020).

- ``rr`` (random reshuffling): a fresh permutation every epoch, drawn from the epoch's generator;
- ``so`` (shuffle once): one permutation, epoch 1's, reused by every epoch;
- ``ig`` (incremental gradient): the dataset's own order, ``0, 1, ..., N-1``.

Every order draws from the same per-epoch generator (see ``ImageData.train_batches``), which also draws
the crops and flips, so the augmentation's numbers are the same under the three orders: only the
images they apply to change. Each rank of a DDP run computes the same order and takes its slice of
each global batch, and a resumed epoch skips its first batches in that same order.
"""

from __future__ import annotations

import torch
from torch import Tensor

DATA_ORDERS = ("rr", "so", "ig")


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of 0-based ``epoch``'s permutation and augmentation for the run's ``seed``."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def fixed_order(name: str, seed: int, size: int, device: torch.device) -> Tensor | None:
    """The ``[size]`` image indices that every epoch visits in turn, or ``None`` for ``rr``.

    ``so``: the permutation epoch 1 draws under ``rr`` (so its first epoch is ``rr``'s); ``ig``: ``arange``.
    """
    if name == "rr":
        return None
    if name == "so":
        return torch.randperm(size, generator=epoch_generator(seed, 0, device), device=device)
    if name == "ig":
        return torch.arange(size, device=device)
    raise ValueError(f"data_order={name!r} is not allowed: use one of {', '.join(DATA_ORDERS)}")
