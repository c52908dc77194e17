"""kNN votes of the training queries: the K training queries nearest a query (inner products of the final
encoder's embeddings) vote for their labels, each with weight softmax(similarity / temperature) over the K, and a
label's score becomes its dual score + neighbour_weight x its votes. The rows hold one vector a label and smooth
over what single training queries say; the votes keep it (where labels come in families whose members' texts are
neighbours, as hypernyms of sibling definitions).

The votes re-rank the model's top `neighbour_candidates` labels (exact, or from the serving index), so that every
path that ranks labels (evaluation, predict, the server) costs one more exact search, over the training queries,
and scores no label outside the model's candidates. The training queries' embeddings and labels are kept in the run
directory (neighbours/: rows as a zarr table, labels.npz); a loaded model reads the embeddings at its first exact
search only, since the serving path finds the neighbours in its own index over them (rundir/serving_index.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from astra_ds.config import EvalConfig
from astra_ds.files import fsync_tree
from astra_ds.scoring.rows import exact_topk
from astra_ds.table import store

LABELS_FILE = "labels.npz"
CHUNK_BYTES = 64 * 2**20


class NeighbourVotes:
    """The training queries' embeddings (N, d) and labels (N x L CSR), and the votes they give. Scored like
    classifier rows by exact_topk (start, end, dim, device, block_rows)."""

    def __init__(self, embeddings: torch.Tensor | store.StoredRows, labels: sp.csr_matrix, cfg: EvalConfig):
        """`embeddings`: in memory, or as a run keeps them (read into memory at the first exact search)."""
        stored = isinstance(embeddings, store.StoredRows)
        count, self.dim = (embeddings.end, embeddings.dim) if stored else embeddings.shape
        if count != labels.shape[0]:
            raise ValueError(f"{count} training query embeddings for {labels.shape[0]} label rows")
        self._embeddings = embeddings if stored else embeddings.float()
        self.labels = sp.csr_matrix(labels, dtype=np.float32)
        self.neighbours, self.temperature, self.label_block = cfg.neighbours, cfg.neighbour_temperature, cfg.label_block
        self.num_candidates = cfg.neighbour_candidates
        self.start, self.end, self.device = 0, count, torch.device("cpu")

    @property
    def embeddings(self) -> torch.Tensor:
        """(N, d) float32 in memory (read from the run directory at the first use)."""
        if isinstance(self._embeddings, store.StoredRows):
            self._embeddings = self._embeddings.load().rows.float()
        return self._embeddings

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return self.embeddings[start:end]

    def candidates(self, k: int, num_labels: int) -> int:
        """How many labels of the model's top to re-rank for a top-k."""
        return min(max(k, self.num_candidates), num_labels)

    def votes(self, queries: torch.Tensor, ids: np.ndarray, index=None) -> np.ndarray:
        """(n, C): the votes of each query's neighbours for its labels `ids` (n, C); 0 for ids < 0 (padding) and for
        labels no training query has (added after training). The neighbours are exact, or those `index` (a
        LabelIndex over the training queries: the serving path) finds."""
        k = min(self.neighbours, self.end)
        if index is None:
            similarities, nearest = exact_topk(queries, self, k, normalize_rows=False, label_block=self.label_block,
                                               progress=False)
        else:
            similarities, nearest = map(torch.from_numpy, index.search(queries, k))
            similarities = torch.where(nearest >= 0, similarities, float("-inf"))  # fewer found: no weight
            nearest = nearest.clamp(min=0)
        weights = torch.softmax(similarities / self.temperature, dim=1).numpy()
        n = len(queries)
        mixing = sp.csr_matrix((weights.ravel(), nearest.numpy().ravel(), np.arange(0, n * k + 1, k)),
                               shape=(n, self.end))
        votes = (mixing @ self.labels).tocsr()  # (n, L): each query's votes, K x (labels a query) entries a row
        known = (ids >= 0) & (ids < self.labels.shape[1])
        rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
        values = np.zeros(ids.shape, np.float32)
        values[known] = np.asarray(votes[rows[known], ids[known]]).ravel()
        return values

    def rerank(self, scores: torch.Tensor, ids: torch.Tensor, queries: torch.Tensor, weight: float, k: int,
               index=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of candidates (scores, ids), (n, C) each, by score + weight x votes (the neighbours found by
        `index` when given): (fused scores, ids)."""
        fused = scores + weight * torch.from_numpy(self.votes(queries, ids.numpy(), index))
        top = fused.topk(min(k, fused.shape[1]), dim=1)
        return top.values, ids.gather(1, top.indices)

    def save(self, path: Path) -> None:
        """neighbours/: the embeddings as a zarr table (rows), the labels as a CSR .npz."""
        chunk_rows = max(1, min(self.end, CHUNK_BYTES // (self.dim * 4)))
        group = store.create(path, self.end, chunk_rows, {"rows": ((self.dim,), np.dtype(np.float32))},
                             {"dim": self.dim})
        group["rows"][:] = self.embeddings.numpy()
        sp.save_npz(path / LABELS_FILE, self.labels.tocsr())
        fsync_tree(path)

    @classmethod
    def load(cls, path: Path, cfg: EvalConfig, num_labels: int) -> "NeighbourVotes":
        """The votes a run kept, for a model of `num_labels` labels (more than training had after `labels add`)."""
        labels = sp.load_npz(path / LABELS_FILE).tocsr()
        labels.resize((labels.shape[0], max(num_labels, labels.shape[1])))
        return cls(store.StoredRows(path), labels, cfg)
