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
    ``crop_padding`` pixels, then a horizontal flip with probability 1/2.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    augment: bool = True
    crop_padding: int = 4

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

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled (and, if enabled, augmented) uint8 batches, drawn from ``generator``."""
        order = torch.randperm(self.train_x.shape[0], generator=generator, device=generator.device)
        for i in range(self.steps_per_epoch(batch_size)):
            index = order[i * batch_size : (i + 1) * batch_size]
            x = self.train_x[index]
            if self.augment:
                x = random_crop_flip(x, self.crop_padding, generator)
            yield x, self.train_y[index]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, self.test_x.shape[0], batch_size):
            yield self.test_x[i : i + batch_size], self.test_y[i : i + batch_size]


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random ``H x W`` crops of the zero-padded batch and random horizontal flips, all batched.

    Args:
        x: ``[N, C, H, W]`` images; padding: pixels of zeros added on each side before cropping.

    Returns:
        ``[N, C, H, W]``: sample ``n`` is ``pad(x)[n, :, dy_n : dy_n + H, dx_n : dx_n + W]``, mirrored
        left-right with probability 1/2.
    """
    n, c, h, w = x.shape
    device = x.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    flip = torch.rand(n, 1, generator=generator, device=device) < 0.5
    cols = torch.arange(w, device=device)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h, device=device) + dy
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
