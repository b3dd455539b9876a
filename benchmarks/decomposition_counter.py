"""Counting the kernels AdaCov decomposes, for the benchmarks that report it."""

from __future__ import annotations

from adacov.optim import adacov as adacov_module


class DecompositionCounter:
    """Within ``with``, counts the blocks AdaCov's batched eigh decomposes (by wrapping the function its step calls)."""

    def __init__(self) -> None:
        self.blocks = 0
        self._eigh = adacov_module.symmetric_eigh

    def __enter__(self) -> DecompositionCounter:
        def counting(A, out=None):
            self.blocks += A.shape[0]
            return self._eigh(A, out=out)

        adacov_module.symmetric_eigh = counting
        return self

    def __exit__(self, *exc) -> None:
        adacov_module.symmetric_eigh = self._eigh
