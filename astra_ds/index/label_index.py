"""A faiss inner-product index over this rank's rows of label vectors: the classifier table's (ASTRA shortlists) or
a finished run's scoring vectors (its serving index).

Built block by block from the rows (a block at a time is normalised and added; the rows are never copied whole),
on the GPU with faiss-gpu when it is installed, CUDA is present and the kind allows it, on the CPU otherwise. The
kinds are in kinds.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from astra_ds.config import IndexConfig
from astra_ds.index.kinds import import_faiss, index_kind
from astra_ds.libraries import native_output_logged
from astra_ds.progress import progress as progress_of
from astra_ds.scoring.rows import exact_topk, recall_at_k


@dataclass
class BuildReport:
    kind: str
    rows: int
    seconds: float


def _gather(rows, global_ids: np.ndarray, blocks: range, block: int) -> torch.Tensor:
    """The rows at sorted `global_ids`, read a block at a time."""
    parts = []
    for start in blocks:
        lo, hi = np.searchsorted(global_ids, [start, start + block])
        if hi > lo:
            parts.append(rows.block_rows(start, min(start + block, rows.end))[torch.from_numpy(global_ids[lo:hi] - start)])
    return torch.cat(parts)


class LabelIndex:
    def __init__(self, cfg: IndexConfig, normalize_rows: bool):
        self.cfg, self.normalize_rows = cfg, normalize_rows
        self.index = None
        self.offset = 0  # global id of the index's row 0
        self.gpu_resources = None  # faiss-gpu resources, when the index lives on the GPU
        self.exact = False  # the index's kind finds the exact top-k

    def _vectors(self, rows: torch.Tensor) -> np.ndarray:
        """Rows as faiss indexes them: normalised when scores use unit rows, contiguous float32."""
        rows = rows.float()
        if self.normalize_rows:
            rows = F.normalize(rows, dim=-1)
        return np.ascontiguousarray(rows.numpy(), dtype=np.float32)

    def _to_gpu(self, index, on_gpu: bool):
        """The index on the GPU when its kind, faiss-gpu, CUDA and index.use_gpu allow it."""
        faiss = import_faiss()
        if not (on_gpu and self.cfg.use_gpu and torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")):
            return index
        self.gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self.gpu_resources, torch.cuda.current_device(), index)

    def build(self, rows, rng: np.random.Generator, progress: bool = False,
              global_ids: np.ndarray | None = None) -> BuildReport:
        """(Re)build over rows [rows.start, rows.end) of `rows` (a ClassifierTable, ScoringRows: anything with
        `block_rows`); `rng` samples the rows an IVF index trains on. `global_ids`: only these rows (sorted), each
        found under its id (an ID map, on the CPU: an export that leaves retired labels out)."""
        started = time.perf_counter()
        self.index, self.gpu_resources = None, None  # the old index goes first: memory never holds two
        count = rows.end - rows.start if global_ids is None else len(global_ids)
        name, kind = index_kind(self.cfg, count)
        index = kind.create(self.cfg, rows.dim, count)
        index = self._to_gpu(index, kind.on_gpu) if global_ids is None else import_faiss().IndexIDMap2(index)
        blocks = range(rows.start, rows.end, self.cfg.add_block)
        if not index.is_trained:
            sample = np.sort(rng.choice(count, size=min(count, self.cfg.train_rows), replace=False))
            sample = sample + rows.start if global_ids is None else global_ids[sample]
            vectors = self._vectors(_gather(rows, sample, blocks, self.cfg.add_block))
            with native_output_logged(f"faiss training ({name})"):
                index.train(vectors)
        for start in progress_of(blocks, f"index ({name})", progress, "block"):
            end = min(start + self.cfg.add_block, rows.end)
            if global_ids is None:
                index.add(self._vectors(rows.block_rows(start, end)))
                continue
            lo, hi = np.searchsorted(global_ids, [start, end])
            if hi > lo:
                ids = global_ids[lo:hi]
                index.add_with_ids(self._vectors(rows.block_rows(start, end)[torch.from_numpy(ids - start)]), ids)
        self.index, self.offset, self.exact = index, rows.start if global_ids is None else 0, kind.exact
        return BuildReport(name, count, time.perf_counter() - started)

    def save(self, path: str | Path) -> None:
        """The built index, streamed to `path` by faiss (serialising it to bytes for pickle would hold it
        twice more in memory)."""
        faiss, index = import_faiss(), self.index
        if self.gpu_resources is not None:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    def load(self, path: str | Path, rows) -> None:
        """The index saved at `path`, over rows [rows.start, rows.end)."""
        index = import_faiss().read_index(str(path))
        if hasattr(index, "nprobe"):  # the config's, which may differ from the one it was built with
            index.nprobe = min(self.cfg.nprobe, index.nlist)
        kind = index_kind(self.cfg, rows.end - rows.start)[1]
        self.index, self.offset, self.exact = self._to_gpu(index, kind.on_gpu), rows.start, kind.exact

    def search(self, queries: torch.Tensor, k: int,
               excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids), (B, k) each; ids are -1 where the index has fewer than k results. `excluded`:
        global ids never returned (retired labels), skipped inside the search by a faiss ID selector."""
        if self.index is None:
            raise RuntimeError("the index has not been built")
        if hasattr(self.index, "hnsw"):  # HNSW returns at most efSearch results
            self.index.hnsw.efSearch = max(self.cfg.ef_search, k)
        vectors = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        if excluded is not None and len(excluded):
            scores, ids = self.index.search(vectors, k, params=self._skipping(excluded - self.offset, k))
        else:
            scores, ids = self.index.search(vectors, k)
        return scores, np.where(ids >= 0, ids + self.offset, -1)

    def _skipping(self, local_ids: np.ndarray, k: int):
        """Search parameters that skip `local_ids`, with the index's own nprobe / efSearch (faiss would otherwise
        take the parameters' defaults)."""
        faiss = import_faiss()
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(local_ids, dtype=np.int64)))
        if hasattr(self.index, "hnsw"):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.cfg.ef_search, k))
        if hasattr(self.index, "nprobe"):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        return faiss.SearchParameters(sel=selector)

    def recall(self, table, queries: torch.Tensor, k: int) -> float:
        """Mean |approximate top-k ∩ exact top-k| / k over (at most index.recall_queries of) `queries`."""
        queries = queries[:self.cfg.recall_queries]
        _, exact = exact_topk(queries, table, k, self.normalize_rows, progress=False)
        _, approx = self.search(queries, k)
        return recall_at_k(approx, exact.numpy())
