"""A faiss inner-product index over this rank's classifier rows, for ASTRA shortlists.

Built block by block from the host table (a block at a time is normalised and added; the table is never
copied whole), on the GPU with faiss-gpu when it is installed and CUDA is present (flat and IVF kinds), on
the CPU otherwise. Every build measures recall@K against exact search on sample queries, so that a silent
recall collapse shows in the log.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from astra_ds.config import ConfigError, IndexConfig
from astra_ds.eval.predict import exact_topk
from astra_ds.table.table import ClassifierTable

log = logging.getLogger("astra_ds")


@dataclass
class BuildReport:
    kind: str
    rows: int
    seconds: float
    recall: float | None  # recall@k of the index against exact search, on the sample queries
    k: int


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("negatives.strategy=astra needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def choose_kind(cfg: IndexConfig, rows: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if rows <= cfg.hnsw_max_rows:
        return "hnsw"
    return "ivf_pq" if rows >= cfg.ivf_pq_min_rows else "ivf_flat"


def nlist_for(cfg: IndexConfig, rows: int) -> int:
    """IVF lists: index.nlist, or 4 sqrt(rows) (at least 39 training rows a list)."""
    return cfg.nlist or max(1, min(rows // 39, int(4 * math.sqrt(rows))))


def pq_m_for(cfg: IndexConfig, dim: int) -> int:
    return cfg.pq_m or max(1, dim // 4)


class LabelIndex:
    def __init__(self, cfg: IndexConfig, normalize_rows: bool):
        self.cfg, self.normalize_rows = cfg, normalize_rows
        self.index = None
        self.offset = 0  # global id of the index's row 0
        self.version = 0  # builds so far

    def _vectors(self, rows: torch.Tensor) -> np.ndarray:
        """Rows as faiss indexes them: normalised when scores use unit rows, contiguous float32."""
        rows = rows.float()
        if self.normalize_rows:
            rows = F.normalize(rows, dim=-1)
        return np.ascontiguousarray(rows.numpy(), dtype=np.float32)

    def _new_index(self, kind: str, table: ClassifierTable):
        faiss, cfg, dim, rows = import_faiss(), self.cfg, table.dim, table.num_local_rows
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, metric)
            index.hnsw.efConstruction = cfg.ef_construction
            index.hnsw.efSearch = cfg.ef_search
        else:
            nlist = nlist_for(cfg, rows)
            quantizer = faiss.IndexFlatIP(dim)
            if kind == "ivf_flat":
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
            else:
                pq_m = pq_m_for(cfg, dim)
                if dim % pq_m:
                    raise ValueError(f"index.pq_m={pq_m} must divide the row dimension {dim}")
                index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, metric)
            index.nprobe = min(cfg.nprobe, nlist)
        return self._to_gpu(index) if kind != "hnsw" else index

    def _to_gpu(self, index):
        """The index on the GPU when faiss-gpu, CUDA and index.use_gpu allow it."""
        faiss = import_faiss()
        if not (self.cfg.use_gpu and torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")):
            return index
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, torch.cuda.current_device(), index)

    def state_dict(self) -> dict:
        """Version, row offset and placement; the index itself goes to a file (`save`)."""
        return {"version": self.version, "offset": self.offset, "built": self.index is not None,
                "on_gpu": hasattr(self, "_gpu_resources")}

    def save(self, path: str | Path) -> None:
        """The built index, streamed to `path` by faiss (serialising it to bytes for pickle would hold it
        twice more in memory)."""
        faiss, index = import_faiss(), self.index
        if hasattr(self, "_gpu_resources"):
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    def load_state_dict(self, state: dict, index_file: str | Path) -> None:
        self.version, self.offset = state["version"], state["offset"]
        self.index = import_faiss().read_index(str(index_file)) if state["built"] else None
        if self.index is not None and state["on_gpu"]:
            self.index = self._to_gpu(self.index)

    def _train(self, index, table: ClassifierTable, rng: np.random.Generator) -> None:
        if index.is_trained:
            return
        rows = table.num_local_rows
        sample = np.sort(rng.choice(rows, size=min(rows, self.cfg.train_rows), replace=False)) + table.start
        index.train(self._vectors(table.rows.index_select(0, torch.from_numpy(sample - table.start))))

    def build(self, table: ClassifierTable, sample_queries: torch.Tensor | None, k: int, seed: int = 0) -> BuildReport:
        """(Re)build over the table's current rows; recall@k is measured on `sample_queries` when given."""
        started = time.perf_counter()
        self.index = None  # the old index goes first: memory never holds two
        kind = choose_kind(self.cfg, table.num_local_rows)
        index = self._new_index(kind, table)
        self._train(index, table, np.random.default_rng([seed, self.version]))
        for start in range(table.start, table.end, self.cfg.add_block):
            index.add(self._vectors(table.block_rows(start, min(start + self.cfg.add_block, table.end))))
        self.index, self.offset = index, table.start
        self.version += 1
        seconds = time.perf_counter() - started
        recall = self.recall(table, sample_queries, k) if sample_queries is not None and len(sample_queries) else None
        report = BuildReport(kind, table.num_local_rows, seconds, recall, k)
        log.info("index v%d: %s over %d rows built in %.2fs, recall@%d vs exact %s", self.version, kind,
                 table.num_local_rows, seconds, k, "n/a" if recall is None else f"{recall:.3f}")
        return report

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids), (B, k) each; ids are -1 where the index has fewer than k results."""
        if self.index is None:
            raise RuntimeError("the index has not been built")
        scores, ids = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return scores, np.where(ids >= 0, ids + self.offset, -1)

    def recall(self, table: ClassifierTable, queries: torch.Tensor, k: int) -> float:
        """Mean |approximate top-k ∩ exact top-k| / k."""
        queries = queries[:self.cfg.recall_queries]
        _, exact = exact_topk(queries, table, k, self.normalize_rows, progress=False)
        _, approx = self.search(queries, k)
        exact = exact.numpy()
        return float(np.mean([len(np.intersect1d(a, e)) / e.shape[0] for a, e in zip(approx, exact)]))
