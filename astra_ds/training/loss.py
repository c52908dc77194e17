"""The losses of the rows' scores (`classifier.loss`), both over a query's positives and sampled negatives
l_j ~ Q_i, each negative weighted by w_ij = 1 / (m Q_i(l_j)) (1 with importance weights off):

bce:      loss_i = sum_{l in P_i} softplus(-s_il) + sum_j w_ij softplus(s_{i,l_j}),
          an unbiased estimate of the full one-vs-all BCE over all L labels;
softmax:  loss_i = sum_{l in P_i} log(1 + N_i / e^{s_il}),  N_i = sum_j w_ij e^{s_{i,l_j}},
          DEXML's decoupled softmax: each positive against the query's negatives only (not its other positives),
          N_i an unbiased estimate of the sum of e^s over all its negatives.
The batch loss is the mean over its queries. NGAME's in-batch labels join as a dense (B, U) block of scores
whose non-positives weigh 1 (see astra_ds/negatives/in_batch.py). Under several ranks each rank scores the
labels it owns and its loss is its part of the sum: N_i is summed across ranks (`logsumexp_across_ranks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.collectives import logsumexp_across_ranks
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


def in_batch_scores(queries: torch.Tensor, calibration: torch.Tensor, rows: torch.Tensor,
                    normalize_rows: bool) -> torch.Tensor:
    """s = scale * <q_i, w_l> + bias of every query against every in-batch row: (B, U)."""
    if normalize_rows:
        rows = F.normalize(rows, dim=-1)
    return calibration[0].exp() * (queries @ rows.T) + calibration[1]


def one_vs_all_bce(scores: torch.Tensor, pairs: Pairs, num_queries: int, dense_scores: torch.Tensor | None = None,
                   dense_targets: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted BCE of the pairs, plus that of every entry of the dense in-batch block if any, / num_queries."""
    loss = (pairs.weight * F.binary_cross_entropy_with_logits(scores, pairs.target, reduction="none")).sum()
    if dense_scores is not None:
        loss = loss + F.binary_cross_entropy_with_logits(dense_scores, dense_targets, reduction="sum")
    return loss / num_queries


def per_query_logsumexp(values: torch.Tensor, query: torch.Tensor, num_queries: int) -> torch.Tensor:
    """log sum_{p: query[p] = i} e^{values[p]} for each i (-inf where none)."""
    peak = torch.full((num_queries,), float("-inf"), device=values.device, dtype=values.dtype)
    peak = peak.scatter_reduce(0, query, values.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak).index_add(0, query, (values - peak[query]).exp())
    return total.log() + peak


def decoupled_softmax(scores: torch.Tensor, pairs: Pairs, num_queries: int, dense_scores: torch.Tensor | None = None,
                      dense_targets: torch.Tensor | None = None) -> torch.Tensor:
    """sum over (query i, positive l) of log(1 + N_i / e^{s_il}), / num_queries (module docstring)."""
    if dense_scores is None:
        dense_scores = dense_targets = scores.new_zeros((0, 0))
    dense_positive = dense_targets > 0
    dense_query = torch.arange(len(dense_scores), device=scores.device)[:, None].expand_as(dense_scores)
    negative = pairs.target == 0
    log_weighted = torch.cat([scores[negative] + pairs.weight[negative].log(), dense_scores[~dense_positive]])
    log_n = per_query_logsumexp(log_weighted, torch.cat([pairs.query[negative], dense_query[~dense_positive]]),
                                num_queries)
    log_n = logsumexp_across_ranks(log_n)
    positive_scores = torch.cat([scores[~negative], dense_scores[dense_positive]])
    positive_query = torch.cat([pairs.query[~negative], dense_query[dense_positive]])
    return (torch.logaddexp(positive_scores, log_n[positive_query]) - positive_scores).sum() / num_queries


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
