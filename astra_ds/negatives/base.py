"""The interface of a negative sampler, the component that draws the m negatives of each query of a step.

The trainer calls, in this order:
    on_epoch_start(epoch, train_queries)    at the start of each epoch (not when resumed inside it); returns
                                            values for the training log (an index build's time and recall).
                                            `train_queries(rows)`: the embeddings (host) of the training queries
                                            at `rows` (None: all) as the current stage trains on them
    sample(query_ids, queries, positives, rng)
                                            the negatives of a micro-batch: every rank draws the same ones
    observe(query_ids, queries)             the micro-batch's query embeddings (host), after its step
A sampler is a checkpoint component: `state_dict()` / `load_state_dict()` hold what every rank shares; a sampler
with large per-rank state also has `save_files(directory, previous)` / `load_files(directory, resharded)`.

A new sampler is a module with a subclass of NegativeSampler and an entry in astra_ds.choices.SAMPLERS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from astra_ds.config import RunConfig
from astra_ds.plan import PlanLine
from astra_ds.table.table import ClassifierTable


@dataclass
class Negatives:
    global_ids: np.ndarray  # (B, m) int64 label ids, never a positive of their query
    log_q: np.ndarray  # (B, m) float64 log proposal probability Q_i(l) of each draw


@dataclass
class SamplerContext:
    """What a sampler may use besides its config."""

    cfg: RunConfig
    table: ClassifierTable  # this rank's rows
    num_train: int


# embeddings (N, d), on the host, of the training queries at these rows (None: all), as the stage trains on them
TrainQueries = Callable[[np.ndarray | None], torch.Tensor]


class NegativeSampler:
    def __init__(self, ctx: SamplerContext):
        self.ctx, self.cfg = ctx, ctx.cfg.negatives

    @classmethod
    def import_dependencies(cls) -> None:
        """Import the libraries the sampler needs beyond torch (the memory plan then measures the process with
        them); fail here, with what to install."""

    @classmethod
    def check(cls, cfg: RunConfig, dim: int) -> None:
        """What the row dimension decides for this sampler, checked before a run starts."""

    @classmethod
    def memory(cls, cfg: RunConfig, rows: int, dim: int, num_train: int) -> tuple[list[PlanLine], list[PlanLine]]:
        """What the sampler holds on a rank owning `rows` rows of width `dim`: through the run, and during a
        phase of its own (astra_ds/plan.py)."""
        return [], []

    def on_epoch_start(self, epoch: int, train_queries: TrainQueries) -> dict:
        return {}

    def sample(self, query_ids: np.ndarray, queries: torch.Tensor, positives: sp.csr_matrix,
               rng: np.random.Generator) -> Negatives:
        raise NotImplementedError

    def observe(self, query_ids: np.ndarray, queries: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
