"""The trainer: the order of the stages, of their epochs and steps, and what happens between steps (logging,
checkpoints, evaluations, early stops). The parts come from build.py, the stages and their steps from stages.py;
a run from start to end (fit, save the model, evaluate, the serving index) is astra_ds/run.py.

A step of the joint stage (global batch of B queries, W ranks, each owning a contiguous block of the rows):
  1. each rank encodes its B / W queries with the DeepSpeed engine; all-gather -> q (B, d), calibration
  2. the negative sampler draws m negatives per query (the same draws on every rank)
  3. the classifier half (step.py): pairs of labels this rank owns, their rows fetched from host memory,
     scored -> this rank's part of the sampled BCE
  4. backward through rows, the all-gather and the encoder; DeepSpeed steps the encoder
  5. the sampler and the batches observe the queries; after the last micro-batch, each rank updates its rows
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from astra_ds import layout
from astra_ds.choices import STAGES
from astra_ds.collectives import barrier
from astra_ds.config import RunConfig, summary
from astra_ds.data.prepare import TEST, EvalSplit
from astra_ds.dist import DistInfo
from astra_ds.errors import CheckpointError, Preempted, TrainingError, UserError
from astra_ds.eval.evaluate import MODEL, evaluate, exact_topk_all_ranks, search_k
from astra_ds.eval.metrics import format_table
from astra_ds.eval.neighbour_votes import NeighbourVotes
from astra_ds.files import disk_full, write_atomically
from astra_ds.libraries import release_free_memory
from astra_ds.model.label_text import LabelEmbeddings
from astra_ds.plan import GiB, peak_rss_bytes
from astra_ds.rng import GlobalRngState
from astra_ds.scoring import encode_queries
from astra_ds.serve.card import withdraw_run, write_model_files, write_run_manifest
from astra_ds.training.best_rows import BestRows
from astra_ds.training.build import build_training
from astra_ds.training.checkpoint import CheckpointManager
from astra_ds.training.engine import EngineCheckpoint, encoder_state_dict
from astra_ds.training.from_run import is_run_dir
from astra_ds.training.metrics_log import MetricsLog
from astra_ds.training.preemption import Preemption
from astra_ds.training.stages import Stage, build_stages

log = logging.getLogger("astra_ds")


# Settings a resumed run may change: where it writes, how far it goes (a finished run extended by more epochs or
# stages continues as one trained so from the start), what it logs and evaluates at the end. Any other change
# alters the steps still to come, and the resumed run would no longer equal an uninterrupted one.
RESUMABLE_CHANGES = ("out_dir", "data.path", "data.cache_dir", "train.epochs", "train.max_steps", "siamese.epochs",
                     "classifier.epochs", "classifier.refit_epochs", "train.log_every", "train.collective_timeout_s",
                     "train.record_batches", "checkpoint.", "eval.ks", "eval.batch_size", "eval.label_block",
                     "eval.psp", "eval.ann_index", "eval.label_text_weight", "eval.neighbour")


def check_resumable(meta: dict, path: Path, cfg: RunConfig, data_fingerprint: str, allow_changes: bool) -> None:
    """A checkpoint resumes on the data it was trained on, and with its settings but RESUMABLE_CHANGES (others
    refused in one line unless `allow_changes`; every change is logged, a setting newer than the checkpoint
    compared with its default)."""
    if meta.get("data", data_fingerprint) != data_fingerprint:
        raise CheckpointError(f"checkpoint {path} was trained on other data than {cfg.data.path} (other training "
                              "queries or labels, or another data.validation_fraction): it cannot resume on it")
    # a setting added to astra_ds since the checkpoint was written had its default value then
    before = {**flat_config(RunConfig().to_dict()), **flat_config(meta.get("config", {}))}
    now = flat_config(cfg.with_absolute_paths().to_dict())
    changed = {key: (before[key], now.get(key)) for key in before if before[key] != now.get(key)}
    if not changed:
        return
    def said(keys) -> str:
        return "; ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys)

    breaking = [key for key in changed if not key.startswith(RESUMABLE_CHANGES)]
    if breaking and not allow_changes:
        raise CheckpointError(f"resuming {path} with other settings than it was trained with ({said(breaking)}): "
                              "the resumed run would not equal an uninterrupted one; pass --allow-changes to "
                              "resume with them anyway")
    log.warning("resuming %s with changed settings: %s", path, said(changed))


def flat_config(values: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


class Trainer:
    def __init__(self, cfg: RunConfig, dist: DistInfo, progress: bool = True, resume: str | None = None,
                 init_from: str | None = None, overwrite: bool = False, allow_changes: bool = False,
                 evaluate: bool = True):
        """`resume`: "auto" (the latest checkpoint of this run, if any) or a checkpoint directory, continued with
        its full state (on the same data, with the same settings but those that leave the steps as they were,
        unless `allow_changes`); `init_from`: a checkpoint whose weights (encoder, classifier rows) start a fresh
        run, or a finished run whose encoder, rows and their optimizer state do, on a label set that may have grown
        (astra_ds/training/from_run.py), recorded in the run: `--resume auto` before its first checkpoint starts
        from it again; `overwrite`: an earlier run in out_dir is deleted (else refused); `evaluate`: the run ends with an
        evaluation on the test split, which must hold queries. The caller holds the run directory's lock."""
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        # rank 0 shows progress: bars on a terminal; elsewhere (CI, nohup) a readable log line every log_every steps
        # and the long phases' progress lines (astra_ds/progress.py)
        self.progress = progress and self.dist.is_main
        self.bars = self.progress and sys.stderr.isatty()
        self.run_dir = Path(cfg.out_dir)
        earlier_run = not resume and (self.run_dir / layout.CONFIG).exists()
        if earlier_run and not overwrite:
            raise UserError(f"out_dir {self.run_dir} holds an earlier run: continue it with --resume auto, replace "
                            "it with --overwrite, or choose another out_dir")
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.out_dir, self.dist.rank, self.dist.world_size)
        start = self.checkpoints.start_point(resume, None) if resume else None  # (path, meta) or None
        if resume == "auto" and start is None:  # a run begun with --init-from starts from it again
            init_from = self.recorded_init_from()
            log.info("no checkpoint in %s yet: starting from %s", self.checkpoints.dir,
                     f"{init_from} again, as this run began" if init_from else "scratch")
        resume_path = start[0] if start else None
        from_run = Path(init_from) if init_from and is_run_dir(Path(init_from)) else None
        if init_from and not from_run:
            start = self.checkpoints.start_point(None, init_from)
        start_path = start[0] if start else None
        if resume_path and start[1].get("stage") not in STAGES.names:
            raise CheckpointError(f"checkpoint {resume_path} was written in a stage named {start[1]['stage']!r}, "
                                  f"which this version does not have (stages: {', '.join(STAGES.names)})")
        if self.dist.is_main:
            log.info("config:\n%s", summary(cfg))

        parts = build_training(cfg, self.dist, start, progress=self.progress, from_run=from_run)
        self.parts, self.data, self.engine, self.table = parts, parts.data, parts.engine, parts.table
        if evaluate and not len(self.data.test_tokens):
            raise UserError(f"the data at {cfg.data.path} has no test queries, so the model could not be evaluated: "
                            "train with --no-eval (evaluate=False), or add them")
        self.data_fingerprint = self.data.dataset.train.fingerprint()
        if resume_path:
            check_resumable(start[1], resume_path, cfg, self.data_fingerprint, allow_changes)
        self.sampler, self.memory_plan = parts.sampler, parts.memory_plan
        self.stages = build_stages(parts)
        self.stopped_early: dict[str, int] = {}  # stage name -> the steps it ran, when it stopped early
        self.best: dict[str, tuple[float, int]] = {}  # stage name -> (best P@1 along it, evaluations since)
        self.plan_steps()
        self.step = 0
        self.trained_seconds_before = 0.0  # training time of the runs this one resumes (evaluations left out)
        self.fit_started, self.eval_seconds = time.time(), 0.0
        # embeddings kept while the encoder does not change (see `current`): name -> (encoder steps, embeddings)
        self.encodings: dict[str, tuple[int, object]] = {}
        self.evaluated_step: int | None = None  # the step of the last evaluation along training
        # eval.keep_best: the rows of the best evaluation of a stage that trains them alone
        self.best_rows = BestRows(self.table, self.dist.world_size) if cfg.eval.keep_best else None
        # eval.keep_best in a stage that trains the encoder: {"stage", "step", "path"} of the checkpoint written at
        # its best evaluation, which the run goes back to when the stage ends (see rewind_to_best)
        self.best_checkpoint: dict | None = None

        for name, component in (("encoder", EngineCheckpoint(self.engine, self.dist.rank)), (layout.TABLE, self.table),
                                ("negatives", self.sampler), ("trainer", self),
                                *((f"{stage.name}_batches", stage.batches) for stage in self.stages),
                                *((("best_rows", self.best_rows),) if self.best_rows else ())):
            self.checkpoints.register(name, component)
        self.checkpoints.register("rng", GlobalRngState(), per_rank=True)
        if resume_path:
            self.checkpoints.load(*start)
            log.info("resumed from %s (step %d, %s stage)", resume_path, self.step, start[1]["stage"])
        elif init_from and not from_run:
            self.checkpoints.load_weights(start_path)
            log.info("encoder and classifier rows initialised from %s", start_path)
        # the rows start (table.init) when the first stage that trains them begins, from the encoder the stages
        # before it left; rows that --init-from brought from a checkpoint are kept, a finished run's are put in then
        first_rows_stage = next((s for s in self.stages if s.trains_table), self.stages[0])
        self.rows_stage = None if init_from and self.table.initialized else first_rows_stage
        if self.dist.is_main:  # written once everything is built and loaded: a failed resume changes nothing
            self.run_dir.mkdir(parents=True, exist_ok=True)
            withdraw_run(self.run_dir)  # not a finished run again until save_model has written all of it
            if earlier_run:
                self.delete_earlier_run()
            write_atomically(self.run_dir / layout.CONFIG, cfg.with_absolute_paths().to_yaml())
            write_atomically(self.run_dir / layout.DS_CONFIG, json.dumps(parts.ds_config, indent=2))
            if init_from and not resume_path:
                write_atomically(self.run_dir / layout.INIT_FROM,
                                 json.dumps({"init_from": str(Path(init_from).resolve())}))
        self.metrics_log = MetricsLog(self.run_dir, self.dist.is_main, start[1]["step"] if resume_path else None,
                                      getattr(self.engine, "monitor", None))
        d = self.data.dataset
        label_queries = len(self.data.train_tokens) - len(d.train.texts)
        log.info("data %s: %d train%s / %d test queries, %d labels | encoder %s (d=%d) | DeepSpeed %s, ZeRO-%d | "
                 "%d ranks | stages %s | %d steps", d.name, len(d.train.texts),
                 f" (+{label_queries} label texts)" if label_queries else "", len(d.test.texts), d.num_labels,
                 cfg.encoder.model, self.table.dim, parts.ds_path.name, self.engine.zero_optimization_stage(),
                 self.dist.world_size, ", ".join(f"{s.name} {s.epochs} x {s.steps_per_epoch}" for s in self.stages),
                 self.total_steps)

    def recorded_init_from(self) -> str | None:
        """The --init-from this run began with (init_from.json), or None."""
        path = self.run_dir / layout.INIT_FROM
        return json.loads(path.read_text())["init_from"] if path.is_file() else None

    def delete_earlier_run(self) -> None:
        """--overwrite: the files of the run that was in out_dir, and its checkpoints, go (the lock stays)."""
        for path in [*self.run_dir.iterdir(), *self.checkpoints.dir.glob("*")]:
            if path.name != layout.LOCK and path != self.checkpoints.dir and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        log.warning("--overwrite: deleted the earlier run in %s", self.run_dir)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> None:
        self.engine.train()
        self.fit_started, self.eval_seconds = time.time(), 0.0
        self.preemption = Preemption()
        try:
            self.run_stages()
        finally:
            self.preemption.restore()
        self.choose_scoring()
        previous = self.checkpoints.previous
        if previous is None or layout.step_of(previous.name) != self.step:
            self.save_checkpoint()  # the end of the run
        self.metrics_log.close()

    def plan_steps(self) -> None:
        """The global step at which each stage starts, and the last step of the run."""
        self.first_step, steps = {}, 0
        for stage in self.stages:
            self.first_step[stage.name], steps = steps, steps + self.stage_steps(stage)
        self.total_steps = min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    def stage_steps(self, stage: Stage) -> int:
        """The steps of a stage: its epochs', or those it ran when it stopped early."""
        return self.stopped_early.get(stage.name, stage.epochs * stage.steps_per_epoch)

    def run_stages(self) -> None:
        for stage in self.stages:
            first = self.first_step[stage.name]
            if self.step >= min(first + self.stage_steps(stage), self.total_steps):
                continue  # done before this run resumed, or past max_steps
            fresh = self.step == first
            if fresh and stage is self.rows_stage:  # table.init: see __init__
                self.parts.initialize_rows()
            stage.begin(resumed=not fresh)
            self.run_stage(stage, first)
            stage.end()

    def run_stage(self, stage: Stage, first: int) -> None:
        cfg, per_epoch = self.cfg, stage.steps_per_epoch
        end = min(first + self.stage_steps(stage), self.total_steps)
        every = cfg.eval.every_epochs * per_epoch if stage.trains_table else 0  # steps, maybe fractional
        eval_steps = {first + round(k * every) for k in range(1, int((end - first) / every) + 1)} if every else set()
        window, window_start = [], time.time()
        if every and self.step == first and self.step != self.evaluated_step:
            self.evaluate_along(stage, epoch=0)  # where the curve starts: the initial rows (random or label-text)
        bar = tqdm(total=end, initial=self.step, desc=stage.name, unit="step", disable=not self.bars)
        for epoch in range((self.step - first) // per_epoch, stage.epochs):
            first_position = self.step - first - epoch * per_epoch  # > 0 when resumed within the epoch
            if first_position == 0 and self.step < end:
                self.log(stage.on_epoch_start(epoch))  # NGAME clusters
                if stage.trains_table:  # ASTRA's index
                    self.log(self.sampler.on_epoch_start(self.table_epoch(stage, epoch), stage.train_queries))
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
                window.append(stats["loss"])
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4g}")
                if self.step % cfg.train.log_every == 0 or self.step == end:
                    elapsed = time.time() - window_start
                    values = {"stage": stage.name, "epoch": epoch, "epochs_done": (self.step - first) / per_epoch,
                              **stats, "loss": float(np.mean(window)), "steps_per_s": len(window) / elapsed,
                              "queries_per_s": len(window) * stage.batches.batch_size / elapsed,
                              "train_seconds": self.train_seconds(), "peak_rss_gib": peak_rss_bytes() / GiB}
                    self.log(values)
                    if not self.bars:
                        log.info("%s step %d/%d | epoch %d | loss %.4g | %.1f queries/s | peak RSS %.2f GiB",
                                 stage.name, self.step, self.total_steps, epoch, values["loss"],
                                 values["queries_per_s"], values["peak_rss_gib"])
                    window, window_start = [], time.time()
                # the last step of the run is evaluated on the test split after training, and on the validation
                # split here only when the stage may go back to its best rows
                stops = False
                if self.step in eval_steps and (self.step < self.total_steps or self.best_rows is not None):
                    window_start += self.evaluate_along(stage, epoch)  # throughput figures leave evaluations out
                    stops = self.stops_early(stage, first, epoch)
                last = self.step == first + self.stage_steps(stage)
                if self.best_rows is not None and last:
                    self.best_rows.end_stage(stage.name, self.step)
                if last and self.rewind_to_best(stage):
                    bar.close()
                    return
                # after the step's evaluation: a run resumed here goes on as this one does
                best_now = self.best_checkpoint is not None and self.best_checkpoint["step"] == self.step
                if self.checkpoints.due(self.step) or best_now:
                    self.save_checkpoint()
                signum = self.preemption.requested()
                if signum:
                    raise Preempted(signum, self.step, self.save_checkpoint())
                if stops:
                    bar.close()
                    return
        bar.close()

    def stops_early(self, stage: Stage, first: int, epoch: int) -> bool:
        """eval.patience: the stage ends here when its P@1 has not improved (by more than eval.min_delta) for that
        many evaluations."""
        best, since = self.best[stage.name]
        if not self.cfg.eval.patience or since < self.cfg.eval.patience:
            return False
        self.stopped_early[stage.name] = self.step - first
        self.plan_steps()
        log.info("%s stage stopped early at step %d (epoch %d): validation P@1 %.4f %d evaluations ago, not "
                 "bettered since", stage.name, self.step, epoch, best, since)
        self.log({"stage": stage.name, "stopped_early": True, "best_P@1": best})
        return True

    def table_epoch(self, stage: Stage, epoch: int) -> int:
        """Epochs of training the rows before this one (ASTRA's schedule runs across the stages that train them)."""
        before = self.stages[:self.stages.index(stage)]
        return sum(math.ceil(self.stage_steps(s) / s.steps_per_epoch) for s in before if s.trains_table) + epoch

    def encoder_steps(self) -> int:
        """Steps so far of the stages that train the encoder: embeddings computed at the same count are current."""
        return sum(min(max(self.step - self.first_step[s.name], 0), self.stage_steps(s))
                   for s in self.stages if s.trains_encoder)

    def current(self, name: str, encode: Callable[[object | None], object]):
        """Embeddings by the encoder as it is now (the label texts', an evaluation split's queries): `encode(stale)`
        runs again only after the encoder has changed; `stale` (None the first time) may lend its memory."""
        steps, embeddings = self.encodings.get(name, (None, None))
        if steps != self.encoder_steps():
            embeddings = encode(embeddings)
            self.encodings[name] = (self.encoder_steps(), embeddings)
        return embeddings

    def current_label_embeddings(self) -> LabelEmbeddings:
        """The label texts as the encoder embeds them now."""
        def encode(stale: LabelEmbeddings | None) -> LabelEmbeddings:
            embeddings = stale or LabelEmbeddings(self.table)
            self.parts.encode_label_texts(embeddings)
            return embeddings

        return self.current("label texts", encode)

    def current_neighbour_votes(self) -> NeighbourVotes:
        """The training queries as the encoder embeds them now, with their labels: the kNN votes."""
        return self.current("training queries", lambda _: NeighbourVotes(encode_queries(
            self.engine, self.data.train_tokens, self.cfg.eval.batch_size, self.device, self.progress)[0],
            self.data.train_labels, self.cfg.eval))

    def log(self, values: dict) -> None:
        if values:
            self.metrics_log.log(self.step, values)

    def evaluate_along(self, stage: Stage, epoch: int) -> float:
        """An evaluation during training, logged with the epochs and training seconds so far; its duration."""
        started = time.time()
        self.evaluated_step = self.step
        trained = {"stage": stage.name, "epoch": epoch,
                   "epochs_done": (self.step - self.first_step[stage.name]) / stage.steps_per_epoch,
                   "train_seconds": self.train_seconds()}
        split = self.data.validation or self.data.test  # the test split only when there is no validation split
        results = self.evaluate(split)[MODEL]
        self.log(trained | {f"{split.name}_{k}": v for k, v in results.items()} | {"peak_rss_gib": peak_rss_bytes() / GiB})
        best, since = self.best.get(stage.name, (-1.0, 0))
        better = results["P@1"] > best + self.cfg.eval.min_delta
        self.best[stage.name] = (results["P@1"], 0) if better else (best, since + 1)
        if better and self.best_rows is not None and not stage.trains_encoder:  # the table is all the stage trains
            self.best_rows.take(stage.name, self.step, results["P@1"])
        if better and self.cfg.eval.keep_best and stage.trains_encoder:  # a checkpoint is written after this
            path = self.checkpoints.dir / layout.checkpoint_tag(self.step)
            self.best_checkpoint = {"stage": stage.name, "step": self.step, "path": str(path.resolve())}
        seconds = time.time() - started
        self.eval_seconds += seconds
        return seconds

    def rewind_to_best(self, stage: Stage) -> bool:
        """eval.keep_best, at the end of a stage that trains the encoder (whose copy would not fit beside it, as the
        rows' copy does): the run goes back to the checkpoint written at the stage's best validation evaluation,
        every component as it was then, and the stage counts as stopped early there; the checkpoints written after
        it are deleted. The run then goes on as one whose stage stopped at that step. Whether it went back."""
        best = self.best_checkpoint
        if best is None or best["stage"] != stage.name or best["step"] == self.step:
            return False
        seconds, ended = self.train_seconds(), self.step
        path, meta = self.checkpoints.start_point(best["path"], None)  # verified, as a resume would
        self.checkpoints.load(path, meta)  # this trainer's position too
        self.trained_seconds_before, self.fit_started, self.eval_seconds = seconds, time.time(), 0.0
        self.stopped_early[stage.name] = self.step - self.first_step[stage.name]
        self.best_checkpoint = None
        self.plan_steps()
        self.checkpoints.discard_after(path)
        log.info("%s stage ends with the encoder and rows of step %d (validation P@1 %.4f), not those of step %d",
                 stage.name, self.step, self.best[stage.name][0], ended)
        self.log({"stage": stage.name, "back_to_best_step": self.step, "best_P@1": self.best[stage.name][0]})
        return True

    @property
    def best_checkpoint(self) -> dict | None:
        return self._best_checkpoint

    @best_checkpoint.setter
    def best_checkpoint(self, best: dict | None) -> None:
        """The checkpoint manager keeps the best checkpoint beyond keep_last until the stage ends."""
        self._best_checkpoint = best
        self.checkpoints.pinned = {Path(best["path"])} if best else set()

    def train_seconds(self) -> float:
        """Seconds spent training so far, over this run and the runs it resumes, evaluations left out."""
        return self.trained_seconds_before + time.time() - self.fit_started - self.eval_seconds

    # ---- checkpoints: the trainer's own state is its position ---------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "train_seconds": self.train_seconds(), "stopped_early": self.stopped_early,
                "best": self.best, "best_checkpoint": self.best_checkpoint, "evaluated_step": self.evaluated_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.trained_seconds_before = state["step"], state["train_seconds"]
        self.stopped_early, self.best = state.get("stopped_early", {}), state.get("best", {})
        self.best_checkpoint, self.evaluated_step = state.get("best_checkpoint"), state.get("evaluated_step")
        self.plan_steps()

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, {
            "step": self.step, "stage": self.stage_at(self.step).name, "num_labels": self.table.num_labels,
            "num_train": len(self.data.train_tokens), "dim": self.table.dim, "data": self.data_fingerprint,
            "config": self.cfg.with_absolute_paths().to_dict()})

    def close(self) -> None:
        """The DeepSpeed engine lets go of its hooks (through which DeepSpeed would keep it, its weights and optimizer
        state alive); the trainer cannot train after this."""
        self.engine.destroy()

    def stage_at(self, step: int) -> Stage:
        """The stage of step `step` (1-based: the step just done)."""
        return [s for s in self.stages if self.first_step[s.name] < max(step, 1)][-1]

    # ---- results ----------------------------------------------------------------------------------------------

    def save_model(self) -> None:
        """The final encoder weights and classifier table (each rank writes its rows), the files `astra-ds eval`
        and `predict` read besides; the manifest last, which makes the directory a finished run."""
        try:
            self._save_model()
        except (OSError, RuntimeError) as err:
            if disk_full(err, self.run_dir):
                raise UserError(f"the disk is full: saving the model into {self.run_dir} failed "
                                f"({shutil.disk_usage(self.run_dir).free} bytes free); its last checkpoint is intact: "
                                "make room, then `astra-ds train --resume auto` saves it") from None
            raise

    def _save_model(self) -> None:
        state = encoder_state_dict(self.engine)
        if self.dist.is_main:
            torch.save(state, self.run_dir / layout.ENCODER_WEIGHTS)
            self.table.create_store(self.run_dir / layout.TABLE)
        barrier()
        self.table.save(self.run_dir / layout.TABLE, progress=self.progress)  # a copy: independent of the checkpoints
        barrier()
        if self.cfg.eval.label_text_weight > 0:
            self.current_label_embeddings().save(self.run_dir / layout.LABEL_EMBEDDINGS)
        if self.cfg.eval.neighbour_weight > 0:
            votes = self.current_neighbour_votes()  # collective: every rank encodes a part of the training queries
            if self.dist.is_main:
                votes.save(self.run_dir / layout.NEIGHBOURS)
        if self.dist.is_main:  # what predicting needs: the score formula, label names, the serving index
            write_model_files(self.run_dir, self.cfg, self.table.num_labels, self.table.dim, self.step,
                              state["calibration"], self.data.dataset.label_texts)
            write_run_manifest(self.run_dir)
        barrier()

    def choose_scoring(self) -> None:
        """The scoring weights chosen on the validation split, in turn: the dual-scoring weight among
        eval.label_text_weights, then the kNN votes' among eval.neighbour_weights; the chosen ones go to the test
        evaluation, the saved model and the run's config.yaml."""
        chosen = [self.choose_weight(name) for name in ("label_text_weight", "neighbour_weight")]
        if any(chosen) and self.dist.is_main:
            write_atomically(self.run_dir / layout.CONFIG, self.cfg.with_absolute_paths().to_yaml())

    def choose_weight(self, name: str) -> bool:
        """eval.<name>s given: the weight with the best validation P@1 (the first of equals) becomes eval.<name>."""
        weights = getattr(self.cfg.eval, name + "s")
        if not weights:
            return False
        p1 = {}
        for weight in weights:
            setattr(self.cfg.eval, name, weight)
            p1[weight] = self.evaluate(self.data.validation)[MODEL]["P@1"]
        chosen = max(weights, key=lambda weight: (p1[weight], -weights.index(weight)))
        setattr(self.cfg.eval, name, chosen)
        self.log({name: chosen, f"validation_P@1_by_{name}": list(p1.items())})
        log.info("eval.%s=%g chosen on the validation split (P@1 %s)", name, chosen,
                 ", ".join(f"{w:g}: {v:.4f}" for w, v in p1.items()))
        return True

    def evaluate(self, split: EvalSplit | None = None) -> dict:
        """Metrics of the model as it is now on `split`: the test split by default, whose metrics.json and
        predictions.npz go into the run directory, or the validation split (nothing written)."""
        split = split or self.data.test
        label_embeddings = self.current_label_embeddings() if self.cfg.eval.label_text_weight > 0 else None
        votes = self.current_neighbour_votes() if self.cfg.eval.neighbour_weight > 0 else None
        queries, calibration = self.current(split.name, lambda _: encode_queries(
            self.engine, split.tokens, self.cfg.eval.batch_size, self.device, self.progress))
        topk = exact_topk_all_ranks(queries, self.table, self.cfg.eval, self.cfg.table.normalize_rows,
                                    search_k(self.cfg.eval, split.filter), label_embeddings, votes, self.progress)
        about = {"step": self.step, "dataset": str(Path(self.cfg.data.path).resolve()), "split": split.name,
                 "topk": "exact"}
        results = evaluate({MODEL: topk}, calibration, split.labels, self.data.dataset.train.labels, self.cfg.eval,
                           self.table.num_labels, self.run_dir, about, split.filter,
                           write=self.dist.is_main and split.name == TEST)
        if self.dist.is_main:
            header = "" if split.name == TEST else f"{split.name} split, step {self.step}:\n"
            print(header + format_table(results, self.cfg.eval.ks), flush=True)
        return results
