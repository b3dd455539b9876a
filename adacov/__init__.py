"""AdaCov: Adam with gradient covariances inside convolution kernels, and its baselines."""

from adacov.optim import (
    BKFAC,
    EKFAC,
    KFAC,
    KLDWRM,
    MBF,
    RSKFAC,
    SENG,
    SREKFAC,
    TEKFAC,
    TKFAC,
    AdaCov,
    EAdam,
    Whitening,
    kfac_param_groups,
    mbf_param_groups,
)

__all__ = [
    "AdaCov", "BKFAC", "EAdam", "EKFAC", "KFAC", "KLDWRM", "MBF", "RSKFAC", "SENG", "SREKFAC", "TEKFAC", "TKFAC",
    "Whitening", "kfac_param_groups", "mbf_param_groups",
]  # fmt: skip
__version__ = "0.1.0"
