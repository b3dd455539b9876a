"""The paper's 6-convolution classifier (section 3), with widths and pooling as parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ConvNet6(nn.Module):
    """Six ``kernel_size`` convolutions with "same" padding and ReLU, max-pooling, a linear head.

    Layout for the defaults (CIFAR, 3x32x32 input)::

        conv(3->32) conv(32->32) pool | conv(32->64) conv(64->64) pool |
        conv(64->128) conv(128->128) pool | flatten(128*4*4) linear(->100)

    Args:
        kernel_size: odd side of the square kernels (the paper: 3 or 5).
        channels: output widths of the 6 convolutions.
        pool_after: 1-based indices of the convolutions followed by a 2x2 max-pool.
        in_channels, image_size, num_classes: the data's shape; ``image_size`` must be divisible by
            ``2 ** len(pool_after)``.

    Input ``[N, in_channels, image_size, image_size]``, output logits ``[N, num_classes]``.
    """

    def __init__(
        self,
        kernel_size: int = 3,
        channels: Sequence[int] = (32, 32, 64, 64, 128, 128),
        pool_after: Sequence[int] = (2, 4, 6),
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        channels, pool_after = list(channels), list(pool_after)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size={kernel_size!r} is not allowed: use an odd size >= 1 (the paper: 3 or 5)")
        if len(channels) != 6 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"model.channels={channels} is not allowed: give 6 positive integers")
        if not all(isinstance(i, int) and 1 <= i <= 6 for i in pool_after) or len(set(pool_after)) != len(pool_after):
            raise ValueError(f"model.pool_after={pool_after} is not allowed: distinct layer indices in 1..6")
        side = image_size // 2 ** len(pool_after)
        if side < 1 or image_size % 2 ** len(pool_after):
            raise ValueError(
                f"image size {image_size} is not divisible by 2^{len(pool_after)} for model.pool_after={pool_after}"
            )
        layers: list[nn.Module] = []
        width = in_channels
        for index, out in enumerate(channels, start=1):
            layers += [nn.Conv2d(width, out, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True)]
            if index in pool_after:
                layers.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
