"""Evaluate a trained model on a test split: metrics of its top-k, the popularity baseline, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from astra_ds.collectives import global_topk
from astra_ds.config import EvalConfig
from astra_ds.data.membership import CSRMembership
from astra_ds.data.queries import TrainCounts
from astra_ds.eval.metrics import compute_metrics, inverse_propensity, popularity_predictions
from astra_ds.eval.outputs import METRICS_FILE, PREDICTIONS_FILE
from astra_ds.files import output_file, write_atomically
from astra_ds.scoring.neighbour_votes import NeighbourVotes
from astra_ds.scoring.rows import exact_topk, recall_at_k

MODEL, MODEL_ANN, BASELINE = "astra_ds", "astra_ds (ann)", "popularity"


def search_k(cfg: EvalConfig, test_filter: sp.csr_matrix | None) -> int:
    """How many labels to retrieve a query: max(ks), plus room for the filtered ones."""
    extra = int(np.diff(test_filter.indptr).max()) if test_filter is not None and test_filter.nnz else 0
    return max(cfg.ks) + extra


def remove_filtered(scores: torch.Tensor, ids: torch.Tensor, test_filter: sp.csr_matrix | None,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row of a top-k once the (query, label) pairs of `test_filter` are taken out (the XC
    repository's reciprocal-pair filtering); rows left short are padded with id -1, score -inf."""
    if test_filter is None:
        return scores[:, :k], ids[:, :k]
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    filtered = CSRMembership(test_filter).contains(rows, ids.numpy().reshape(-1)).reshape(ids.shape)
    order = torch.from_numpy(np.argsort(filtered, axis=1, kind="stable")[:, :k])
    kept = ~torch.from_numpy(np.take_along_axis(filtered, order.numpy(), axis=1))
    return (torch.where(kept, scores.gather(1, order), torch.tensor(float("-inf"))),
            torch.where(kept, ids.gather(1, order), torch.tensor(-1)))


def exact_topk_all_ranks(queries: torch.Tensor, table, cfg: EvalConfig, normalize_rows: bool, k: int,
                         label_embeddings=None, votes: NeighbourVotes | None = None,
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k of `queries` over the rows of every rank (each scores its own; the top-k are merged); with
    `label_embeddings`, dual scoring; with `votes`, the kNN votes re-rank the top eval.neighbour_candidates."""
    candidates = votes.candidates(k, table.num_labels) if votes else k
    scores, ids = global_topk(*exact_topk(queries, table, candidates, normalize_rows, cfg.label_block,
                                          progress=progress, label_embeddings=label_embeddings,
                                          label_text_weight=cfg.label_text_weight), candidates)
    return votes.rerank(scores, ids, queries, cfg.neighbour_weight, k) if votes else (scores, ids)


def evaluate(topk: dict[str, tuple[torch.Tensor, torch.Tensor]], calibration: torch.Tensor,
             test_labels: sp.csr_matrix, train: TrainCounts, cfg: EvalConfig, num_labels: int,
             out_dir: str | Path, about: dict, test_filter: sp.csr_matrix | None = None,
             write: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of each top-k in `topk` (name -> (scores <q, v>, ids), (N, search_k) each; the first is the one
    whose predictions are saved) and of the popularity baseline. With `test_filter` (reciprocal pairs), its
    pairs leave the predictions and the gold labels first. With `write` (rank 0 of a run), metrics.json (with
    `about`: the step, the dataset, exact or ANN, ...) and predictions.npz (the top-k's logits
    scale * <q, v> + bias, CSR: see save_predictions) are written into out_dir; every rank returns the metrics."""
    k = max(cfg.ks)
    topk = {name: remove_filtered(scores, ids, test_filter, k) for name, (scores, ids) in topk.items()}
    if test_filter is not None:
        test_labels = sp.csr_matrix(test_labels - test_labels.multiply(test_filter))
        test_labels.eliminate_zeros()
    psp_a, psp_b = cfg.propensity
    inv_psp = inverse_propensity(train, psp_a, psp_b)
    results = {name: compute_metrics(ids.numpy(), test_labels, inv_psp, cfg.ks) for name, (_, ids) in topk.items()}
    popular = torch.from_numpy(popularity_predictions(train, test_labels.shape[0], search_k(cfg, test_filter)))
    _, popular = remove_filtered(torch.zeros(popular.shape), popular, test_filter, k)
    results[BASELINE] = compute_metrics(popular.numpy(), test_labels, inv_psp, cfg.ks)
    if not write:
        return results
    out_dir = Path(out_dir)
    scores, ids = next(iter(topk.values()))
    with output_file(out_dir / PREDICTIONS_FILE) as tmp:
        save_predictions(tmp, (calibration[0].exp() * scores + calibration[1]).numpy(), ids.numpy(), num_labels)
    filtered = {"applied": test_filter is not None, "pairs": int(test_filter.nnz) if test_filter is not None else 0}
    write_atomically(out_dir / METRICS_FILE, json.dumps(  # last: metrics.json present means the results are
        {**about, "num_test": test_labels.shape[0], "num_labels": num_labels, "ks": list(cfg.ks),
         "psp": cfg.psp, "psp_a": psp_a, "psp_b": psp_b, "filter": filtered, **results}, indent=2))
    return results


def ann_recall(ann_ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean share of the exact top-k that the ANN top-k finds."""
    return recall_at_k(ann_ids.numpy(), exact_ids.numpy())


def save_predictions(path: str | Path, logits: np.ndarray, ids: np.ndarray, num_labels: int) -> None:
    """Top-k predictions as a CSR (N x L) .npz (scipy.sparse.load_npz reads it) of logits, the one convention of
    every .npz astra_ds writes (probabilities, sigmoid(logit), saturate at 1 and would lose the ranking), said in
    the file: np.load(path)["score"] == "logit". Ids < 0 (padding) are left out."""
    kept = ids >= 0
    indptr = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])
    matrix = sp.csr_matrix((logits[kept].astype(np.float32), ids[kept], indptr), shape=(ids.shape[0], num_labels))
    with open(path, "wb") as f:  # as scipy.sparse.save_npz writes a CSR, with the kind of score beside it
        np.savez_compressed(f, format=b"csr", shape=matrix.shape, data=matrix.data, indices=matrix.indices,
                            indptr=matrix.indptr, score=np.array("logit"))
