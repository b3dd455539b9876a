"""AdaCov: Adam with gradient covariances inside convolution kernels, and its baselines."""

from adacov.optim import AdaCov

__all__ = ["AdaCov"]
__version__ = "0.1.0"
