"""Evaluate a trained model on a test split: metrics of its top-k, the popularity baseline, files."""

from __future__ import annotations

import json
from pathlib import Path

import scipy.sparse as sp
import torch

from astra_ds import layout
from astra_ds.collectives import global_topk, rank
from astra_ds.config import EvalConfig
from astra_ds.eval.metrics import compute_metrics, inverse_propensity, popularity_predictions
from astra_ds.eval.predict import exact_topk, save_predictions

MODEL, MODEL_ANN, BASELINE = "astra_ds", "astra_ds (ann)", "popularity"


def exact_topk_all_ranks(queries: torch.Tensor, table, cfg: EvalConfig, normalize_rows: bool,
                         label_embeddings=None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-max(ks) of `queries` over the rows of every rank (each scores its own; the top-k are merged);
    with `label_embeddings`, dual scoring."""
    k = max(cfg.ks)
    return global_topk(*exact_topk(queries, table, k, normalize_rows, cfg.label_block, progress=progress,
                                   label_embeddings=label_embeddings, label_text_weight=cfg.label_text_weight), k)


def evaluate(topk: dict[str, tuple[torch.Tensor, torch.Tensor]], calibration: torch.Tensor,
             test_labels: sp.csr_matrix, train_labels: sp.csr_matrix, cfg: EvalConfig, num_labels: int,
             out_dir: str | Path, about: dict) -> dict[str, dict[str, float]]:
    """Metrics of each top-k in `topk` (name -> (scores <q, v>, ids), (N, max(ks)) each; the first is the one
    whose predictions are saved) and of the popularity baseline. Rank 0 writes metrics.json (with `about`: the
    step, the dataset, exact or ANN, ...) and predictions.npz (top-k scores s = scale * <q, v> + bias, CSR)
    into out_dir; every rank returns the metrics."""
    k = max(cfg.ks)
    inv_psp = inverse_propensity(train_labels, cfg.psp_a, cfg.psp_b)
    results = {name: compute_metrics(ids.numpy(), test_labels, inv_psp, cfg.ks) for name, (_, ids) in topk.items()}
    results[BASELINE] = compute_metrics(popularity_predictions(train_labels, test_labels.shape[0], k), test_labels,
                                        inv_psp, cfg.ks)
    if rank() != 0:
        return results
    out_dir = Path(out_dir)
    (out_dir / layout.METRICS).write_text(json.dumps(
        {**about, "num_test": test_labels.shape[0], "num_labels": num_labels, "ks": list(cfg.ks),
         "psp_a": cfg.psp_a, "psp_b": cfg.psp_b, **results}, indent=2))
    scores, ids = next(iter(topk.values()))
    save_predictions(out_dir / layout.PREDICTIONS, (calibration[0].exp() * scores + calibration[1]).numpy(),
                     ids.numpy(), num_labels)
    return results


def ann_recall(ann_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean share of the exact top-k that the ANN top-k finds."""
    from astra_ds.negatives.index import recall_at_k

    return recall_at_k(ann_ids.numpy(), exact_ids.numpy())
