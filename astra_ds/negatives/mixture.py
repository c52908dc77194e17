"""The ASTRA proposal: a mixture of hard negatives from a shortlist and uniform negatives.

    Q_i(l) = alpha_i * softmax_{S_i \\ P_i}(t_il / tau)(l) + (1 - alpha_i) / (L - |P_i|)

over the non-positive labels l, where S_i is the query's shortlist with (stale) scores t_il. Positives (and
padding ids < 0) are left out of the softmax, so Q_i is a distribution over exactly the labels a negative may
be, and positives are never drawn. alpha_i = alpha, or 0 when S_i holds nothing but positives. A shortlist
holds distinct label ids (as a faiss search returns them), padded with -1.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from astra_ds.data.membership import CSRMembership
from astra_ds.negatives.base import Negatives
from astra_ds.negatives.uniform import sample_uniform


def shortlist_distribution(positives: sp.csr_matrix, shortlist_ids: np.ndarray, shortlist_scores: np.ndarray,
                           tau: float) -> np.ndarray:
    """(B, K) softmax of t / tau over each shortlist, zero on positives and padding."""
    rows = np.repeat(np.arange(positives.shape[0]), shortlist_ids.shape[1])
    is_positive = CSRMembership(positives).contains(rows, shortlist_ids.reshape(-1)).reshape(shortlist_ids.shape)
    valid = (shortlist_ids >= 0) & ~is_positive
    logits = np.where(valid, shortlist_scores.astype(np.float64) / tau, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def mixture_log_q(positives: sp.csr_matrix, shortlist_ids: np.ndarray, p_short: np.ndarray, alpha: float,
                  labels: np.ndarray) -> np.ndarray:
    """log Q_i(l) of labels (B, n), all non-positive."""
    batch, num_labels = positives.shape
    alpha_i = np.where(p_short.sum(axis=1) > 0, alpha, 0.0)[:, None]
    uniform = 1.0 / (num_labels - np.diff(positives.indptr))[:, None]
    # shortlist mass of each label: look (row, label) up among the sorted keys row * L + shortlist id
    rows = np.arange(batch, dtype=np.int64)[:, None]
    keys = np.where(shortlist_ids >= 0, rows * num_labels + shortlist_ids, -1).reshape(-1)  # padding never matches
    order = np.argsort(keys, kind="stable")
    keys, mass = keys[order], p_short.reshape(-1)[order]
    probe = (rows * num_labels + labels).reshape(-1)
    found = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
    in_short = np.where(keys[found] == probe, mass[found], 0.0).reshape(labels.shape)
    with np.errstate(divide="ignore"):  # alpha = 1: labels outside the shortlist have Q = 0
        return np.log(alpha_i * in_short + (1 - alpha_i) * uniform)


def sample_mixture(positives: sp.csr_matrix, shortlist_ids: np.ndarray, shortlist_scores: np.ndarray,
                   num_negatives: int, alpha: float, tau: float, rng: np.random.Generator) -> Negatives:
    """Draw `num_negatives` labels per query from Q_i, with their log-probabilities."""
    positives = sp.csr_matrix(positives)
    batch = positives.shape[0]
    p_short = shortlist_distribution(positives, shortlist_ids, shortlist_scores, tau)
    alpha_i = np.where(p_short.sum(axis=1) > 0, alpha, 0.0)

    # inverse-CDF draws from each row's shortlist distribution, vectorised by offsetting row i by i
    cdf = np.cumsum(p_short, axis=1)
    offsets = np.arange(batch)[:, None]
    u = rng.random((batch, num_negatives)) * cdf[:, -1:]  # below each row's total: never a zero-mass entry
    slot = np.searchsorted((cdf + offsets * 2).reshape(-1), (u + offsets * 2).reshape(-1), side="right")
    slot = np.minimum(slot.reshape(batch, num_negatives) - offsets * shortlist_ids.shape[1], shortlist_ids.shape[1] - 1)
    hard = np.take_along_axis(shortlist_ids, slot, axis=1)

    uniform = sample_uniform(positives, num_negatives, rng).global_ids
    labels = np.where(rng.random((batch, num_negatives)) < alpha_i[:, None], hard, uniform)
    return Negatives(labels, mixture_log_q(positives, shortlist_ids, p_short, alpha, labels))
