"""Curvature-aware Adam variants as torch optimizers."""

from adacov.optim.adacov import AdaCov

__all__ = ["AdaCov"]
