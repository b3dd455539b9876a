"""The training loop, its logging, timing and checkpoints."""

from adacov.training.loop import train

__all__ = ["train"]
