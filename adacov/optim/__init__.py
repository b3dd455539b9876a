"""Curvature-aware Adam variants as torch optimizers."""

from adacov.optim.adacov import AdaCov
from adacov.optim.mbf import MBF, mbf_param_groups

__all__ = ["AdaCov", "MBF", "mbf_param_groups"]
