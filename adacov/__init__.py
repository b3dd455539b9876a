"""AdaCov: Adam with gradient covariances inside convolution kernels, and its baselines."""

from adacov.optim import MBF, AdaCov, mbf_param_groups

__all__ = ["AdaCov", "MBF", "mbf_param_groups"]
__version__ = "0.1.0"
