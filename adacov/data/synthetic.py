"""CIFAR-shaped synthetic data: learnable, reproducible, and free of any download."""

from __future__ import annotations

import torch

from adacov.data.image_data import ImageData
from adacov.errors import UserError


def make_synthetic(
    train_size: int = 50_000,
    test_size: int = 10_000,
    num_classes: int = 100,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    augment: bool = True,
) -> ImageData:
    """Images ``clip(128 + 48 * template[label] + 32 * noise)`` as uint8, labels uniform.

    Each class has a fixed random smooth template, so a net can learn the labels; the step time
    matches CIFAR's exactly for the same shapes (it does not depend on pixel values).
    """
    for name, value in (("train_size", train_size), ("test_size", test_size), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"data.{name}={value!r} is not allowed: use an integer >= 1")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, channels, image_size, image_size, generator=g)
        x = (128 + 48 * templates[y] + 32 * noise).clamp_(0, 255).to(torch.uint8)
        return x, y

    train_x, train_y = draw(train_size)
    test_x, test_y = draw(test_size)
    return ImageData("synthetic", train_x, train_y, test_x, test_y, num_classes, augment=augment)
