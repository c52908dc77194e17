"""Sampled one-vs-all BCE.

loss_i = sum_{l in P_i} softplus(-s_il) + (1/m) sum_j softplus(s_{i,l_j}) / Q_i(l_j),   l_j ~ Q_i,
an unbiased estimate of the full BCE over all L labels; the batch loss is the mean over its queries.
With importance weights off, every sampled negative weighs 1 (plain sampled BCE). NGAME's in-batch negatives
join as a dense block (`in_batch_bce`, see astra_ds/negatives/in_batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.negatives.in_batch import InBatch
from astra_ds.negatives.base import Negatives


@dataclass
class Pairs:
    """The (query, label) pairs scored in a step, flat."""

    query: torch.Tensor  # (n,) row of the query in the batch
    label: torch.Tensor  # (n,) global label id
    target: torch.Tensor  # (n,) 1 for a positive, 0 for a negative
    weight: torch.Tensor  # (n,) loss weight

    def to(self, device) -> "Pairs":
        return Pairs(*(t.to(device, non_blocking=True) for t in (self.query, self.label, self.target, self.weight)))

    def owned(self, start: int, end: int) -> "Pairs":
        """The pairs whose label is one of the rows [start, end) a rank owns."""
        keep = (self.label >= start) & (self.label < end)
        return Pairs(self.query[keep], self.label[keep], self.target[keep], self.weight[keep])


def make_pairs(positives: sp.csr_matrix, negatives: Negatives, importance_weights: bool,
               in_batch: InBatch | None = None) -> Pairs:
    """Positive and sampled-negative pairs. With `in_batch`, the positives are scored in the dense in-batch
    block instead, and sampled negatives inside the batch's labels are dropped (astra_ds/negatives/in_batch.py)."""
    batch, num_negatives = negatives.global_ids.shape
    neg_query = np.repeat(np.arange(batch), num_negatives)
    neg_label = negatives.global_ids.reshape(-1)
    if importance_weights:
        neg_weight = np.exp(-negatives.log_q.reshape(-1)) / num_negatives
    else:
        neg_weight = np.ones(batch * num_negatives)
    if in_batch is None:
        pos_query, pos_label = np.repeat(np.arange(batch), np.diff(positives.indptr)), positives.indices
    else:
        keep = ~in_batch.contains(neg_label)
        neg_query, neg_label, neg_weight = neg_query[keep], neg_label[keep], neg_weight[keep]
        pos_query, pos_label = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return Pairs(
        query=torch.from_numpy(np.concatenate([pos_query, neg_query]).astype(np.int64)),
        label=torch.from_numpy(np.concatenate([pos_label, neg_label]).astype(np.int64)),
        target=torch.cat([torch.ones(len(pos_query)), torch.zeros(len(neg_query))]),
        weight=torch.from_numpy(np.concatenate([np.ones(len(pos_query)), neg_weight]).astype(np.float32)),
    )


def pair_scores(queries: torch.Tensor, calibration: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                pair_query: torch.Tensor, normalize_rows: bool) -> torch.Tensor:
    """s = scale * <q_i, w_l> + bias for each pair; rows[slots[p]] is pair p's classifier row and
    calibration = (log scale, bias)."""
    if normalize_rows:
        rows = F.normalize(rows, dim=-1)
    inner = (queries.index_select(0, pair_query) * rows.index_select(0, slots)).sum(-1)
    return calibration[0].exp() * inner + calibration[1]


def in_batch_bce(queries: torch.Tensor, calibration: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                 normalize_rows: bool) -> torch.Tensor:
    """Summed BCE of every query against every in-batch label: rows (U, d), targets (B, U)."""
    if normalize_rows:
        rows = F.normalize(rows, dim=-1)
    scores = calibration[0].exp() * (queries @ rows.T) + calibration[1]
    return F.binary_cross_entropy_with_logits(scores, targets, reduction="sum")


def sampled_bce(scores: torch.Tensor, pairs: Pairs, num_queries: int) -> torch.Tensor:
    per_pair = F.binary_cross_entropy_with_logits(scores, pairs.target, reduction="none")
    return (pairs.weight * per_pair).sum() / num_queries


def siamese_softmax(queries: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The Siamese stage's loss: each (query, positive label) pair scored against the batch's non-positives, both
    ways (the label among the query's negatives, the query among the label's), mean over the pairs.

    queries (B, d) and labels (U, d) unit vectors, targets (B, U) 1 where the label is a positive of the query.
    A query's other positives are left out of its softmax (DEXML's decoupled softmax), so a query with several
    labels is not asked to rank one above the others."""
    scores = scale * queries @ labels.T
    positive = targets > 0

    def one_way(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        negatives = torch.logsumexp(scores.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
        return -(scores - torch.logaddexp(scores, negatives))[positive].sum()

    return (one_way(scores, positive) + one_way(scores.T, positive.T)) / positive.sum().clamp_min(1)
