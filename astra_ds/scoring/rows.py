"""Scoring, shared by training, evaluation, the negatives, the memory plan and serving: queries encoded (the model
in eval mode for the pass), the vectors labels are scored by (ScoringRows), the exact top-k over them block by
block, and the recall of an approximate top-k against it.

Scores never exist for more than (query_block x label_block) pairs at once, so memory does not grow with L.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from astra_ds.collectives import all_gather_cat, merge_topk, padded_part
from astra_ds.data.queries import Texts
from astra_ds.libraries import release_free_memory
from astra_ds.progress import progress as progress_of


@contextmanager
def evaluating(model: torch.nn.Module):
    """`model` (an encoder, or the DeepSpeed engine around one) in eval mode and without gradients for the block;
    its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def encode_queries(model: torch.nn.Module, tokens: Texts, batch_size: int, device: torch.device,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All query embeddings (N, d) on the host, and the score calibration (log scale, bias), `model` in eval mode.

    With W ranks each rank encodes a contiguous 1/W of the queries and every rank gets all of them. The
    parts are padded (with the last query) to the same length, so that every rank runs the same number of
    forward passes: ZeRO-3 gathers parameters collectively in each. Batches are cut from the queries sorted by
    length, so that each is padded to about its own length rather than to the longest query's. The pages each
    batch's activations freed go back to the system after it (astra_ds/libraries.py): batches whose sizes change
    otherwise leave the heap fragmented, 1 GiB resident after WordNetHyper's 63K training queries."""
    rows = padded_part(len(tokens))
    by_length = torch.from_numpy(np.argsort(tokens.lengths_of(rows), kind="stable"))
    mine, calibration = None, None
    with evaluating(model):
        for start in progress_of(range(0, len(rows), batch_size), "encode", progress, "batch"):
            batch = by_length[start:start + batch_size]
            input_ids, attention_mask = tokens.batch(rows[batch.numpy()])
            embeddings, calibration = model(input_ids.to(device), attention_mask.to(device))
            if mine is None:
                mine = torch.empty((len(rows), embeddings.shape[1]))
            mine[batch] = embeddings.float().cpu()  # in the order of `rows`, written in place: no second copy
            del embeddings
            release_free_memory()
    return all_gather_cat(mine)[:len(tokens)], calibration.detach().float().cpu()


class ScoringRows:
    """The vectors queries are scored against, a block at a time: a label's row w (w / |w| with `normalize`),
    times its range's scale in `row_scales` ([first, end, scale] triples: labels added after training,
    labels/row_scale.py), plus `label_text_weight` x its label-text embedding e with dual scoring. `rows` and
    `label_embeddings` hold the same rows [start, end): a ClassifierTable and LabelEmbeddings in memory, or
    StoredRows on disk."""

    def __init__(self, rows, normalize: bool, label_embeddings=None, label_text_weight: float = 0.0,
                 row_scales: list = ()):
        self.rows, self.normalize, self.row_scales = rows, normalize, list(row_scales)
        self.label_embeddings = label_embeddings if label_text_weight else None
        self.label_text_weight = label_text_weight
        self.start, self.end, self.dim, self.device = rows.start, rows.end, rows.dim, rows.device

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) as float32 on the device."""
        rows = self.rows.block_rows(start, end).to(self.device, non_blocking=True).float()
        if self.normalize:
            rows = F.normalize(rows, dim=-1)
        scales = self._scales(start, end)
        if scales is not None:
            rows = rows * scales[:, None].to(self.device)  # not in place: `rows` may be the table's own memory
        if self.label_embeddings is not None:
            rows = rows + self.label_text_weight * self.label_embeddings.block_rows(start, end).to(self.device).float()
        return rows

    def in_memory(self, label_block: int = 65536) -> "VectorsInMemory":
        """All the vectors, computed once and kept on the host (a served model scores against them on every call)."""
        vectors = torch.empty((self.end - self.start, self.dim))
        for start in range(self.start, self.end, label_block):
            end = min(start + label_block, self.end)
            vectors[start - self.start:end - self.start] = self.block_rows(start, end).cpu()
        return VectorsInMemory(vectors, self.start, self.device)

    def _scales(self, start: int, end: int) -> torch.Tensor | None:
        """The row scales of [start, end), or None where they are all 1."""
        scales = None
        for first, last, scale in self.row_scales:
            first, last = max(first, start), min(last, end)
            if first < last and scale != 1:
                scales = torch.ones(end - start) if scales is None else scales
                scales[first - start:last - start] = scale
        return scales


class VectorsInMemory:
    """Scoring vectors (rows [start, start + n)) held as one float32 host tensor, scored on `device`: a table for
    exact_topk."""

    def __init__(self, vectors: torch.Tensor, start: int, device: torch.device):
        self.vectors, self.start, self.end = vectors, start, start + len(vectors)
        self.dim, self.device = vectors.shape[1], device

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return self.vectors[start - self.start:end - self.start].to(self.device, non_blocking=True)


@torch.no_grad()
def exact_topk(queries: torch.Tensor, table, k: int, normalize_rows: bool,
               label_block: int = 65536, query_block: int = 4096, progress: bool = True,
               label_embeddings=None, label_text_weight: float = 0.0,
               excluded: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of `queries` (N, d) against this shard's rows of `table` as ScoringRows scores them
    (`label_embeddings`: dual scoring): (scores, global ids), (N, k) each. `excluded`: sorted global ids that
    never come out (retired labels; scored -inf).

    Queries and rows are scored on the table's device, block by block, with a running top-k."""
    scoring = ScoringRows(table, normalize_rows, label_embeddings, label_text_weight)
    device = scoring.device
    all_scores, all_ids = [], []
    blocks = [(s, min(s + label_block, scoring.end)) for s in range(scoring.start, scoring.end, label_block)]
    for q_start in progress_of(range(0, len(queries), query_block), "top-k", progress, "block"):
        q = queries[q_start:q_start + query_block].to(device)
        best_scores = torch.full((len(q), 0), float("-inf"), device=device)
        best_ids = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for start, end in blocks:
            scores = q @ scoring.block_rows(start, end).T
            if excluded is not None:
                inside = excluded[np.searchsorted(excluded, start):np.searchsorted(excluded, end)]
                scores[:, torch.from_numpy(inside - start).to(device)] = float("-inf")
            top = scores.topk(min(k, end - start), dim=1)
            best_scores, best_ids = merge_topk(torch.cat([best_scores, top.values], 1),
                                               torch.cat([best_ids, top.indices + start], 1), k)
        all_scores.append(best_scores.cpu())
        all_ids.append(best_ids.cpu())
    return torch.cat(all_scores), torch.cat(all_ids)


def exact_topk_bytes(num_queries: int, rows: int, dim: int, label_block: int = 65536) -> int:
    """Memory `exact_topk` holds at once for a block of queries: a score block and its top-k, a row block."""
    label_block = min(label_block, rows)
    return num_queries * label_block * 4 * 2 + label_block * dim * 8


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over the rows of two (N, k) id arrays."""
    return float(np.mean([len(np.intersect1d(a, e)) / e.shape[0] for a, e in zip(approx, exact)]))
