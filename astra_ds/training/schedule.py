"""The run's plan of steps: how many steps each stage runs, the global step after which each begins, the last
step of the run, and the counts that follow from them (the epochs that trained the rows, the steps that trained
the encoder). A stage runs its epochs unless model selection stopped it early (selection.py), and the whole run
stops at train.max_steps; everything here is computed from those, so an early stop or a rewind re-plans the steps
that follow at once.
"""

from __future__ import annotations

import math

from astra_ds.training.stages import Stage


class Schedule:
    def __init__(self, stages: list[Stage], max_steps: int | None, stopped_early: dict[str, int]):
        """`stopped_early`: stage name -> the steps it ran (model selection's, shared: it changes along the run)."""
        self.stages, self.max_steps, self.stopped_early = stages, max_steps, stopped_early

    def stage_steps(self, stage: Stage) -> int:
        """The steps of a stage: its epochs', or those it ran when it stopped early."""
        return self.stopped_early.get(stage.name, stage.epochs * stage.steps_per_epoch)

    def first_step(self, stage: Stage) -> int:
        """The global step after which `stage` begins: the steps of the stages before it."""
        return sum(self.stage_steps(s) for s in self.stages[:self.stages.index(stage)])

    def end(self, stage: Stage) -> int:
        """The global step at which `stage` ends (within the run's last step)."""
        return min(self.first_step(stage) + self.stage_steps(stage), self.total_steps)

    @property
    def total_steps(self) -> int:
        """The last step of the run."""
        steps = sum(self.stage_steps(s) for s in self.stages)
        return min(steps, self.max_steps) if self.max_steps else steps

    def stage_at(self, step: int) -> Stage:
        """The stage of step `step` (1-based: the step just done)."""
        return [s for s in self.stages if self.first_step(s) < max(step, 1)][-1]

    def table_epoch(self, stage: Stage, epoch: int) -> int:
        """Epochs of training the rows before this one (ASTRA's schedule runs across the stages that train them)."""
        before = self.stages[:self.stages.index(stage)]
        return sum(math.ceil(self.stage_steps(s) / s.steps_per_epoch) for s in before if s.trains_table) + epoch

    def encoder_steps(self, step: int) -> int:
        """Steps up to `step` of the stages that train the encoder: embeddings computed at the same count are
        current."""
        return sum(min(max(step - self.first_step(s), 0), self.stage_steps(s)) for s in self.stages if s.trains_encoder)
