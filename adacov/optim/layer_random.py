"""Random streams that live in a layer's optimizer state, so that randomized steps resume bit for bit.

A stream is the state of a CPU ``torch.Generator``, its bytes kept as a tensor in the parameter's dtype and on its
device (``load_state_dict`` casts floating-point state to the parameter's dtype, and bytes are exact in float32): it
is saved with ``state_dict()``, copied by ``copy.deepcopy`` and loaded with ``torch.load(weights_only=True)``. Draws
are made in float64 on the CPU and cast, so that a float32 and a float64 run with the same seed draw the same
numbers, on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RNG", "new_stream", "sample_without_replacement", "standard_normal"]

RNG = "generator"  # the state key of a layer's stream


def new_stream(seed: int, like: Tensor) -> Tensor:
    """The state of a generator seeded with ``seed``, in ``like``'s dtype and device."""
    return _stored(torch.Generator().manual_seed(seed), like)


def _stored(generator: torch.Generator, like: Tensor) -> Tensor:
    return generator.get_state().to(dtype=like.dtype, device=like.device)


def _generator(state: dict) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state[RNG].to(device="cpu", dtype=torch.uint8))
    return generator


def standard_normal(state: dict, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``N(0, 1)`` entries of ``shape`` from the layer's stream, in ``like``'s dtype and device; advances the stream."""
    generator = _generator(state)
    sample = torch.randn(shape, generator=generator, dtype=torch.float64)
    state[RNG] = _stored(generator, state[RNG])
    return sample.to(dtype=like.dtype, device=like.device)


def sample_without_replacement(state: dict, population: int, count: int, device: torch.device) -> Tensor:
    """``count`` distinct indices of ``range(population)`` (int64, on ``device``) from the layer's stream."""
    generator = _generator(state)
    index = torch.randperm(population, generator=generator)[:count]
    state[RNG] = _stored(generator, state[RNG])
    return index.to(device)
