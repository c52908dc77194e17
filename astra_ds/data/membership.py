"""Vectorised membership tests against a sparse label matrix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class CSRMembership:
    """Answers "is (row, col) a nonzero of this CSR matrix?" for many pairs at once."""

    def __init__(self, matrix: sp.csr_matrix):
        rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
        self.num_cols = matrix.shape[1]
        self.keys = np.sort(rows * self.num_cols + matrix.indices.astype(np.int64))

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        probe = np.asarray(rows, np.int64) * self.num_cols + np.asarray(cols, np.int64)
        if len(self.keys) == 0:  # a matrix without nonzeros contains nothing
            return np.zeros(probe.shape, bool)
        found = np.searchsorted(self.keys, probe)
        return (found < len(self.keys)) & (self.keys[np.minimum(found, len(self.keys) - 1)] == probe) \
            & (np.asarray(cols) >= 0)
