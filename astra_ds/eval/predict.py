"""Prediction: encode queries, exact top-k over the classifier rows block by block, CSR output.

Scores never exist for more than (query_block x label_block) pairs at once, so memory does not grow with L.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from astra_ds.collectives import all_gather_cat, merge_topk, rank, world_size
from astra_ds.data.tokens import TokenizedTexts


@torch.no_grad()
def encode_queries(encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   tokens: TokenizedTexts, batch_size: int, device: torch.device,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All query embeddings (N, d) on the host, and the score calibration (log scale, bias).

    With W ranks each rank encodes a contiguous 1/W of the queries and every rank gets all of them. The
    parts are padded (with the last query) to the same length, so that every rank runs the same number of
    forward passes: ZeRO-3 gathers parameters collectively in each."""
    per_rank = -(-len(tokens) // world_size())
    rows = np.minimum(np.arange(rank() * per_rank, (rank() + 1) * per_rank), len(tokens) - 1)
    chunks, calibration = [], None
    for start in tqdm(range(0, per_rank, batch_size), desc="encode", unit="batch", disable=not progress):
        input_ids, attention_mask = tokens.batch(rows[start:start + batch_size])
        embeddings, calibration = encode(input_ids.to(device), attention_mask.to(device))
        chunks.append(embeddings.float().cpu())
    return all_gather_cat(torch.cat(chunks))[:len(tokens)], calibration.detach().float().cpu()


class ScoringRows:
    """The vectors queries are scored against, a block at a time: a label's row w (w / |w| with `normalize`),
    plus `label_text_weight` x its label-text embedding e with dual scoring. `rows` and `label_embeddings` hold
    the same rows [start, end): a ClassifierTable and LabelEmbeddings in memory, or StoredRows on disk."""

    def __init__(self, rows, normalize: bool, label_embeddings=None, label_text_weight: float = 0.0):
        self.rows, self.normalize = rows, normalize
        self.label_embeddings = label_embeddings if label_text_weight else None
        self.label_text_weight = label_text_weight
        self.start, self.end, self.dim, self.device = rows.start, rows.end, rows.dim, rows.device

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) as float32 on the device."""
        rows = self.rows.block_rows(start, end).to(self.device, non_blocking=True).float()
        if self.normalize:
            rows = F.normalize(rows, dim=-1)
        if self.label_embeddings is not None:
            rows = rows + self.label_text_weight * self.label_embeddings.block_rows(start, end).to(self.device).float()
        return rows


@torch.no_grad()
def exact_topk(queries: torch.Tensor, table, k: int, normalize_rows: bool,
               label_block: int = 65536, query_block: int = 4096, progress: bool = True,
               label_embeddings=None, label_text_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of `queries` (N, d) against this shard's rows of `table` as ScoringRows scores them
    (`label_embeddings`: dual scoring): (scores, global ids), (N, k) each.

    Queries and rows are scored on the table's device, block by block, with a running top-k."""
    scoring = ScoringRows(table, normalize_rows, label_embeddings, label_text_weight)
    device = scoring.device
    all_scores, all_ids = [], []
    blocks = [(s, min(s + label_block, scoring.end)) for s in range(scoring.start, scoring.end, label_block)]
    for q_start in tqdm(range(0, len(queries), query_block), desc="top-k", unit="block", disable=not progress):
        q = queries[q_start:q_start + query_block].to(device)
        best_scores = torch.full((len(q), 0), float("-inf"), device=device)
        best_ids = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for start, end in blocks:
            top = (q @ scoring.block_rows(start, end).T).topk(min(k, end - start), dim=1)
            best_scores, best_ids = merge_topk(torch.cat([best_scores, top.values], 1),
                                               torch.cat([best_ids, top.indices + start], 1), k)
        all_scores.append(best_scores.cpu())
        all_ids.append(best_ids.cpu())
    return torch.cat(all_scores), torch.cat(all_ids)


def exact_topk_bytes(num_queries: int, rows: int, dim: int, label_block: int = 65536) -> int:
    """Memory `exact_topk` holds at once for a block of queries: a score block and its top-k, a row block."""
    label_block = min(label_block, rows)
    return num_queries * label_block * 4 * 2 + label_block * dim * 8


def save_predictions(path: str | Path, scores: np.ndarray, ids: np.ndarray, num_labels: int) -> None:
    """Top-k predictions as a CSR (N x L) .npz of scores (scipy.sparse.load_npz reads it); ids < 0 (padding)
    are left out."""
    kept = ids >= 0
    indptr = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])
    matrix = sp.csr_matrix((scores[kept].astype(np.float32), ids[kept], indptr), shape=(ids.shape[0], num_labels))
    sp.save_npz(path, matrix)
