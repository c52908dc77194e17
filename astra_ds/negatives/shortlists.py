"""Where ASTRA's shortlists come from after each index build (`negatives.shortlist_mode`, registry SHORTLISTS in
astra_ds/choices.py). A shortlist is the K best labels of a query by the index: (scores, global ids), (B, K).

    per_step     each step searches the (stale) index with its queries' current embeddings
    precomputed  every training query is searched once per build; steps look their shortlists up
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from astra_ds.config import RunConfig
from astra_ds.negatives.base import TrainQueries
from astra_ds.plan import PlanLine

Search = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]  # queries -> (scores, global ids)


class PerStepShortlists:
    @staticmethod
    def memory(cfg: RunConfig, num_train: int) -> list[PlanLine]:
        return []

    def refresh(self, search: Search, train_queries: TrainQueries) -> torch.Tensor | None:
        """After an index build: nothing to precompute (returns the queries it encoded: none)."""
        return None

    def lookup(self, search: Search, query_ids: np.ndarray, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return search(queries)

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass


class PrecomputedShortlists(PerStepShortlists):
    def __init__(self):
        self.lists: tuple[np.ndarray, np.ndarray] | None = None  # (ids, scores) of every training query

    @staticmethod
    def memory(cfg: RunConfig, num_train: int) -> list[PlanLine]:
        k = cfg.negatives.shortlist_size
        return [PlanLine("shortlists", num_train * k * 12, detail=f"{k} per training query",
                         advice="negatives.shortlist_mode=per_step", per_query=True)]

    def refresh(self, search: Search, train_queries: TrainQueries) -> torch.Tensor:
        """Every training query's shortlist from the new index; returns the queries' embeddings."""
        queries = train_queries(None)
        scores, ids = search(queries)
        self.lists = (ids, scores)
        return queries

    def lookup(self, search: Search, query_ids: np.ndarray, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.lists[1][query_ids], self.lists[0][query_ids]

    def state_dict(self):  # tensors: checkpoints load with weights_only
        return None if self.lists is None else tuple(map(torch.from_numpy, self.lists))

    def load_state_dict(self, state) -> None:
        self.lists = None if state is None else tuple(part.numpy() for part in state)
