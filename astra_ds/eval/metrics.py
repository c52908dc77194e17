"""XC metrics, xclib-compatible: P@k, nDCG@k, PSP@k, PSnDCG@k, R@k from top-k predictions.

Conventions of xclib.evaluation.xc_metrics: every test point counts (one without labels scores 0); PSP and
PSnDCG are the mean propensity-weighted score divided by the mean score of the best possible ranking;
R@k divides hits by max(|P_i|, 1). Propensities by Jain et al. (2016):
    1 / p_l = 1 + C (N_l + B)^-A,  C = (log N - 1)(B + 1)^A.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from astra_ds.data.membership import CSRMembership
from astra_ds.data.queries import TrainCounts


def inverse_propensity(train: TrainCounts, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    freqs = train.per_label.astype(np.float64)
    c = (np.log(train.queries) - 1) * (b + 1) ** a
    return 1.0 + c * (freqs + b) ** -a


def relevance(pred_ids: np.ndarray, true_labels: sp.csr_matrix) -> np.ndarray:
    """(N, K) 1.0 where pred_ids[i, j] is a true label of point i (ids < 0 are padding)."""
    rows = np.repeat(np.arange(pred_ids.shape[0]), pred_ids.shape[1])
    return CSRMembership(true_labels).contains(rows, pred_ids.reshape(-1)).reshape(pred_ids.shape).astype(np.float64)


def _best_weights(true_labels: sp.csr_matrix, inv_psp: np.ndarray, k: int) -> np.ndarray:
    """(N, k) inverse propensities of each point's true labels, largest first, zero-padded."""
    counts = np.diff(true_labels.indptr)
    rows = np.repeat(np.arange(true_labels.shape[0]), counts)
    weights = inv_psp[true_labels.indices]
    order = np.lexsort((-weights, rows))
    rank = np.arange(len(order)) - np.repeat(true_labels.indptr[:-1], counts)
    keep = rank < k
    best = np.zeros((true_labels.shape[0], k))
    best[rows[order][keep], rank[keep]] = weights[order][keep]
    return best


def compute_metrics(pred_ids: np.ndarray, true_labels: sp.csr_matrix, inv_psp: np.ndarray,
                    ks=(1, 3, 5)) -> dict[str, float]:
    """Metrics of ranked predictions `pred_ids` (N, >= max(ks)) against `true_labels` (N x L)."""
    true_labels = sp.csr_matrix(true_labels)
    true_labels.eliminate_zeros()
    k_max = max(ks)
    if pred_ids.shape[0] != true_labels.shape[0] or pred_ids.shape[1] < k_max:
        raise ValueError(f"predictions {pred_ids.shape} do not cover {true_labels.shape[0]} points x top-{k_max}")
    pred_ids = pred_ids[:, :k_max]
    flags = relevance(pred_ids, true_labels)
    weighted = flags * np.where(pred_ids >= 0, inv_psp[np.maximum(pred_ids, 0)], 0.0)
    best = _best_weights(true_labels, inv_psp, k_max)
    num_true = np.diff(true_labels.indptr)

    discount = 1.0 / np.log2(np.arange(k_max) + 2)
    ideal = np.cumsum(discount)  # ideal DCG with j relevant labels: ideal[j - 1]
    hits, weighted_hits, best_hits = (np.cumsum(x, axis=1) for x in (flags, weighted, best))
    dcg, weighted_dcg, best_dcg = (np.cumsum(x * discount, axis=1) for x in (flags, weighted, best))

    metrics = {}
    for k in ks:
        norm = ideal[np.clip(np.minimum(num_true, k), 1, None) - 1]
        metrics[f"P@{k}"] = float(np.mean(hits[:, k - 1] / k))
        metrics[f"nDCG@{k}"] = float(np.mean(dcg[:, k - 1] / norm))
        metrics[f"PSP@{k}"] = float(np.mean(weighted_hits[:, k - 1]) / max(np.mean(best_hits[:, k - 1]), 1e-30))
        metrics[f"PSnDCG@{k}"] = float(np.mean(weighted_dcg[:, k - 1] / norm)
                                       / max(np.mean(best_dcg[:, k - 1] / norm), 1e-30))
        metrics[f"R@{k}"] = float(np.mean(hits[:, k - 1] / np.maximum(num_true, 1)))
    return metrics


def popularity_predictions(train: TrainCounts, num_points: int, k: int) -> np.ndarray:
    """The baseline that predicts the k most frequent training labels for every point."""
    top = np.argsort(-train.per_label, kind="stable")[:k]
    return np.tile(top, (num_points, 1))


METRIC_NAMES = ("P", "nDCG", "PSP", "PSnDCG", "R")


def format_table(rows: dict[str, dict[str, float]], ks=(1, 3, 5)) -> str:
    """A fixed-width table in percent: a block of metric lines per model, a column per k."""
    width = max(len(name) for name in rows) + 2
    column = max(8, len(str(max(ks))) + 3)
    lines = [" " * (width + 8) + "".join(f"@{k}".rjust(column) for k in ks)]
    for name, metrics in rows.items():
        for i, metric in enumerate(METRIC_NAMES):
            label = (name if i == 0 else "").ljust(width) + metric.ljust(8)
            lines.append(label + "".join(f"{100 * metrics[f'{metric}@{k}']:{column}.2f}" for k in ks))
    return "\n".join(lines)
