"""Curvature-aware Adam variants as torch optimizers."""

from adacov.optim.adacov import AdaCov
from adacov.optim.eadam import EAdam
from adacov.optim.kfac import EKFAC, KFAC, TEKFAC, TKFAC, kfac_param_groups
from adacov.optim.mbf import MBF, mbf_param_groups

__all__ = ["AdaCov", "EAdam", "EKFAC", "KFAC", "MBF", "TEKFAC", "TKFAC", "kfac_param_groups", "mbf_param_groups"]
