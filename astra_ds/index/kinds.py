"""The kinds of faiss index over L label vectors of dimension d. A kind is one class (and one entry in
astra_ds.choices.INDEX_KINDS) that owns how the index is made, the bytes it holds (for the memory plan), what the
config must satisfy for it, and whether faiss-gpu can hold it.

`index.kind: auto` picks by the number of rows: HNSW up to index.hnsw_max_rows, IVF-Flat, then IVF-PQ from
index.ivf_pq_min_rows.
"""

from __future__ import annotations

import math

from astra_ds.choices import INDEX_KINDS
from astra_ds.config import IndexConfig
from astra_ds.errors import ConfigError

IVF_LIST_SLACK = 1.25  # faiss inverted lists grow by doubling: capacity over size, on average
SMALLEST_KIND_ADVICE = "index.kind=ivf_pq (a few bytes a row)"


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("the label index needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def nlist_for(cfg: IndexConfig, rows: int) -> int:
    """IVF lists: index.nlist, or 4 sqrt(rows) (at least 39 training rows a list)."""
    return cfg.nlist or max(1, min(rows // 39, int(4 * math.sqrt(rows))))


def pq_m_for(cfg: IndexConfig, dim: int) -> int:
    return cfg.pq_m or max(1, dim // 4)


class IndexKind:
    on_gpu = True  # faiss-gpu can hold it
    exact = False  # finds the exact top-k (its recall is 1 by construction)
    advice = SMALLEST_KIND_ADVICE  # what to change when the plan finds it too large

    @staticmethod
    def check(cfg: IndexConfig, dim: int) -> None:
        """What the row dimension decides, checked before a run starts."""

    @staticmethod
    def create(cfg: IndexConfig, dim: int, rows: int):
        """A new, empty faiss index for `rows` rows of dimension `dim` (trained by LabelIndex when it needs it)."""
        raise NotImplementedError

    @staticmethod
    def nbytes(cfg: IndexConfig, rows: int, dim: int) -> int:
        raise NotImplementedError

    @staticmethod
    def detail(cfg: IndexConfig, rows: int) -> str:
        return ""


class Flat(IndexKind):
    exact = True

    @staticmethod
    def create(cfg: IndexConfig, dim: int, rows: int):
        return import_faiss().IndexFlatIP(dim)

    @staticmethod
    def nbytes(cfg: IndexConfig, rows: int, dim: int) -> int:
        return rows * dim * 4


class HNSW(IndexKind):
    on_gpu = False

    @staticmethod
    def create(cfg: IndexConfig, dim: int, rows: int):
        faiss = import_faiss()
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
        return index

    @staticmethod
    def nbytes(cfg: IndexConfig, rows: int, dim: int) -> int:
        # vectors, 2M level-0 links, upper levels (1/M of the rows, M links: ~4 B), bookkeeping
        return rows * (dim * 4 + 2 * cfg.hnsw_m * 4 + 4 + 16)


class IVFFlat(IndexKind):
    @staticmethod
    def code_bytes(cfg: IndexConfig, dim: int) -> int:
        """Bytes a row's code takes in its inverted list."""
        return dim * 4

    @classmethod
    def create(cls, cfg: IndexConfig, dim: int, rows: int):
        faiss, nlist = import_faiss(), nlist_for(cfg, rows)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(cfg.nprobe, nlist)
        return index

    @classmethod
    def nbytes(cls, cfg: IndexConfig, rows: int, dim: int) -> int:
        nlist = nlist_for(cfg, rows)
        return int(rows * (cls.code_bytes(cfg, dim) + 8) * IVF_LIST_SLACK) + nlist * dim * 4 + 256 * dim * 4

    @staticmethod
    def detail(cfg: IndexConfig, rows: int) -> str:
        return f"{nlist_for(cfg, rows)} lists"


class IVFPQ(IVFFlat):
    advice = None  # already the smallest

    @staticmethod
    def code_bytes(cfg: IndexConfig, dim: int) -> int:
        return pq_m_for(cfg, dim)

    @staticmethod
    def check(cfg: IndexConfig, dim: int) -> None:
        if cfg.pq_m is not None and dim % cfg.pq_m:
            raise ConfigError(f"index.pq_m={cfg.pq_m} must divide the row dimension {dim}")

    @classmethod
    def create(cls, cfg: IndexConfig, dim: int, rows: int):
        cls.check(cfg, dim)
        faiss, nlist = import_faiss(), nlist_for(cfg, rows)
        # 256 codes a sub-vector, fewer when fewer rows train them (each code needs one)
        bits = min(8, max(1, int(math.log2(max(2, min(rows, cfg.train_rows))))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m_for(cfg, dim), bits,
                                 faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(cfg.nprobe, nlist)
        return index


def choose_kind(cfg: IndexConfig, rows: int) -> str:
    """The name of the kind for `rows` rows: index.kind, or by size when it is `auto`."""
    if cfg.kind != "auto":
        return cfg.kind
    if rows <= cfg.hnsw_max_rows:
        return "hnsw"
    return "ivf_pq" if rows >= cfg.ivf_pq_min_rows else "ivf_flat"


def index_kind(cfg: IndexConfig, rows: int) -> tuple[str, type[IndexKind]]:
    """The kind for `rows` rows: its name and its class."""
    name = choose_kind(cfg, rows)
    return name, INDEX_KINDS.get(name)


def index_bytes(cfg: IndexConfig, rows: int, dim: int) -> tuple[int, str]:
    """Bytes of the index over `rows` rows, and its description (for the memory plan)."""
    name, kind = index_kind(cfg, rows)
    detail = kind.detail(cfg, rows)
    return kind.nbytes(cfg, rows, dim), f"{name}, {detail}" if detail else name


def check_index_config(cfg: IndexConfig, dim: int) -> None:
    """What only the row dimension decides, for every kind the config may come to use, before a run starts."""
    for name in INDEX_KINDS.names:
        INDEX_KINDS.get(name).check(cfg, dim)
