"""AdaCov: Adam with gradient covariances inside convolution kernels, and its baselines."""

from adacov.optim import EKFAC, KFAC, MBF, TEKFAC, TKFAC, AdaCov, EAdam, kfac_param_groups, mbf_param_groups

__all__ = ["AdaCov", "EAdam", "EKFAC", "KFAC", "MBF", "TEKFAC", "TKFAC", "kfac_param_groups", "mbf_param_groups"]
__version__ = "0.1.0"
