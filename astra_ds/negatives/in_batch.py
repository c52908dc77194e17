"""NGAME in-batch negatives, with the loss kept an unbiased estimate of the full BCE.

The batch's labels U (the union of its queries' positives) are scored densely against every query of the
batch: for query i, the labels of U outside P_i are negatives summed exactly (weight 1), and the m sampled
negatives estimate only the labels outside U, so a draw that falls inside U is dropped:

    neg_i = sum_{l in U \\ P_i} softplus(s_il) + (1/m) sum_j 1[l_j not in U] softplus(s_il_j) / Q_i(l_j),

still unbiased for the sum over all non-positives whatever the proposal Q_i. In plain NGAME mode (importance
weights off) every negative weighs 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class InBatch:
    global_ids: np.ndarray  # (U,) sorted unique labels of the batch's positives
    targets: np.ndarray  # (B, U) float32, 1 where the label is a positive of the query

    def contains(self, labels: np.ndarray) -> np.ndarray:
        """Whether each of `labels` (any shape) is one of the batch's labels."""
        return np.isin(labels, self.global_ids)

    def owned(self, start: int, end: int) -> "InBatch":
        """The batch's labels among the rows [start, end) a rank owns."""
        keep = (self.global_ids >= start) & (self.global_ids < end)
        return InBatch(self.global_ids[keep], self.targets[:, keep])


def batch_labels(positives: sp.csr_matrix) -> InBatch:
    positives = sp.csr_matrix(positives)
    global_ids = np.unique(positives.indices).astype(np.int64)
    targets = np.zeros((positives.shape[0], len(global_ids)), np.float32)
    rows = np.repeat(np.arange(positives.shape[0]), np.diff(positives.indptr))
    targets[rows, np.searchsorted(global_ids, positives.indices)] = 1.0
    return InBatch(global_ids, targets)
