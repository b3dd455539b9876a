"""Hyperparameter checks shared by the optimizers: each raises ValueError naming the value."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_lr(lr: float | torch.Tensor) -> None:
    """Reject a negative (or NaN) learning rate, and a tensor lr with other than one element (as torch.optim)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor of shape {tuple(lr.shape)} (a tensor lr must be 1-element)")
        lr = lr.item()
    check_nonnegative("lr", lr)


def check_bool(name: str, value: bool) -> None:
    """Reject anything but True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def check_positive(name: str, value: float) -> None:
    """Reject ``value <= 0`` (and NaN)."""
    if not value > 0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")


def check_nonnegative(name: str, value: float) -> None:
    """Reject ``value < 0`` (and NaN)."""
    if not value >= 0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")


def check_unit_interval(name: str, value: float) -> None:
    """Reject values outside ``[0, 1)`` (and NaN): decay rates and momenta."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def check_positive_int(name: str, value: int) -> None:
    """Reject anything but an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def check_nonnegative_int(name: str, value: int) -> None:
    """Reject anything but an integer ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")


def check_betas(betas: Sequence[float], name: str = "betas") -> None:
    """Reject betas that are not two numbers in [0, 1)."""
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid {name}: {tuple(betas)} (each must be in [0, 1))")


def check_dtypes(optimizer: str, params: Iterable[torch.Tensor]) -> None:
    """Reject parameters outside float32 / float64: the batched eigh and Cholesky have no half-precision kernels."""
    for p in params:
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"Invalid parameter dtype: {p.dtype} ({optimizer} supports float32 and float64; "
                "keep the weights in float32, e.g. under torch.autocast)"
            )
