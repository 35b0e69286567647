"""A numpy array indexed by row that grows by doubling as rows are added (the search index's rows
only ever increase)."""

from __future__ import annotations

import numpy as np


class Growable:
    """`data[:n]` is valid after `ensure(n)`; new rows start at `fill`. `width` adds a second axis."""

    def __init__(self, dtype, fill=0, width: int | None = None) -> None:
        self.fill = fill
        self.width = width
        self.data = self._new(1024, dtype)

    def _new(self, rows: int, dtype) -> np.ndarray:
        shape = (rows,) if self.width is None else (rows, self.width)
        if self.fill == 0:
            # np.zeros takes pages the OS zeroes when first touched, so the half a doubling reserves
            # costs no memory or time until rows reach it; np.full writes (and so commits) all of it.
            return np.zeros(shape, dtype=dtype)
        return np.full(shape, self.fill, dtype=dtype)

    def ensure(self, n: int) -> None:
        if n > len(self.data):
            bigger = self._new(max(n, 2 * len(self.data)), self.data.dtype)
            bigger[:len(self.data)] = self.data
            self.data = bigger
