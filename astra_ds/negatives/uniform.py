"""Uniform negatives: m labels per query drawn from Q_i(l) = 1 / (L - |P_i|) over its non-positive labels."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from astra_ds.negatives.base import NegativeSampler, Negatives


def sample_uniform(positives: sp.csr_matrix, num_negatives: int, rng: np.random.Generator) -> Negatives:
    """Draw `num_negatives` labels per row of `positives` (B x L), exactly uniform over its non-positives.

    Draw r in [0, L - |P_i|) and map it to the r-th non-positive label: with the positives sorted,
    p_0 < p_1 < ..., that label is r + #{k : p_k - k <= r}. No rejection loop, so a query with almost every
    label positive costs the same as any other."""
    positives = sp.csr_matrix(positives)
    positives.sort_indices()
    batch, num_labels = positives.shape
    num_positives = np.diff(positives.indptr)
    num_candidates = num_labels - num_positives
    if (num_candidates <= 0).any():
        raise ValueError("a query has every label positive: no negative can be drawn")
    query = np.repeat(np.arange(batch, dtype=np.int64), num_positives)
    # p_k - k, offset by query * L: sorted across the whole batch
    rank_in_row = np.arange(positives.nnz) - np.repeat(positives.indptr[:-1], num_positives)
    keys = query * num_labels + positives.indices.astype(np.int64) - rank_in_row
    draws = (rng.random((batch, num_negatives)) * num_candidates[:, None]).astype(np.int64)
    probes = np.arange(batch, dtype=np.int64)[:, None] * num_labels + draws
    skipped = np.searchsorted(keys, probes, side="right") - positives.indptr[:-1, None]
    log_q = -np.log(num_candidates.astype(np.float64))
    return Negatives(draws + skipped, np.broadcast_to(log_q[:, None], draws.shape).copy())


class UniformSampler(NegativeSampler):
    """`negatives.num_negatives` uniform draws per query, throughout training."""

    def sample(self, query_ids, queries, positives, rng) -> Negatives:
        return sample_uniform(positives, self.cfg.num_negatives, rng)
