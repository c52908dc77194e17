"""ASTRA negatives: uniform for `negatives.warmup_epochs`, then the mixture of hard negatives from a faiss index
over the classifier rows and uniform ones (astra_ds/negatives/mixture.py), the index rebuilt every
`negatives.refresh_every` epochs.

Shortlists come from searching the stale index with the current query embeddings (`shortlist_mode: per_step`)
or once per rebuild for every training query (`precomputed`; see shortlists.py). Each rank indexes its own rows;
shortlists are merged across ranks. Every build measures recall@K against exact search on recent training
queries, so that a recall collapse shows in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from astra_ds.choices import SHORTLISTS
from astra_ds.collectives import global_topk_numpy, min_across_ranks
from astra_ds.config import RunConfig
from astra_ds.errors import CheckpointError
from astra_ds.index.kinds import check_index_config, import_faiss, index_bytes, index_kind
from astra_ds.index.label_index import LabelIndex
from astra_ds.negatives.base import NegativeSampler, Negatives, SamplerContext, TrainQueries
from astra_ds.negatives.mixture import sample_mixture
from astra_ds.negatives.uniform import sample_uniform
from astra_ds.plan import PlanLine
from astra_ds.rng import Stream, numpy_rng
from astra_ds.scoring.rows import exact_topk_bytes

log = logging.getLogger("astra_ds")


class AstraSampler(NegativeSampler):
    def __init__(self, ctx: SamplerContext):
        super().__init__(ctx)
        self.index = LabelIndex(ctx.cfg.index, ctx.cfg.table.normalize_rows)
        self.version = 0  # index builds so far
        self.shortlists = SHORTLISTS.get(self.cfg.shortlist_mode)()
        self.rank = ctx.table.rank
        self.recent_queries: list[torch.Tensor] = []  # the latest index.recall_queries, for the recall check

    @classmethod
    def import_dependencies(cls) -> None:
        import_faiss()

    @classmethod
    def check(cls, cfg: RunConfig, dim: int) -> None:
        check_index_config(cfg.index, dim)

    @classmethod
    def memory(cls, cfg: RunConfig, rows: int, dim: int, num_train: int) -> tuple[list[PlanLine], list[PlanLine]]:
        size, detail = index_bytes(cfg.index, rows, dim)
        kind = index_kind(cfg.index, rows)[1]
        resident = [PlanLine("index", size, detail=detail, advice=kind.advice),
                    *SHORTLISTS.get(cfg.negatives.shortlist_mode).memory(cfg, num_train)]
        recall_check = 0 if kind.exact else exact_topk_bytes(cfg.index.recall_queries, rows, dim)
        build = min(rows, cfg.index.train_rows) * dim * 4 + cfg.index.add_block * dim * 8 + recall_check
        return resident, [PlanLine("index rebuild", build, detail="training sample, added blocks, recall check")]

    def on_epoch_start(self, epoch: int, train_queries: TrainQueries) -> dict:
        """The index is (re)built at epochs W, W + R, W + 2R, ... (W warm-up epochs, R = refresh_every)."""
        warmup, every = self.cfg.warmup_epochs, self.cfg.refresh_every
        if epoch < warmup or (epoch - warmup) % every:
            return {}
        return self.refresh(train_queries)

    def refresh(self, train_queries: TrainQueries) -> dict:
        """Rebuild the index over the current rows (and the shortlists that are computed once per build); measure
        its recall on the latest training queries (on the first ones before any step)."""
        recall_queries = self.ctx.cfg.index.recall_queries
        report = self._build()
        searched = self.shortlists.refresh(self.shortlist, train_queries)
        if self.recent_queries:
            sample = torch.cat(self.recent_queries)
        elif searched is not None:
            sample = searched[:recall_queries]
        else:
            sample = train_queries(np.arange(min(self.ctx.num_train, recall_queries)))
        # an exact index over the rows it was just built from has nothing to measure (and the exact search of 1M rows
        # for 512 queries takes seconds)
        recall = 1.0 if self.index.exact else min_across_ranks(self.index.recall(self.ctx.table, sample,
                                                                                  self.cfg.shortlist_size))
        log.info("index v%d: %s over %d rows built in %.2fs, recall@%d vs exact %.3f", self.version, report.kind,
                 report.rows, report.seconds, self.cfg.shortlist_size, recall)
        return {"index_version": self.version, "index_build_s": report.seconds, "index_recall": recall}

    def _build(self):
        self.version += 1
        rng = numpy_rng(self.ctx.cfg.train.seed, Stream.INDEX_TRAINING, self.version, self.rank)
        return self.index.build(self.ctx.table, rng)

    def shortlist(self, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids) of the K best labels of each query: each rank's index searched, merged."""
        k = self.cfg.shortlist_size
        return global_topk_numpy(*self.index.search(queries, k), k)

    def sample(self, query_ids, queries, positives, rng) -> Negatives:
        if self.version == 0:  # warm-up
            return sample_uniform(positives, self.cfg.num_negatives, rng)
        scores, ids = self.shortlists.lookup(self.shortlist, query_ids, queries)
        return sample_mixture(positives, ids, scores, self.cfg.num_negatives, self.cfg.alpha, self.cfg.tau, rng)

    def observe(self, query_ids, queries) -> None:
        self.recent_queries.append(queries)
        limit = self.ctx.cfg.index.recall_queries
        while sum(len(q) for q in self.recent_queries) - len(self.recent_queries[0]) >= limit:
            self.recent_queries.pop(0)

    # ---- checkpoint component ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": self.version, "shortlists": self.shortlists.state_dict(),
                "recent_queries": self.recent_queries}

    def load_state_dict(self, state: dict) -> None:
        self.version, self.recent_queries = state["version"], state["recent_queries"]
        self.shortlists.load_state_dict(state["shortlists"])

    def save_files(self, directory: Path, previous: Path | None) -> None:
        """Each rank's index, written by faiss."""
        if self.index.index is not None:
            self.index.save(directory / f"rank{self.rank}.faiss")

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
        path = directory / f"rank{self.rank}.faiss"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory.parent} is incomplete (missing {path.name})")
        self.index.load(path, self.ctx.table)
