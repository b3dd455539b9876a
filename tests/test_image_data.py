"""Device-side augmentation against closed-form crops and flips."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adacov.data import crop_flip, load_digits


def test_crop_flip_matches_padding_then_slicing():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).reshape(2, 3, 5, 5)
    dy, dx = torch.tensor([[0], [2]]), torch.tensor([[1], [2]])
    flip = torch.tensor([[False], [True]])
    out = crop_flip(x, 1, dy, dx, flip)
    padded = F.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:5, 1:6])
    assert torch.equal(out[1], padded[1, :, 2:7, 2:7].flip(-1))
    centre = torch.ones(2, 1, dtype=torch.long)
    assert torch.equal(crop_flip(x, 1, centre, centre, torch.zeros(2, 1, dtype=torch.bool)), x)


def test_digits_are_shifted_but_never_mirrored():
    data = load_digits()
    x, _ = next(data.train_batches(len(data.train_y), torch.Generator().manual_seed(0)))
    originals = data.train_x[torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))]
    padded = F.pad(originals, (1, 1, 1, 1))
    shifts = [padded[..., dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    match = torch.stack([(x == s).flatten(1).all(1) for s in shifts])
    mirrored = torch.stack([(x == s.flip(-1)).flatten(1).all(1) for s in shifts])
    assert match.any(0).all()  # every image is one of the 9 one-pixel shifts of its original
    assert match[4].float().mean() < 0.5  # most are moved
    assert not (mirrored.any(0) & ~match.any(0)).any()
