"""Hashes of integer ids: draws that must be a function of an id alone (no generator state), such as the
synthetic generator's rows, the validation split of a prepared set and the keyed epoch permutation. Numpy only,
so that the commands that use them start without torch."""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / the golden ratio: splitmix64's increment


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of `x` as uint64 (wrapping arithmetic): a well-spread hash of integers, for draws
    that must be a function of an id (no generator state, any id alone)."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
