"""Uniform negatives: m labels per query drawn from Q_i(l) = 1 / (L - |P_i|) over its non-positive labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from astra_ds.data.membership import CSRMembership


@dataclass
class Negatives:
    global_ids: np.ndarray  # (B, m) int64 label ids, never a positive of their query
    log_q: np.ndarray  # (B, m) float64 log proposal probability Q_i(l) of each draw


def sample_uniform(positives: sp.csr_matrix, num_negatives: int, rng: np.random.Generator,
                   max_rounds: int = 100) -> Negatives:
    """Draw `num_negatives` labels per row of `positives` (B x L), rejecting positives."""
    batch, num_labels = positives.shape
    num_positives = np.diff(positives.indptr)
    if (num_positives >= num_labels).any():
        raise ValueError("a query has every label positive: no negative can be drawn")
    membership = CSRMembership(positives)
    query = np.repeat(np.arange(batch, dtype=np.int64), num_negatives)
    labels = rng.integers(0, num_labels, size=batch * num_negatives)
    pending = np.arange(len(labels))
    for _ in range(max_rounds):
        pending = pending[membership.contains(query[pending], labels[pending])]
        if len(pending) == 0:
            break
        labels[pending] = rng.integers(0, num_labels, size=len(pending))
    else:
        raise RuntimeError(f"uniform negatives: positives still drawn after {max_rounds} rounds")
    log_q = -np.log(num_labels - num_positives.astype(np.float64))
    return Negatives(labels.reshape(batch, num_negatives), np.repeat(log_q, num_negatives).reshape(batch, num_negatives))
