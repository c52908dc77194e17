"""A faiss inner-product index over this rank's classifier rows, for ASTRA shortlists.

Built block by block from the host table (a block at a time is normalised and added; the table is never
copied whole), on the GPU with faiss-gpu when it is installed and CUDA is present (flat and IVF kinds), on
the CPU otherwise. Each kind is a factory registered in astra_ds.negatives.INDEX_KINDS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from astra_ds.config import IndexConfig
from astra_ds.errors import ConfigError
from astra_ds.eval.predict import exact_topk
from astra_ds.negatives import INDEX_KINDS
from astra_ds.table.table import ClassifierTable


@dataclass
class BuildReport:
    kind: str
    rows: int
    seconds: float


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


IVF_LIST_SLACK = 1.25  # faiss inverted lists grow by doubling: capacity over size, on average


def index_bytes(cfg: IndexConfig, rows: int, dim: int) -> tuple[int, str]:
    """Bytes of the faiss index over `rows` rows, and its kind (for the memory plan)."""
    kind = choose_kind(cfg, rows)
    if kind == "flat":
        return rows * dim * 4, kind
    if kind == "hnsw":  # vectors, 2M level-0 links, upper levels (1/M of the rows, M links: ~4 B), bookkeeping
        return rows * (dim * 4 + 2 * cfg.hnsw_m * 4 + 4 + 16), kind
    nlist = nlist_for(cfg, rows)
    code = dim * 4 if kind == "ivf_flat" else pq_m_for(cfg, dim)
    return int(rows * (code + 8) * IVF_LIST_SLACK) + nlist * dim * 4 + 256 * dim * 4, f"{kind}, {nlist} lists"


def check_index_config(cfg: IndexConfig, dim: int) -> None:
    """What only the row dimension decides, checked before a run starts."""
    if cfg.pq_m is not None and dim % cfg.pq_m:
        raise ConfigError(f"index.pq_m={cfg.pq_m} must divide the row dimension {dim}")


# ---- the kinds (INDEX_KINDS): a new faiss index over `rows` rows of dimension `dim` ---------------------------

def flat_index(cfg: IndexConfig, dim: int, rows: int):
    return import_faiss().IndexFlatIP(dim)


def hnsw_index(cfg: IndexConfig, dim: int, rows: int):
    faiss = import_faiss()
    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.ef_construction
    index.hnsw.efSearch = cfg.ef_search
    return index


def ivf_flat_index(cfg: IndexConfig, dim: int, rows: int):
    faiss, nlist = import_faiss(), nlist_for(cfg, rows)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(cfg.nprobe, nlist)
    return index


def ivf_pq_index(cfg: IndexConfig, dim: int, rows: int):
    check_index_config(cfg, dim)
    faiss, nlist = import_faiss(), nlist_for(cfg, rows)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m_for(cfg, dim), 8, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(cfg.nprobe, nlist)
    return index


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

    def _vectors(self, rows: torch.Tensor) -> np.ndarray:
        """Rows as faiss indexes them: normalised when scores use unit rows, contiguous float32."""
        rows = rows.float()
        if self.normalize_rows:
            rows = F.normalize(rows, dim=-1)
        return np.ascontiguousarray(rows.numpy(), dtype=np.float32)

    def _to_gpu(self, index, kind: str):
        """The index on the GPU when faiss-gpu, CUDA and index.use_gpu allow it (HNSW stays on the CPU)."""
        faiss = import_faiss()
        if kind == "hnsw" or not (self.cfg.use_gpu and torch.cuda.is_available()
                                  and hasattr(faiss, "StandardGpuResources")):
            return index
        self.gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self.gpu_resources, torch.cuda.current_device(), index)

    def build(self, rows, rng: np.random.Generator, progress: bool = False) -> BuildReport:
        """(Re)build over rows [rows.start, rows.end) of `rows` (a ClassifierTable, ScoringRows: anything with
        `block_rows`); `rng` samples the rows an IVF index trains on."""
        started = time.perf_counter()
        self.index, self.gpu_resources = None, None  # the old index goes first: memory never holds two
        count = rows.end - rows.start
        kind = choose_kind(self.cfg, count)
        index = self._to_gpu(INDEX_KINDS.get(kind)(self.cfg, rows.dim, count), kind)
        blocks = range(rows.start, rows.end, self.cfg.add_block)
        if not index.is_trained:
            sample = np.sort(rng.choice(count, size=min(count, self.cfg.train_rows), replace=False)) + rows.start
            index.train(self._vectors(_gather(rows, sample, blocks, self.cfg.add_block)))
        for start in tqdm(blocks, desc=f"index ({kind})", unit="block", disable=not progress):
            index.add(self._vectors(rows.block_rows(start, min(start + self.cfg.add_block, rows.end))))
        self.index, self.offset = index, rows.start
        return BuildReport(kind, count, time.perf_counter() - started)

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
        self.index, self.offset = self._to_gpu(index, choose_kind(self.cfg, rows.end - rows.start)), rows.start

    def search(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids), (B, k) each; ids are -1 where the index has fewer than k results."""
        if self.index is None:
            raise RuntimeError("the index has not been built")
        if hasattr(self.index, "hnsw"):  # HNSW returns at most efSearch results
            self.index.hnsw.efSearch = max(self.cfg.ef_search, k)
        scores, ids = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return scores, np.where(ids >= 0, ids + self.offset, -1)

    def recall(self, table: ClassifierTable, queries: torch.Tensor, k: int) -> float:
        """Mean |approximate top-k ∩ exact top-k| / k over (at most index.recall_queries of) `queries`."""
        queries = queries[:self.cfg.recall_queries]
        _, exact = exact_topk(queries, table, k, self.normalize_rows, progress=False)
        _, approx = self.search(queries, k)
        return recall_at_k(approx, exact.numpy())


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over the rows of two (N, k) id arrays."""
    return float(np.mean([len(np.intersect1d(a, e)) / e.shape[0] for a, e in zip(approx, exact)]))
