"""ASTRA negatives: uniform for `negatives.warmup_epochs`, then the mixture of hard negatives from a faiss index
over the classifier rows and uniform ones (astra_ds/negatives/mixture.py), the index rebuilt every
`negatives.refresh_every` epochs.

Shortlists come from searching the stale index with the current query embeddings (`shortlist_mode: per_step`)
or once per rebuild for every training query (`precomputed`). Each rank indexes its own rows; shortlists are
merged across ranks. Every build measures recall@K against exact search on recent training queries, so that a
recall collapse shows in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from astra_ds.collectives import global_topk_numpy, min_across_ranks, rank
from astra_ds.errors import CheckpointError
from astra_ds.config import RunConfig
from astra_ds.eval.predict import exact_topk_bytes
from astra_ds.negatives.base import MemoryLines, NegativeSampler, Negatives, SamplerContext
from astra_ds.negatives.index import LabelIndex, import_faiss, index_bytes
from astra_ds.negatives.mixture import sample_mixture
from astra_ds.negatives.uniform import sample_uniform
from astra_ds.rng import Stream, numpy_rng

log = logging.getLogger("astra_ds")


class AstraSampler(NegativeSampler):
    def __init__(self, ctx: SamplerContext):
        super().__init__(ctx)
        self.index = LabelIndex(ctx.cfg.index, ctx.cfg.table.normalize_rows)
        self.version = 0  # index builds so far
        self.shortlists: tuple[np.ndarray, np.ndarray] | None = None  # precomputed (ids, scores) per train query
        self.recent_queries: list[torch.Tensor] = []  # the latest index.recall_queries, for the recall check

    @classmethod
    def import_dependencies(cls) -> None:
        import_faiss()

    @classmethod
    def memory(cls, cfg: RunConfig, rows: int, dim: int, num_train: int) -> tuple[MemoryLines, MemoryLines]:
        size, kind = index_bytes(cfg.index, rows, dim)
        resident = [("index", size, kind)]
        if cfg.negatives.shortlist_mode == "precomputed":
            k = cfg.negatives.shortlist_size
            resident.append(("shortlists", num_train * k * 12, f"{k} per training query"))
        build = (min(rows, cfg.index.train_rows) * dim * 4 + cfg.index.add_block * dim * 8
                 + exact_topk_bytes(cfg.index.recall_queries, rows, dim))
        return resident, [("index rebuild", build, "training sample, added blocks, recall check")]

    def on_epoch_start(self, epoch: int) -> dict:
        """The index is (re)built at epochs W, W + R, W + 2R, ... (W warm-up epochs, R = refresh_every)."""
        warmup, every = self.cfg.warmup_epochs, self.cfg.refresh_every
        if epoch < warmup or (epoch - warmup) % every:
            return {}
        return self.refresh()

    def refresh(self) -> dict:
        """Rebuild the index over the current rows (and, in precomputed mode, every query's shortlist)."""
        recall_queries = self.ctx.cfg.index.recall_queries
        sample = torch.cat(self.recent_queries) if self.recent_queries else None
        if self.cfg.shortlist_mode == "precomputed":
            queries = self.ctx.encode_train(None)
            sample = queries[:recall_queries] if sample is None else sample
        elif sample is None:
            sample = self.ctx.encode_train(np.arange(min(self.ctx.num_train, recall_queries)))
        report = self._build()
        if self.cfg.shortlist_mode == "precomputed":
            scores, ids = self.shortlist(queries)
            self.shortlists = (ids, scores)
        recall = min_across_ranks(self.index.recall(self.ctx.table, sample, self.cfg.shortlist_size))
        log.info("index v%d: %s over %d rows built in %.2fs, recall@%d vs exact %.3f", self.version, report.kind,
                 report.rows, report.seconds, self.cfg.shortlist_size, recall)
        return {"index_version": self.version, "index_build_s": report.seconds, "index_recall": recall}

    def _build(self):
        self.version += 1
        rng = numpy_rng(self.ctx.cfg.train.seed, Stream.INDEX_TRAINING, self.version, rank())
        return self.index.build(self.ctx.table, rng)

    def shortlist(self, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids) of the K best labels of each query: each rank's index searched, merged."""
        k = self.cfg.shortlist_size
        return global_topk_numpy(*self.index.search(queries, k), k)

    def sample(self, query_ids, queries, positives, rng) -> Negatives:
        if self.version == 0:  # warm-up
            return sample_uniform(positives, self.cfg.num_negatives, rng)
        if self.cfg.shortlist_mode == "precomputed":
            ids, scores = self.shortlists[0][query_ids], self.shortlists[1][query_ids]
        else:
            scores, ids = self.shortlist(queries)
        return sample_mixture(positives, ids, scores, self.cfg.num_negatives, self.cfg.alpha, self.cfg.tau, rng)

    def observe(self, query_ids, queries) -> None:
        self.recent_queries.append(queries)
        limit = self.ctx.cfg.index.recall_queries
        while sum(len(q) for q in self.recent_queries) - len(self.recent_queries[0]) >= limit:
            self.recent_queries.pop(0)

    # ---- checkpoint component ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": self.version, "shortlists": self.shortlists, "recent_queries": self.recent_queries}

    def load_state_dict(self, state: dict) -> None:
        self.version, self.shortlists, self.recent_queries = (state["version"], state["shortlists"],
                                                              state["recent_queries"])

    def save_files(self, directory: Path, previous: Path | None) -> None:
        """Each rank's index, written by faiss."""
        if self.index.index is not None:
            self.index.save(directory / f"rank{rank()}.faiss")

    def load_files(self, directory: Path, resharded: bool) -> None:
        """This rank's index; on another number of ranks, rebuilt over the rank's new rows (ASTRA's hard
        negatives then differ from an uninterrupted run's until the next refresh)."""
        if self.version == 0:
            return
        if resharded:
            log.warning("resumed on another number of ranks: each rank's index is rebuilt over its new rows")
            self.version -= 1
            self._build()
            return
        path = directory / f"rank{rank()}.faiss"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory.parent} is incomplete (missing {path.name})")
        self.index.load(path, self.ctx.table)
