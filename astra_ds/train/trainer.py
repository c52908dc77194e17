"""The trainer: the order of a training step and of the training loop. The parts come from astra_ds/build.py.

One step (global batch of B queries, W ranks, each owning a contiguous block of the table's rows):
  1. each rank encodes its B / W queries with the DeepSpeed engine; all-gather -> q (B, d), calibration
  2. the negative sampler draws m negatives per query (the same draws on every rank)
  3. the classifier half (train/step.py): pairs of labels this rank owns, their rows fetched from host memory,
     scored -> this rank's part of the sampled BCE
  4. backward through rows, the all-gather and the encoder; DeepSpeed steps the encoder
  5. the sampler and the batch sampler observe the queries; after the last micro-batch, each rank updates its rows
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from astra_ds import layout
from astra_ds.build import build_training
from astra_ds.collectives import barrier, gather_rows, scale_grad, sum_across_ranks
from astra_ds.config import RunConfig, summary
from astra_ds.dist import init_distributed
from astra_ds.eval.evaluate import MODEL, evaluate
from astra_ds.eval.metrics import format_table
from astra_ds.rng import GlobalRngState, Stream, numpy_rng
from astra_ds.train.batching import BatchSampler
from astra_ds.train.checkpoint import CheckpointManager, check_checkpoint
from astra_ds.train.engine import EngineCheckpoint, encoder_state_dict
from astra_ds.train.metrics_log import MetricsLog
from astra_ds.train.step import classifier_loss

log = logging.getLogger("astra_ds")


class Trainer:
    def __init__(self, cfg: RunConfig, progress: bool = True, resume: str | None = None, init_from: str | None = None):
        """`resume`: "auto" (the latest checkpoint of this run, if any) or a checkpoint directory, continued with
        its full state; `init_from`: a checkpoint whose weights (encoder, classifier rows) start a fresh run."""
        self.cfg = cfg
        self.dist = init_distributed(cfg.train.collective_timeout_s)
        self.device = self.dist.device
        # progress bars on a terminal; elsewhere (CI, nohup) a readable log line every log_every steps
        self.progress = progress and self.dist.is_main and sys.stderr.isatty()
        self.run_dir = Path(cfg.out_dir)
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.out_dir, self.dist.rank, self.dist.world_size)
        resume_path = self.checkpoints.resolve(resume) if resume else None
        if resume == "auto" and resume_path is None:
            log.info("no checkpoint in %s yet: starting from scratch", self.checkpoints.dir)
        start_path = resume_path or (Path(init_from) if init_from else None)
        start = (start_path, check_checkpoint(start_path)) if start_path else None
        if self.dist.is_main:
            log.info("config:\n%s", summary(cfg))
            if not resume_path and (self.run_dir / layout.CONFIG).exists():
                log.warning("out_dir %s holds an earlier run: its files are overwritten", self.run_dir)

        parts = build_training(cfg, self.dist, start, fresh_rows=start is None, progress=self.progress)
        self.data, self.engine, self.table = parts.data, parts.engine, parts.table
        self.sampler, self.batches, self.memory_plan = parts.sampler, parts.batches, parts.memory_plan
        self.encode_train = lambda rows: parts.encode_train(rows, cfg.eval.batch_size, self.progress)
        self.train_labels = self.data.dataset.train.labels
        self.steps_per_epoch = self.batches.steps_per_epoch
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        self.step = 0
        self.trained_seconds_before = 0.0  # training time of the runs this one resumes (evaluations left out)
        self.fit_started, self.eval_seconds = time.time(), 0.0

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            cfg.save(self.run_dir / layout.CONFIG)
            (self.run_dir / layout.DS_CONFIG).write_text(json.dumps(parts.ds_config, indent=2))
        self.metrics_log = MetricsLog(self.run_dir, self.dist.is_main, start[1]["step"] if resume_path else None)
        for name, component in (("encoder", EngineCheckpoint(self.engine)), (layout.TABLE, self.table),
                                ("negatives", self.sampler), ("batches", self.batches), ("trainer", self)):
            self.checkpoints.register(name, component)
        self.checkpoints.register("rng", GlobalRngState(), per_rank=True)
        if resume_path:
            self.checkpoints.load(*start)
            log.info("resumed from %s (step %d, epoch %d)", resume_path, self.step, start[1]["epoch"])
        elif init_from:
            self.checkpoints.load_weights(start_path)
            log.info("encoder and classifier rows initialised from %s", start_path)
        d = self.data.dataset
        log.info("data %s: %d train / %d test queries, %d labels | encoder %s (d=%d) | DeepSpeed %s, ZeRO-%d | "
                 "%d ranks | %d steps of %d queries", d.name, len(d.train.texts), len(d.test.texts), d.num_labels,
                 cfg.encoder.model, self.table.dim, parts.ds_path.name, self.engine.zero_optimization_stage(),
                 self.dist.world_size, self.total_steps, cfg.train.batch_size)

    # ---- one step ---------------------------------------------------------------------------------------------

    def train_step(self, batch_rows: np.ndarray) -> dict:
        """One optimizer step on a global batch; every rank draws the same negatives for the whole batch (from
        the step's random stream), scores all queries against the labels it owns, and updates its rows."""
        cfg, neg, ranks = self.cfg, self.cfg.negatives, self.dist.world_size
        rng = numpy_rng(cfg.train.seed, Stream.NEGATIVES, self.step)
        blocks, totals = [], np.zeros(2)  # loss, rows fetched
        for micro in np.array_split(batch_rows, cfg.train.grad_accum):
            mine = BatchSampler.rank_part(micro, self.dist.rank, ranks)
            input_ids, attention_mask = self.data.train_tokens.batch(mine)
            local_queries, calibration = self.engine(input_ids.to(self.device), attention_mask.to(self.device))
            queries = gather_rows(local_queries, grad_scale=ranks)  # (len(micro), d) on every rank
            calibration = scale_grad(calibration, ranks)

            positives = self.train_labels[micro]
            negatives = self.sampler.sample(micro, queries, positives, rng)
            part = classifier_loss(self.table, queries, calibration, positives, negatives, neg.importance_weights,
                                   neg.in_batch, cfg.table.normalize_rows)
            loss = part.loss
            if ranks > 1:  # keep the gather in the graph even if this rank owns no label of the batch
                loss = loss + 0.0 * queries.sum()

            self.engine.backward(loss)  # DeepSpeed divides by grad_accum: the sum over micro-batches is the mean
            self.engine.step()  # steps the encoder at the accumulation boundary only
            host_queries = queries.detach().float().cpu()
            self.sampler.observe(micro, host_queries)
            self.batches.observe(micro, host_queries)
            blocks.append(part.block)
            totals += [loss.item(), len(part.block.global_ids)]
        self.table.apply_gradients(blocks)
        self.step += 1
        loss_sum, rows_fetched = sum_across_ranks(totals.tolist())
        log_scale, bias = calibration.detach().tolist()
        return {"loss": loss_sum / cfg.train.grad_accum, "rows": int(rows_fetched), "scale": math.exp(log_scale),
                "bias": bias}

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.cfg
        self.engine.train()
        every = cfg.eval.every_epochs * self.steps_per_epoch  # steps, maybe fractional: epoch ends stay on the grid
        eval_steps = {round(k * every) for k in range(1, int(self.total_steps / every) + 1)} if every else set()
        self.fit_started, self.eval_seconds = time.time(), 0.0
        window, window_start = [], time.time()
        if every and self.step == 0:
            self.evaluate_along(epoch=0)  # where the curve starts: the initial rows (random or label-text)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress)
        for epoch in range(self.step // self.steps_per_epoch, cfg.train.epochs):
            first_position = self.step - epoch * self.steps_per_epoch  # > 0 when resumed within the epoch
            if first_position == 0 and self.step < self.total_steps:
                self.log(self.batches.on_epoch_start(epoch, self.encode_train))  # NGAME clusters
                self.log(self.sampler.on_epoch_start(epoch))  # ASTRA's index
            order = self.batches.epoch_batches(epoch)
            for position in range(first_position, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                stats = self.train_step(order[position])
                if cfg.train.record_batches:  # as step n (1-based), like the loss of the step
                    self.log({"batch": order[position].tolist()})
                window.append(stats["loss"])
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4g}")
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.time() - window_start
                    values = {"epoch": epoch, "epochs_done": self.step / self.steps_per_epoch,
                              "loss": float(np.mean(window)), "scale": stats["scale"], "bias": stats["bias"],
                              "rows_per_step": stats["rows"], "steps_per_s": len(window) / elapsed,
                              "queries_per_s": len(window) * cfg.train.batch_size / elapsed,
                              "train_seconds": self.train_seconds()}
                    self.log(values)
                    if not self.progress:
                        log.info("step %d/%d | epoch %d | loss %.4g | %.1f queries/s", self.step, self.total_steps,
                                 epoch, values["loss"], values["queries_per_s"])
                    window, window_start = [], time.time()
                if self.checkpoints.due(self.step):
                    self.save_checkpoint()
                if self.step in eval_steps and self.step < self.total_steps:
                    window_start += self.evaluate_along(epoch)  # throughput figures leave evaluations out
        bar.close()
        previous = self.checkpoints.previous
        if previous is None or layout.step_of(previous.name) != self.step:
            self.save_checkpoint()  # the end of the run
        self.metrics_log.close()

    def log(self, values: dict) -> None:
        if values:
            self.metrics_log.log(self.step, values)

    def evaluate_along(self, epoch: int) -> float:
        """An evaluation during training, logged with the epochs and training seconds so far; its duration."""
        started = time.time()
        trained = {"epoch": epoch, "epochs_done": self.step / self.steps_per_epoch,
                   "train_seconds": self.train_seconds()}
        results = self.evaluate()[MODEL]
        self.log(trained | {f"test_{k}": v for k, v in results.items()})
        seconds = time.time() - started
        self.eval_seconds += seconds
        return seconds

    def train_seconds(self) -> float:
        """Seconds spent training so far, over this run and the runs it resumes, evaluations left out."""
        return self.trained_seconds_before + time.time() - self.fit_started - self.eval_seconds

    # ---- checkpoints: the trainer's own state is its position ---------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "train_seconds": self.train_seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.trained_seconds_before = state["step"], state["train_seconds"]

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, {
            "step": self.step, "epoch": self.step // self.steps_per_epoch, "num_labels": self.table.num_labels,
            "num_train": len(self.data.train_tokens), "dim": self.table.dim})

    # ---- results ----------------------------------------------------------------------------------------------

    def save_model(self) -> None:
        """The final encoder weights and classifier table (each rank writes its rows), for `astra-ds eval`."""
        state = encoder_state_dict(self.engine)
        if self.dist.is_main:
            torch.save(state, self.run_dir / layout.ENCODER_WEIGHTS)
            self.table.create_store(self.run_dir / layout.TABLE)
        barrier()
        previous = self.checkpoints.previous  # written at the end of `fit`: its table is this one, linked not copied
        self.table.save(self.run_dir / layout.TABLE, previous / layout.TABLE if previous else None, progress=self.progress)
        barrier()

    def evaluate(self) -> dict:
        self.engine.eval()
        results = evaluate(lambda ids, mask: self.engine(ids, mask), self.table, self.data.test_tokens,
                           self.data.dataset.test.labels, self.train_labels, self.cfg.eval,
                           self.cfg.table.normalize_rows, self.run_dir, progress=self.progress)
        self.engine.train()
        if self.dist.is_main:
            print(format_table(results, self.cfg.eval.ks), flush=True)
        return results
