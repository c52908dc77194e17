"""Model selection on the validation split: where a stage stops, which of its states the run keeps, and which
scoring weights the model uses. The trainer reports each validation evaluation; this component decides.

- eval.patience: a stage stops when its validation P@1 has not bettered by more than eval.min_delta for that many
  evaluations.
- eval.keep_best: a stage ends with the state of its best evaluation. In a stage that trains the rows alone, a
  copy of the table taken then is put back (best_rows.py). In one that trains the encoder (whose copy would not
  fit beside it), the checkpoint written at that evaluation is kept beyond checkpoint.keep_last, and the run goes
  back to it when the stage ends: every component as it was then, the stage counted as stopped early there.
- eval.label_text_weights, eval.neighbour_weights: after training, the weight with the best validation P@1 (the
  first of equals) becomes eval.label_text_weight, then eval.neighbour_weight.

Its state (each stage's best P@1 and the evaluations since, the stages stopped early, the best checkpoint)
travels in checkpoints with the trainer's position, so that a resumed run selects as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from astra_ds.config import EvalConfig
from astra_ds.table.table import ClassifierTable
from astra_ds.training.best_rows import BestRows
from astra_ds.training.checkpoint import CheckpointManager, checkpoint_tag
from astra_ds.training.stages import Stage

log = logging.getLogger("astra_ds")

SCORING_WEIGHTS = ("label_text_weight", "neighbour_weight")  # chosen in this order


class ModelSelection:
    def __init__(self, cfg: EvalConfig, checkpoints: CheckpointManager, table: ClassifierTable, world_size: int,
                 log_values: Callable[[dict], None]):
        self.cfg, self.checkpoints, self.log_values = cfg, checkpoints, log_values
        self.best: dict[str, tuple[float, int]] = {}  # stage name -> (best P@1 along it, evaluations since)
        self.stopped_early: dict[str, int] = {}  # stage name -> the steps it ran, when it stopped early
        self.best_rows = BestRows(table, world_size) if cfg.keep_best else None
        self.best_checkpoint: dict | None = None  # {"stage", "step", "path"}: see the module docstring

    @property
    def best_checkpoint(self) -> dict | None:
        return self._best_checkpoint

    @best_checkpoint.setter
    def best_checkpoint(self, best: dict | None) -> None:
        """The checkpoint manager keeps the best checkpoint beyond keep_last until the stage ends."""
        self._best_checkpoint = best
        self.checkpoints.pinned = {Path(best["path"])} if best else set()

    def observe(self, stage: Stage, step: int, p_at_1: float) -> None:
        """A validation evaluation of `stage` at `step` (a checkpoint follows it when it is the best)."""
        best, since = self.best.get(stage.name, (-1.0, 0))
        better = p_at_1 > best + self.cfg.min_delta
        self.best[stage.name] = (p_at_1, 0) if better else (best, since + 1)
        if better and self.best_rows is not None and not stage.trains_encoder:  # the table is all the stage trains
            self.best_rows.take(stage.name, step, p_at_1)
        if better and self.cfg.keep_best and stage.trains_encoder:
            path = self.checkpoints.dir / checkpoint_tag(step)
            self.best_checkpoint = {"stage": stage.name, "step": step, "path": str(path.resolve())}

    def saves_at(self, step: int) -> bool:
        """A checkpoint is due at `step`: the stage's best so far, which the run may go back to."""
        return self.best_checkpoint is not None and self.best_checkpoint["step"] == step

    def stops_early(self, stage: Stage, step: int, first_step: int, epoch: int) -> bool:
        """eval.patience: whether `stage` (which began after step `first_step`) ends at `step`."""
        best, since = self.best[stage.name]
        if not self.cfg.patience or since < self.cfg.patience:
            return False
        self.stopped_early[stage.name] = step - first_step
        log.info("%s stage stopped early at step %d (epoch %d): validation P@1 %.4f %d evaluations ago, not "
                 "bettered since", stage.name, step, epoch, best, since)
        self.log_values({"stage": stage.name, "stopped_early": True, "best_P@1": best})
        return True

    def end_stage(self, stage: Stage, step: int, first_step: int) -> bool:
        """At the last step of `stage` (which began after step `first_step`): eval.keep_best puts its best state
        back. Whether the run went back to an earlier step (then the checkpoints written after it are deleted)."""
        if self.best_rows is not None:
            self.best_rows.end_stage(stage.name, step)
        best = self.best_checkpoint
        if best is None or best["stage"] != stage.name or best["step"] == step:
            return False
        path, meta = self.checkpoints.start_point(best["path"], None)  # verified, as a resume would
        self.checkpoints.load(path, meta)  # every component, the trainer's position and this one's state
        self.stopped_early[stage.name] = meta["step"] - first_step
        self.best_checkpoint = None
        self.checkpoints.discard_after(path)
        p_at_1 = self.best[stage.name][0]
        log.info("%s stage ends with the encoder and rows of step %d (validation P@1 %.4f), not those of step %d",
                 stage.name, meta["step"], p_at_1, step)
        self.log_values({"stage": stage.name, "back_to_best_step": meta["step"], "best_P@1": p_at_1})
        return True

    def choose_scoring(self, validation_p_at_1: Callable[[], float]) -> bool:
        """The scoring weights chosen on the validation split (`validation_p_at_1()` evaluates the model with
        the weights as they are set); whether any was."""
        return any([self._choose_weight(name, validation_p_at_1) for name in SCORING_WEIGHTS])

    def _choose_weight(self, name: str, validation_p_at_1: Callable[[], float]) -> bool:
        weights = getattr(self.cfg, name + "s")
        if not weights:
            return False
        p1 = {}
        for weight in weights:
            setattr(self.cfg, name, weight)
            p1[weight] = validation_p_at_1()
        chosen = max(weights, key=lambda weight: (p1[weight], -weights.index(weight)))
        setattr(self.cfg, name, chosen)
        self.log_values({name: chosen, f"validation_P@1_by_{name}": list(p1.items())})
        log.info("eval.%s=%g chosen on the validation split (P@1 %s)", name, chosen,
                 ", ".join(f"{w:g}: {v:.4f}" for w, v in p1.items()))
        return True

    # ---- checkpoints: saved with the trainer's own state (the "trainer" component) -----------------------------

    def state_dict(self) -> dict:
        return {"stopped_early": self.stopped_early, "best": self.best, "best_checkpoint": self.best_checkpoint}

    def load_state_dict(self, state: dict) -> None:
        self.stopped_early.clear()  # in place: the schedule reads the same dict
        self.stopped_early.update(state.get("stopped_early", {}))
        self.best = dict(state.get("best", {}))
        self.best_checkpoint = state.get("best_checkpoint")
