"""The rows of a stage's best validation evaluation (eval.keep_best), so that a stage that trains the rows on a
frozen encoder (classifier, refit) ends with them rather than with its last.

A stage stopped by eval.patience has gone on for `patience` evaluations past its best, and one that ran its epochs
may end below its best. The encoder does not move in these stages, so the table (its
rows and their optimizer state) is the whole of what they train: a copy of it, taken at each better evaluation, is
put back when the stage ends. The copy is a ClassifierTable of the same shards, held in host memory beside the
table (the memory plan counts it) and saved with every checkpoint, so that a resumed run ends each stage with the
rows an uninterrupted one would.
"""

from __future__ import annotations

import logging
from pathlib import Path

from astra_ds.table.table import ClassifierTable

log = logging.getLogger("astra_ds")


class BestRows:
    def __init__(self, table: ClassifierTable, world_size: int):
        self.table = table
        self.copy = ClassifierTable(table.num_labels, table.dim, table.cfg, "cpu", table.rank, world_size, table.seed)
        self.stage: str | None = None  # the stage the copy was taken in, None when there is none
        self.step, self.p_at_1 = 0, 0.0

    def take(self, stage: str, step: int, p_at_1: float) -> None:
        """The table as it is now: the best of `stage` so far."""
        _copy_table(self.table, self.copy)
        self.stage, self.step, self.p_at_1 = stage, step, p_at_1

    def end_stage(self, stage: str, step: int) -> None:
        """At the end of `stage`: the table goes back to the copy taken in it, unless that is the table now."""
        if self.stage == stage and self.step != step:
            _copy_table(self.copy, self.table)
            log.info("%s stage ends with the rows of step %d (validation P@1 %.4f), not those of step %d", stage,
                     self.step, self.p_at_1, step)
        self.stage = None

    # ---- as a checkpoint component (astra_ds/training/checkpoint.py) ---------------------------------------------

    def state_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "P@1": self.p_at_1}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.step, self.p_at_1 = state["stage"], state["step"], state["P@1"]

    def save_files(self, directory: Path, previous: Path | None) -> None:
        self.copy.save_files(directory, previous)

    def load_files(self, directory: Path, resharded: bool) -> None:
        self.copy.load_files(directory, resharded)


def _copy_table(source: ClassifierTable, target: ClassifierTable) -> None:
    """Rows, optimizer state and the count of updates of `source` into `target` (the same shard)."""
    target.rows.copy_(source.rows)
    for name, tensor in source.optimizer.state.items():
        target.optimizer.state[name].copy_(tensor)
    target.updates, target.initialized = source.updates, source.initialized
    target.dirty[:] = True
