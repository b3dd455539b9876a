"""Curvature-aware Adam variants as torch optimizers."""

from adacov.optim.adacov import AdaCov
from adacov.optim.eadam import EAdam
from adacov.optim.kfac import EKFAC, KFAC, TEKFAC, TKFAC, kfac_param_groups
from adacov.optim.kld_wrm import KLDWRM
from adacov.optim.low_rank_kfac import BKFAC, RSKFAC, SREKFAC
from adacov.optim.mbf import MBF, mbf_param_groups
from adacov.optim.seng import SENG
from adacov.optim.whitening import Whitening

__all__ = [
    "AdaCov", "BKFAC", "EAdam", "EKFAC", "KFAC", "KLDWRM", "MBF", "RSKFAC", "SENG", "SREKFAC", "TEKFAC", "TKFAC",
    "Whitening", "kfac_param_groups", "mbf_param_groups",
]  # fmt: skip
