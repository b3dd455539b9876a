"""scikit-learn's handwritten digits (1,797 real 8x8 images that ship inside the package)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits as sklearn_digits

from adacov.data.image_data import ImageData
from adacov.errors import UserError


def load_digits(test_fraction: float = 0.2, seed: int = 0, augment: bool = True) -> ImageData:
    """Digits as ``[N, 1, 8, 8]`` uint8 (0..16 rescaled to 0..255), split by a seeded permutation.

    Augmentation shifts each training image by up to one pixel (crop after zero-padding by 1), never
    flips it: a mirrored digit is another symbol or none.
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"data.test_fraction={test_fraction} is not allowed: use a value in (0, 1)")
    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return ImageData("digits", x[train], y[train], x[test], y[test], 10, augment=augment, crop_padding=1, flip=False)
