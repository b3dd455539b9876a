"""An image classification dataset held as uint8 tensors, batched and augmented on its device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class ImageData:
    """Train and test images ``[N, C, H, W]`` (uint8) with int64 labels ``[N]``.

    ``augment`` turns on the CIFAR recipe for training batches: random crop after zero-padding by
    ``crop_padding`` pixels, then (if ``flip``) a horizontal flip with probability 1/2.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    def to(self, device: torch.device) -> ImageData:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return replace(self, **move)

    def normalizer(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std of the training images, shaped ``[1, C, 1, 1]`` in [0, 1] units."""
        x = self.train_x.float().div_(255)
        return x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-3)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (the last partial batch is dropped, as 50,000 / 128 -> 390)."""
        return self.train_x.shape[0] // batch_size

    def train_batches(
        self,
        batch_size: int,
        generator: torch.Generator,
        skip: int = 0,
        shard: tuple[int, int] = (0, 1),
        order: Tensor | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled (and, if enabled, augmented) uint8 batches, drawn from ``generator``.

        ``generator`` first draws a permutation of the training set, then each batch's crops and flips.
        The epoch visits the images in that permutation's order, or in ``order`` (``[N]`` indices) where
        given; the permutation is drawn either way, so the augmentation's numbers (batch ``i``, slot ``k``)
        do not depend on the order. Every global batch of ``batch_size`` is drawn whole, so the random
        stream does not depend on ``skip`` or ``shard``. ``skip`` drops the epoch's first batches (a resumed
        epoch); ``shard = (rank, world_size)`` yields rank's contiguous ``batch_size // world_size`` slice
        of each batch.
        """
        rank, world_size = shard
        local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        permutation = torch.randperm(self.train_x.shape[0], generator=generator, device=generator.device)
        order = permutation if order is None else order
        for i in range(self.steps_per_epoch(batch_size)):
            index = order[i * batch_size : (i + 1) * batch_size]
            crops = draw_crop_flip(batch_size, self.crop_padding, generator) if self.augment else None
            if i < skip:
                continue
            x = self.train_x[index[local]]
            if crops is not None:
                dy, dx, flip = (c[local] for c in crops)
                x = crop_flip(x, self.crop_padding, dy, dx, flip & self.flip)
            yield x, self.train_y[index[local]]


def draw_crop_flip(n: int, padding: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets ``dy, dx`` in ``[0, 2 * padding]`` and flip flags, each ``[n, 1]``."""
    device = generator.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    flip = torch.rand(n, 1, generator=generator, device=device) < 0.5
    return dy, dx, flip


def crop_flip(x: Tensor, padding: int, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
    """``H x W`` crops of the zero-padded batch at offsets ``(dy, dx)``, mirrored where ``flip``, batched.

    Args:
        x: ``[N, C, H, W]`` images; padding: pixels of zeros added on each side before cropping;
        dy, dx, flip: ``[N, 1]`` from :func:`draw_crop_flip`.

    Returns:
        ``[N, C, H, W]``: sample ``n`` is ``pad(x)[n, :, dy_n : dy_n + H, dx_n : dx_n + W]``, mirrored
        left-right where ``flip_n``.
    """
    n, c, h, w = x.shape
    device = x.device
    cols = torch.arange(w, device=device)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h, device=device) + dy
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

