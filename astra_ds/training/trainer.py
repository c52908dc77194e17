"""The trainer: the order of the stages, of their epochs and steps, and what happens between steps. The
components decide for themselves: where the run starts (start.py), when a checkpoint is due (checkpoint.py), which
state of a stage the run keeps and when a stage stops (selection.py), what an evaluation computes (validator.py),
how the model is published (publish.py). The parts come from build.py, the stages and their steps from
stages.py; a run from start to end (fit, save the model, evaluate, the serving index) is astra_ds/run.py.

A step of the joint stage (global batch of B queries, W ranks, each owning a contiguous block of the rows):
  1. each rank encodes its B / W queries with the DeepSpeed engine; all-gather -> q (B, d), calibration
  2. the negative sampler draws m negatives per query (the same draws on every rank)
  3. the classifier half (step.py): pairs of labels this rank owns, their rows fetched from host memory,
     scored -> this rank's part of the sampled BCE
  4. backward through rows, the all-gather and the encoder; DeepSpeed steps the encoder
  5. the sampler and the batches observe the queries; after the last micro-batch, each rank updates its rows
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from astra_ds.config import RunConfig, summary
from astra_ds.dist import DistInfo
from astra_ds.errors import Preempted, TrainingError, UserError
from astra_ds.eval.evaluate import MODEL
from astra_ds.files import write_atomically
from astra_ds.libraries import release_free_memory
from astra_ds.plan import GiB, peak_rss_bytes, rss_anon_bytes
from astra_ds.rng import GlobalRngState
from astra_ds.rundir.run_dir import RunDir
from astra_ds.training.build import build_training
from astra_ds.training.checkpoint import CheckpointManager, step_of
from astra_ds.training.encodings import Encodings
from astra_ds.training.engine import EngineCheckpoint
from astra_ds.training.metrics_log import MetricsLog, StepWindow
from astra_ds.training.preemption import Preemption
from astra_ds.training.publish import save_model
from astra_ds.training.schedule import Schedule
from astra_ds.training.selection import ModelSelection
from astra_ds.training.stages import Stage, build_stages
from astra_ds.training.start import check_resumable, resolve_start
from astra_ds.training.validator import Validator

log = logging.getLogger("astra_ds")


class Trainer:
    def __init__(self, cfg: RunConfig, dist: DistInfo, progress: bool = True, resume: str | None = None,
                 init_from: str | None = None, overwrite: bool = False, allow_changes: bool = False,
                 evaluate: bool = True):
        """`resume`, `init_from`, `overwrite`: where the run starts (training/start.py); `allow_changes`: a resumed
        run may change settings that alter the steps to come; `evaluate`: the run ends with an evaluation on the
        test split, which must hold queries. The caller holds the run directory's lock."""
        self.cfg, self.dist = cfg, dist
        # rank 0 shows progress: bars on a terminal; elsewhere (CI, nohup) a readable log line every log_every steps
        # and the long phases' progress lines (astra_ds/progress.py)
        self.progress = progress and self.dist.is_main
        self.bars = self.progress and sys.stderr.isatty()
        self.run = RunDir(cfg.out_dir)
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run, self.dist.rank, self.dist.world_size)
        start = resolve_start(self.run, self.checkpoints, resume, init_from, overwrite)
        if self.dist.is_main:
            log.info("config:\n%s", summary(cfg))

        parts = build_training(cfg, self.dist, start.checkpoint, progress=self.progress, from_run=start.from_run)
        self.parts, self.data, self.engine, self.table = parts, parts.data, parts.engine, parts.table
        if evaluate and not len(self.data.test.tokens):
            raise UserError(f"the data at {cfg.data.path} has no test queries, so the model could not be evaluated: "
                            "train with --no-eval (evaluate=False), or add them")
        self.data_fingerprint = self.data.fingerprint
        if start.resumed:
            check_resumable(start.checkpoint[1], start.resume_path, cfg, self.data_fingerprint, allow_changes)
        self.sampler, self.memory_plan = parts.sampler, parts.memory_plan
        self.stages = build_stages(parts)
        self.selection = ModelSelection(cfg.eval, self.checkpoints, self.table, self.dist.world_size, self.log)
        self.schedule = Schedule(self.stages, cfg.train.max_steps, self.selection.stopped_early)
        self.step = 0
        self.trained_seconds_before = 0.0  # training time of the runs this one resumes (evaluations left out)
        self.fit_started, self.eval_seconds = time.time(), 0.0
        self.encodings = Encodings(parts, lambda: self.schedule.encoder_steps(self.step))
        self.validator = Validator(parts, self.encodings, self.run)
        self.evaluated_step: int | None = None  # the step of the last evaluation along training

        best_rows = self.selection.best_rows
        for name, component in (("encoder", EngineCheckpoint(self.engine, self.dist.rank)), ("table", self.table),
                                ("negatives", self.sampler), ("trainer", self),
                                *((f"{stage.name}_batches", stage.batches) for stage in self.stages),
                                *((("best_rows", best_rows),) if best_rows else ())):
            self.checkpoints.register(name, component)
        self.checkpoints.register("rng", GlobalRngState(), per_rank=True)
        if start.resumed:
            self.checkpoints.load(*start.checkpoint)
            log.info("resumed from %s (step %d, %s stage)", start.resume_path, self.step, start.checkpoint[1]["stage"])
        elif start.checkpoint:
            self.checkpoints.load_weights(start.checkpoint[0])
            log.info("encoder and classifier rows initialised from %s", start.checkpoint[0])
        # the rows start (table.init) when the first stage that trains them begins, from the encoder the stages
        # before it left; rows that --init-from brought from a checkpoint are kept, a finished run's are put in then
        first_rows_stage = next((s for s in self.stages if s.trains_table), self.stages[0])
        self.rows_stage = None if start.init_from and self.table.initialized else first_rows_stage
        if self.dist.is_main:
            start.prepare(self.run, self.checkpoints, cfg, parts.ds_config)
        self.metrics_log = MetricsLog(self.run, self.dist.is_main, start.resumed_step,
                                      getattr(self.engine, "monitor", None))
        d, label_queries = self.data, self.data.num_label_queries
        log.info("data %s: %d train%s / %d test queries, %d labels | encoder %s (d=%d) | DeepSpeed %s, ZeRO-%d | "
                 "%d ranks | stages %s | %d steps", d.name, len(d.train) - label_queries,
                 f" (+{label_queries} label texts)" if label_queries else "", len(d.test.tokens), d.num_labels,
                 cfg.encoder.model, self.table.dim, parts.ds_path.name, self.engine.zero_optimization_stage(),
                 self.dist.world_size, ", ".join(f"{s.name} {s.epochs} x {s.steps_per_epoch}" for s in self.stages),
                 self.schedule.total_steps)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> None:
        self.engine.train()
        self.fit_started, self.eval_seconds = time.time(), 0.0
        self.rss_anon_at_start = rss_anon_bytes()  # built, before the first step: the data's private memory in it
        self.preemption = Preemption()
        try:  # the log is closed (its TensorBoard events flushed) however training ends: preempted, failed
            try:
                self.run_stages()
            finally:
                self.preemption.restore()
            if self.selection.choose_scoring(lambda: self.validator.p_at_1(self.data.validation, self.step)) \
                    and self.dist.is_main:  # the chosen weights go to the test evaluation, the model and config.yaml
                write_atomically(self.run.config, self.cfg.with_absolute_paths().to_yaml())
            previous = self.checkpoints.previous
            if previous is None or step_of(previous.name) != self.step:
                self.save_checkpoint()  # the end of the run
        finally:
            self.metrics_log.close()

    def run_stages(self) -> None:
        for stage in self.stages:
            first = self.schedule.first_step(stage)
            if self.step >= self.schedule.end(stage):
                continue  # done before this run resumed, or past max_steps
            fresh = self.step == first
            if fresh and stage is self.rows_stage:  # table.init: see __init__
                self.parts.initialize_rows()
            stage.begin(resumed=not fresh)
            self.run_stage(stage, first)
            stage.end()

    def run_stage(self, stage: Stage, first: int) -> None:
        cfg, per_epoch = self.cfg, stage.steps_per_epoch
        end = self.schedule.end(stage)
        every = cfg.eval.every_epochs * per_epoch if stage.trains_table else 0  # steps, maybe fractional
        eval_steps = {first + round(k * every) for k in range(1, int((end - first) / every) + 1)} if every else set()
        window = StepWindow()
        if every and self.step == first and self.step != self.evaluated_step:
            self.evaluate_along(stage, epoch=0)  # where the curve starts: the initial rows (random or label-text)
        bar = tqdm(total=end, initial=self.step, desc=stage.name, unit="step", disable=not self.bars)
        for epoch in range((self.step - first) // per_epoch, stage.epochs):
            first_position = self.step - first - epoch * per_epoch  # > 0 when resumed within the epoch
            if first_position == 0 and self.step < end:
                self.log(stage.on_epoch_start(epoch))  # NGAME clusters
                if stage.trains_table:  # ASTRA's index
                    self.log(self.sampler.on_epoch_start(self.schedule.table_epoch(stage, epoch), stage.train_queries))
            order = stage.batches.epoch_batches(epoch)
            for position in range(first_position, per_epoch):
                if self.step >= end:
                    break
                try:
                    stats = stage.step(order[position], self.step)
                    if not math.isfinite(stats["loss"]):
                        raise TrainingError(f"the loss is {stats['loss']}")
                except TrainingError as err:
                    raise TrainingError(f"step {self.step + 1}: {err}; stopped before saving (the last checkpoint "
                                        "is intact)") from None
                self.step += 1
                if stage.trains_encoder:  # its activations change size with each batch's length
                    release_free_memory()
                if cfg.train.record_batches:  # as step n (1-based), like the loss of the step
                    self.log({"batch": order[position].tolist()})
                window.add(stats["loss"])
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4g}")
                if self.step % cfg.train.log_every == 0 or self.step == end:
                    values = {"stage": stage.name, "epoch": epoch, "epochs_done": (self.step - first) / per_epoch,
                              **stats, **window.close(stage.batches.batch_size),
                              "train_seconds": self.train_seconds(), "peak_rss_gib": peak_rss_bytes() / GiB}
                    self.log(values)
                    if not self.bars:
                        log.info("%s step %d/%d | epoch %d | loss %.4g | %.1f queries/s | peak RSS %.2f GiB",
                                 stage.name, self.step, self.schedule.total_steps, epoch, values["loss"],
                                 values["queries_per_s"], values["peak_rss_gib"])
                # the last step of the run is evaluated on the test split after training, and on the validation
                # split here only when the stage may go back to its best rows
                stops = False
                last_step = self.step == self.schedule.total_steps
                if self.step in eval_steps and (not last_step or self.selection.best_rows is not None):
                    window.pause(self.evaluate_along(stage, epoch))  # throughput figures leave evaluations out
                    stops = self.selection.stops_early(stage, self.step, first, epoch)
                if self.step == first + self.schedule.stage_steps(stage) and self.rewind_to_best(stage, first):
                    bar.close()
                    return
                # after the step's evaluation: a run resumed here goes on as this one does
                saved = None
                if self.checkpoints.due(self.step) or self.selection.saves_at(self.step):
                    saved = self.save_checkpoint()
                signum = self.preemption.requested()
                if signum:  # a signal during the step or its checkpoint: one checkpoint of this step
                    raise Preempted(signum, self.step, saved or self.save_checkpoint())
                if stops:
                    bar.close()
                    return
        bar.close()

    def log(self, values: dict) -> None:
        if values:
            self.metrics_log.log(self.step, values)

    def evaluate_along(self, stage: Stage, epoch: int) -> float:
        """An evaluation during training, logged with the epochs and training seconds so far; its duration."""
        started = time.time()
        self.evaluated_step = self.step
        trained = {"stage": stage.name, "epoch": epoch,
                   "epochs_done": (self.step - self.schedule.first_step(stage)) / stage.steps_per_epoch,
                   "train_seconds": self.train_seconds()}
        split = self.data.validation or self.data.test  # the test split only when there is no validation split
        results = self.validator.evaluate(split, self.step)[MODEL]
        self.log(trained | {f"{split.name}_{k}": v for k, v in results.items()}
                 | {"peak_rss_gib": peak_rss_bytes() / GiB})
        self.selection.observe(stage, self.step, results["P@1"])
        seconds = time.time() - started
        self.eval_seconds += seconds
        return seconds

    def rewind_to_best(self, stage: Stage, first: int) -> bool:
        """The end of `stage`: model selection may take the run back to the stage's best step (see
        selection.py), where it goes on as one whose stage stopped there; whether it did."""
        seconds = self.train_seconds()
        if not self.selection.end_stage(stage, self.step, first):
            return False
        self.trained_seconds_before, self.fit_started, self.eval_seconds = seconds, time.time(), 0.0
        return True

    def train_seconds(self) -> float:
        """Seconds spent training so far, over this run and the runs it resumes, evaluations left out."""
        return self.trained_seconds_before + time.time() - self.fit_started - self.eval_seconds

    # ---- checkpoints: the trainer's own state is its position ---------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "train_seconds": self.train_seconds(), "evaluated_step": self.evaluated_step,
                **self.selection.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.trained_seconds_before = state["step"], state["train_seconds"]
        self.evaluated_step = state.get("evaluated_step")
        self.selection.load_state_dict(state)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, {
            "step": self.step, "stage": self.schedule.stage_at(self.step).name, "num_labels": self.table.num_labels,
            "num_train": len(self.data.train), "dim": self.table.dim, "data": self.data_fingerprint,
            "config": self.cfg.with_absolute_paths().to_dict()})

    def close(self) -> None:
        """The DeepSpeed engine lets go of its hooks (through which DeepSpeed would keep it, its weights and optimizer
        state alive); the trainer cannot train after this."""
        self.engine.destroy()

    # ---- results ----------------------------------------------------------------------------------------------

    def save_model(self) -> None:
        save_model(self.parts, self.encodings, self.run, self.step)

    def evaluate(self) -> dict:
        """Metrics of the model as it is now on the test split (also written into the run directory)."""
        return self.validator.evaluate(self.data.test, self.step)
