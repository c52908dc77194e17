"""A keyed bijection of [0, n): the order of an epoch's rows computed for any positions, without the O(n) array of a
shuffle (a billion rows would take 8 GB a rank). A balanced Feistel network over the smallest even number of bits
that holds n, its round function a keyed splitmix64, and cycle-walking back into [0, n) (fewer than four rounds
of it on average, since the domain is under 4n)."""

from __future__ import annotations

import numpy as np

from astra_ds.hashing import GOLDEN, mix64

ROUNDS = 4


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 `x`: the golden increment, then the finaliser."""
    with np.errstate(over="ignore"):
        return mix64(x + GOLDEN)


class KeyedPermutation:
    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"a permutation of [0, {n}) has no element")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        with np.errstate(over="ignore"):
            self.keys = splitmix64(np.uint64(key) * GOLDEN + np.arange(ROUNDS, dtype=np.uint64))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (splitmix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, positions) -> np.ndarray:
        """The rows at `positions` (int64 array or int) of the permuted order."""
        positions = np.asarray(positions, dtype=np.int64)
        x = positions.reshape(-1)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must be in [0, {self.n})")
        y = self._feistel(x.astype(np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._feistel(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64).reshape(positions.shape)
