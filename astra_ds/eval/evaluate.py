"""Evaluate a trained model on a test split: predictions, metrics, the popularity baseline, files."""

from __future__ import annotations

import json
from pathlib import Path

import scipy.sparse as sp
import torch

from astra_ds.collectives import global_topk, rank
from astra_ds.config import EvalConfig
from astra_ds.eval.metrics import compute_metrics, inverse_propensity, popularity_predictions
from astra_ds.eval.predict import exact_topk, save_predictions
from astra_ds.table.table import ClassifierTable

MODEL, BASELINE = "astra_ds", "popularity"


def evaluate(queries: torch.Tensor, calibration: torch.Tensor, table: ClassifierTable, test_labels: sp.csr_matrix,
             train_labels: sp.csr_matrix, cfg: EvalConfig, normalize_rows: bool, out_dir: str | Path,
             label_embeddings=None, progress: bool = True) -> dict[str, dict[str, float]]:
    """Scores the test `queries` (N, d; their embeddings, see `encode_queries`) against the rows, and writes
    metrics.json and predictions.npz (top-k scores s = scale * <q, w> + bias, CSR) into out_dir; with
    `label_embeddings`, the rows are w / |w| + eval.label_text_weight * e (dual scoring).

    With several ranks every rank takes part (each scores its own rows; the top-k are merged) and rank 0
    writes the files; every rank returns the metrics."""
    k = max(cfg.ks)
    scores, ids = global_topk(*exact_topk(queries, table, k, normalize_rows, cfg.label_block, progress=progress,
                                          label_embeddings=label_embeddings, label_text_weight=cfg.label_text_weight), k)
    inv_psp = inverse_propensity(train_labels, cfg.psp_a, cfg.psp_b)
    results = {
        MODEL: compute_metrics(ids.numpy(), test_labels, inv_psp, cfg.ks),
        BASELINE: compute_metrics(popularity_predictions(train_labels, test_labels.shape[0], k), test_labels,
                                  inv_psp, cfg.ks),
    }
    if rank() != 0:
        return results
    out_dir = Path(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(
        {"num_test": test_labels.shape[0], "num_labels": table.num_labels, **results}, indent=2))
    save_predictions(out_dir / "predictions.npz", (calibration[0].exp() * scores + calibration[1]).numpy(), ids.numpy(), table.num_labels)
    return results

