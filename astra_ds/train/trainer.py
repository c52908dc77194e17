"""The trainer: builds every component and owns the order of a training step.

One step (global batch of B queries, W ranks, each owning a contiguous block of the table's rows):
  1. each rank encodes its B / W queries with the DeepSpeed engine; all-gather -> q (B, d), calibration
  2. sample m negatives per query (uniform, or the ASTRA mixture; the same draws on every rank)
     -> pairs (query, label, target, weight); NGAME: plus the batch's labels, scored densely against every query
  3. keep the pairs whose label this rank owns; fetch their rows from host memory -> rows (U, d) on the device
  4. score the pairs and compute this rank's part of the sampled BCE  -> loss (summed over ranks for the log)
  5. backward through rows, the all-gather and the encoder; DeepSpeed steps the encoder, each rank its rows"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from astra_ds.collectives import gather_rows, global_topk_numpy, min_across_ranks, scale_grad, sum_across_ranks
from astra_ds.config import ConfigError, RunConfig
from astra_ds.data.prepare import prepare_data
from astra_ds.dist import init_distributed
from astra_ds.eval.evaluate import MODEL, evaluate
from astra_ds.eval.metrics import format_table
from astra_ds.eval.predict import encode_queries
from astra_ds.model.encoder import QueryEncoder, build_tokenizer
from astra_ds.model.label_init import init_rows_from_label_texts
from astra_ds.negatives.in_batch import batch_labels
from astra_ds.negatives.index import LabelIndex, import_faiss
from astra_ds.negatives.mixture import sample_mixture
from astra_ds.negatives.uniform import Negatives, sample_uniform
from astra_ds.plan import GiB, MemoryPlan, check_fits, peak_rss_bytes, plan_run, process_bytes
from astra_ds.table.table import ClassifierTable
from astra_ds.train.batching import BatchSampler
from astra_ds.train.checkpoint import (META, CheckpointManager, check_checkpoint, convert_encoder_to_universal,
                                       step_of)
from astra_ds.train.ds_config import resolve_ds_config
from astra_ds.train.loss import in_batch_bce, make_pairs, pair_scores, sampled_bce
from astra_ds.train.metrics_log import MetricsLog

log = logging.getLogger("astra_ds")

ENCODER_FILE, TABLE_DIR = "encoder.pt", "table"
ENCODER_TAG = "encoder"


def encoder_state_dict(engine) -> dict | None:
    """Full encoder weights (on rank 0 under ZeRO-3, where each rank holds a shard)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


class Trainer:
    def __init__(self, cfg: RunConfig, progress: bool = True, resume: str | None = None, init_from: str | None = None):
        """`resume`: "auto" (the latest checkpoint of this run, if any) or a checkpoint directory, continued with
        its full state; `init_from`: a checkpoint whose weights (encoder, classifier rows) start a fresh run."""
        self.cfg = cfg
        self.dist = init_distributed(cfg.train.collective_timeout_s)
        self.device = self.dist.device
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.out_dir, self.dist.is_main)
        resume_path = self.checkpoints.resolve(resume) if resume else None
        resume_meta = check_checkpoint(resume_path) if resume_path else None
        if resume == "auto" and resume_path is None:
            log.info("no checkpoint in %s yet: starting from scratch", self.checkpoints.dir)
        if init_from:
            check_checkpoint(Path(init_from))
        # progress bars on a terminal; elsewhere (CI, nohup) a readable log line every log_every steps
        self.progress = progress and self.dist.is_main and sys.stderr.isatty()
        self.run_dir = Path(cfg.out_dir)
        if self.dist.is_main and (self.run_dir / "config.yaml").exists():
            log.warning("out_dir %s holds an earlier run: its files are overwritten", self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        import deepspeed
        import torch.distributed as dist

        ds_config, ds_path = resolve_ds_config(cfg.train, self.dist.world_size, self.device.type == "cuda")
        if resume_meta and resume_meta["world_size"] != self.dist.world_size:  # re-sliced via a universal checkpoint
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.tokenizer = tokenizer = build_tokenizer(cfg.encoder)
        if self.dist.is_main:  # rank 0 fills the token cache, the others read it
            self.data = prepare_data(cfg.data, tokenizer)
        dist.barrier()
        if not self.dist.is_main:
            self.data = prepare_data(cfg.data, tokenizer)
        self.train_labels = self.data.dataset.train.labels
        self.num_labels = self.data.dataset.num_labels
        unlabelled = int((np.diff(self.train_labels.indptr) == 0).sum())
        if unlabelled:
            log.warning("%d training queries have no labels: they contribute negatives only", unlabelled)
        if len(self.data.train_tokens) < cfg.train.batch_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the "
                              f"{len(self.data.train_tokens)} training queries")
        if cfg.table.init == "label_text" and self.data.dataset.label_texts is None:
            raise ConfigError(f"table.init=label_text: the data at {cfg.data.path} has no label texts "
                              "(Y.txt, or label_names.txt in the pair-file layout)")

        if cfg.negatives.strategy == "astra":
            import_faiss()  # imported now, so that the memory plan measures it with the process
        held_before_model = process_bytes()
        torch.manual_seed(cfg.train.seed)
        encoder = QueryEncoder(cfg.encoder, self.num_labels)
        self.memory_plan = self.plan_memory(encoder, held_before_model)
        self.engine, _, _, _ = deepspeed.initialize(
            model=encoder, model_parameters=[p for p in encoder.parameters() if p.requires_grad], config=ds_config)
        self.table = ClassifierTable(self.num_labels, encoder.dim, cfg.table, self.device,
                                     self.dist.rank, self.dist.world_size)
        if resume_path or init_from:
            pass  # the rows come from the checkpoint
        elif cfg.table.init == "label_text":
            self.init_table_from_label_texts()
        else:
            self.table.init_random(cfg.train.seed)
        self.index = LabelIndex(cfg.index, cfg.table.normalize_rows) if cfg.negatives.strategy == "astra" else None
        self.shortlists: tuple[np.ndarray, np.ndarray] | None = None  # precomputed (ids, scores) per train query
        self.recent_queries: list[torch.Tensor] = []  # for the index's recall check

        self.batches = BatchSampler(cfg.batching, len(self.data.train_tokens), cfg.train.batch_size, cfg.train.seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        # NGAME clusters the embeddings the training steps compute; rows never seen are encoded at clustering time
        self.query_embeddings = self.seen_queries = None
        if cfg.batching.mode == "clustered":
            self.query_embeddings = torch.zeros((len(self.data.train_tokens), encoder.dim), dtype=torch.float16)
            self.seen_queries = np.zeros(len(self.data.train_tokens), bool)
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        self.step = 0
        self.trained_seconds_before = 0.0  # training time of the runs this one resumes (evaluations left out)
        self.fit_started, self.eval_seconds = time.time(), 0.0
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        self.metrics_log = MetricsLog(self.run_dir, self.dist.is_main, resume_meta["step"] if resume_meta else None)
        if resume_path:
            self.load_checkpoint(resume_path, resume_meta)
        elif init_from:
            self.init_from_checkpoint(Path(init_from))
        d = self.data.dataset
        log.info("data %s: %d train / %d test queries, %d labels | encoder %s (d=%d) | DeepSpeed %s, ZeRO-%d | "
                 "%d ranks | %d steps of %d queries", d.name, len(d.train.texts), len(d.test.texts), d.num_labels,
                 cfg.encoder.model, encoder.dim, ds_path.name, self.engine.zero_optimization_stage(),
                 self.dist.world_size, self.total_steps, cfg.train.batch_size)

    def plan_memory(self, encoder: QueryEncoder, held: int) -> MemoryPlan:
        """This rank's memory plan, logged and saved in memory.json; the run stops here if it does not fit."""
        plan = plan_run(self.cfg, self.data, encoder, self.dist.world_size, self.dist.rank,
                        self.device.type == "cuda", held)
        log.info("memory plan of rank %d:\n%s", self.dist.rank, plan.format())
        if self.cfg.train.memory_check:
            check_fits(plan, self.device.type == "cuda")
        return plan

    def report_memory(self) -> dict:
        """Peak resident memory of this process next to the plan's total (memory.json from rank 0)."""
        report = {"plan_host_bytes": self.memory_plan.total("host"), "peak_rss_bytes": peak_rss_bytes(),
                  "plan": [vars(line) for line in self.memory_plan.resident + self.memory_plan.phases]}
        log.info("peak RSS %.2f GiB, plan %.2f GiB", report["peak_rss_bytes"] / GiB, report["plan_host_bytes"] / GiB)
        if self.dist.is_main:
            (self.run_dir / "memory.json").write_text(json.dumps(report, indent=2))
        return report

    # ---- components that follow the model: table init, index, clusters -----------------------------------------

    def encode_train_queries(self, tokens) -> torch.Tensor:
        """Embeddings (N, d) of training queries with the current encoder, on the host."""
        self.engine.eval()
        queries, _ = encode_queries(lambda ids, mask: self.engine(ids, mask), tokens, self.cfg.eval.batch_size,
                                    self.device, progress=self.progress)
        self.engine.train()
        return queries

    def init_table_from_label_texts(self) -> None:
        started = time.time()
        self.engine.eval()
        init_rows_from_label_texts(self.table, self.data.dataset.label_texts, self.tokenizer,
                                   lambda ids, mask: self.engine(ids, mask), self.cfg.data.max_len,
                                   self.cfg.eval.batch_size, self.device, self.dist.world_size, self.progress)
        self.engine.train()
        log.info("classifier rows initialised from label texts in %.1f s", time.time() - started)

    def recluster(self, epoch: int) -> None:
        """NGAME: cluster the training queries' latest embeddings into the batches of the next epochs."""
        import torch.distributed as dist

        started = time.time()
        unseen = np.flatnonzero(~self.seen_queries)  # e.g. the queries of the batches each epoch drops
        if len(unseen):
            self.query_embeddings[unseen] = self.encode_train_queries(self.data.train_tokens.subset(unseen)).half()
            self.seen_queries[unseen] = True
        if self.dist.is_main:
            self.batches.recluster(self.query_embeddings.float().numpy(), epoch)
            order = torch.from_numpy(self.batches.clustered_order)
        else:
            order = torch.empty(len(self.query_embeddings), dtype=torch.int64)
        dist.broadcast(order, src=0)  # every rank batches by rank 0's clusters
        self.batches.clustered_order = order.numpy()
        self.metrics_log.log(self.step, {"recluster_s": time.time() - started, "reclustered_unseen": len(unseen)})

    def hard_negatives_due(self, epoch: int) -> bool:
        """ASTRA: the index is (re)built at epochs W, W + R, W + 2R, ..."""
        neg = self.cfg.negatives
        return self.index is not None and epoch >= neg.warmup_epochs and (epoch - neg.warmup_epochs) % neg.refresh_every == 0

    def refresh_index(self) -> None:
        """Rebuild the index over the current rows (and, in precomputed mode, every query's shortlist)."""
        neg = self.cfg.negatives
        sample = torch.cat(self.recent_queries) if self.recent_queries else None
        if neg.shortlist_mode == "precomputed" or sample is None:
            tokens = self.data.train_tokens
            if neg.shortlist_mode != "precomputed":  # only a sample, for the recall check
                tokens = tokens.subset(np.arange(min(len(tokens), self.cfg.index.recall_queries)))
            queries = self.encode_train_queries(tokens)
            sample = queries[:self.cfg.index.recall_queries] if sample is None else sample
        report = self.index.build(self.table, sample, neg.shortlist_size, seed=self.cfg.train.seed)
        if neg.shortlist_mode == "precomputed":
            scores, ids = self.shortlist(queries)
            self.shortlists = (ids, scores)
        recall = None if report.recall is None else min_across_ranks(report.recall)  # each rank indexes its rows
        self.metrics_log.log(self.step, {"index_version": self.index.version, "index_build_s": report.seconds,
                                         "index_recall": recall})

    def shortlist(self, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global ids) of the K best labels of each query: each rank's index searched, merged."""
        k = self.cfg.negatives.shortlist_size
        return global_topk_numpy(*self.index.search(queries, k), k)

    def sample_negatives(self, micro: np.ndarray, queries: torch.Tensor, positives, rng) -> Negatives:
        neg = self.cfg.negatives
        if self.index is None or self.index.version == 0:
            return sample_uniform(positives, neg.num_negatives, rng)
        if neg.shortlist_mode == "precomputed":
            ids, scores = self.shortlists[0][micro], self.shortlists[1][micro]
        else:
            scores, ids = self.shortlist(queries)
        return sample_mixture(positives, ids, scores, neg.num_negatives, neg.alpha, neg.tau, rng)

    # ---- one step ---------------------------------------------------------------------------------------------

    def train_step(self, batch_rows: np.ndarray) -> dict:
        """One optimizer step on a global batch. Every rank draws the same negatives for the whole batch (from
        a generator seeded by the step), scores all queries against the labels it owns, and updates its rows."""
        cfg, ranks = self.cfg, self.dist.world_size
        rng = np.random.default_rng([cfg.train.seed, 1, self.step])  # negatives of this step
        blocks, totals = [], np.zeros(2)  # loss, rows fetched
        for micro in np.array_split(batch_rows, cfg.train.grad_accum):
            input_ids, attention_mask = self.data.train_tokens.batch(BatchSampler.rank_part(micro, self.dist.rank, ranks))
            local_queries, calibration = self.engine(input_ids.to(self.device), attention_mask.to(self.device))
            queries = gather_rows(local_queries, grad_scale=ranks)  # (len(micro), d) on every rank
            calibration = scale_grad(calibration, ranks)

            positives = self.train_labels[micro]
            negatives = self.sample_negatives(micro, queries, positives, rng)
            in_batch = batch_labels(positives) if cfg.negatives.in_batch else None
            pairs = make_pairs(positives, negatives, cfg.negatives.importance_weights, in_batch)
            pairs = pairs.owned(self.table.start, self.table.end).to(self.device)
            in_batch = in_batch.owned(self.table.start, self.table.end) if in_batch is not None else None

            in_batch_ids = torch.from_numpy(in_batch.global_ids if in_batch is not None else np.zeros(0, np.int64))
            block, slots = self.table.fetch(torch.cat([pairs.label.cpu(), in_batch_ids]))
            pair_slots, in_batch_slots = slots[:len(pairs.label)], slots[len(pairs.label):]
            scores = pair_scores(queries, calibration, block.weights, pair_slots, pairs.query, cfg.table.normalize_rows)
            loss = sampled_bce(scores, pairs, num_queries=len(micro))  # this rank's part of the batch loss
            if in_batch is not None:
                targets = torch.from_numpy(in_batch.targets).to(self.device)
                loss = loss + in_batch_bce(queries, calibration, block.weights[in_batch_slots], targets,
                                           cfg.table.normalize_rows) / len(micro)
            if ranks > 1:  # keep the gather in the graph even if this rank owns no label of the batch
                loss = loss + 0.0 * queries.sum()

            self.engine.backward(loss)  # DeepSpeed divides by grad_accum: the sum over micro-batches is the mean
            self.engine.step()  # steps the encoder at the accumulation boundary only
            blocks.append(block)
            self.remember_queries(micro, queries)
            totals += [loss.item(), len(block.global_ids)]
        self.table.apply_gradients(blocks)
        self.step += 1
        loss_sum, rows_fetched = sum_across_ranks(totals.tolist())
        return {"loss": loss_sum / cfg.train.grad_accum, "rows": int(rows_fetched),
                "scale": float(calibration[0].exp()), "bias": float(calibration[1])}

    def remember_queries(self, micro: np.ndarray, queries: torch.Tensor) -> None:
        """Keep the query embeddings that NGAME's clustering (all queries) and ASTRA's recall check (the latest
        recall_queries) use."""
        if self.query_embeddings is None and self.index is None:
            return
        host = queries.detach().float().cpu()  # one device-to-host copy a step
        if self.query_embeddings is not None:
            self.query_embeddings[micro] = host.half()
            self.seen_queries[micro] = True
        if self.index is None:
            return
        self.recent_queries.append(host)
        while sum(len(q) for q in self.recent_queries) - len(self.recent_queries[0]) >= self.cfg.index.recall_queries:
            self.recent_queries.pop(0)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.cfg
        self.engine.train()
        start_epoch = self.step // self.steps_per_epoch
        every = cfg.eval.every_epochs * self.steps_per_epoch  # steps, maybe fractional: epoch ends stay on the grid
        eval_steps = {round(k * every) for k in range(1, int(self.total_steps / every) + 1)} if every else set()
        self.fit_started, self.eval_seconds = time.time(), 0.0
        window, window_start = [], time.time()
        if every and self.step == 0:
            self.evaluate_along(epoch=0)  # where the curve starts: the initial rows (random or label-text)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress)
        for epoch in range(start_epoch, cfg.train.epochs):
            first_position = self.step - epoch * self.steps_per_epoch  # > 0 when resumed within the epoch
            if first_position == 0 and self.batches.clustering_due(epoch):
                self.recluster(epoch)
            if first_position == 0 and self.hard_negatives_due(epoch):
                self.refresh_index()
            order = self.batches.epoch_batches(epoch)
            for position in range(first_position, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                stats = self.train_step(order[position])
                if cfg.train.record_batches:  # as step n (1-based), like the loss of the step
                    self.metrics_log.log(self.step, {"batch": order[position].tolist()})
                window.append(stats["loss"])
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{stats['loss']:.4g}")
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.time() - window_start
                    values = {"epoch": epoch, "epochs_done": self.step / self.steps_per_epoch,
                              "loss": float(np.mean(window)), "scale": stats["scale"],
                              "bias": stats["bias"], "rows_per_step": stats["rows"],
                              "steps_per_s": len(window) / elapsed,
                              "queries_per_s": len(window) * cfg.train.batch_size / elapsed,
                              "train_seconds": self.train_seconds()}
                    self.metrics_log.log(self.step, values)
                    if not self.progress:
                        log.info("step %d/%d | epoch %d | loss %.4g | %.1f queries/s", self.step, self.total_steps,
                                 epoch, values["loss"], values["queries_per_s"])
                    window, window_start = [], time.time()
                if self.checkpoints.due(self.step):
                    self.save_checkpoint()
                if self.step in eval_steps and self.step < self.total_steps:
                    window_start += self.evaluate_along(epoch)  # throughput figures leave evaluations out
        bar.close()
        if self.checkpoints.previous is None or step_of(self.checkpoints.previous.name) != self.step:
            self.save_checkpoint()  # the end of the run
        self.metrics_log.close()

    def evaluate_along(self, epoch: int) -> float:
        """An evaluation during training, logged with the epochs and training seconds so far; its duration."""
        started = time.time()
        trained = {"epoch": epoch, "epochs_done": self.step / self.steps_per_epoch,
                   "train_seconds": self.train_seconds()}
        results = self.evaluate()[MODEL]
        self.metrics_log.log(self.step, trained | {f"test_{k}": v for k, v in results.items()})
        seconds = time.time() - started
        self.eval_seconds += seconds
        return seconds

    def train_seconds(self) -> float:
        """Seconds spent training so far, over this run and the runs it resumes, evaluations left out."""
        return self.trained_seconds_before + time.time() - self.fit_started - self.eval_seconds

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The trainer state every rank shares (each rank's own part is `rank_state`)."""
        return {"step": self.step, "train_seconds": self.train_seconds(), "batches": self.batches.state_dict(),
                "shortlists": self.shortlists, "recent_queries": self.recent_queries,
                "query_embeddings": self.query_embeddings, "seen_queries": self.seen_queries}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.trained_seconds_before = state.get("train_seconds", 0.0)  # absent from older checkpoints
        self.batches.load_state_dict(state["batches"])
        self.shortlists, self.recent_queries = state["shortlists"], state["recent_queries"]
        self.query_embeddings, self.seen_queries = state["query_embeddings"], state["seen_queries"]

    def rank_state(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "index": self.index.state_dict() if self.index is not None else None}

    def load_rank_state(self, state: dict, index_file: Path) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.index is not None and state["index"] is not None:
            self.index.load_state_dict(state["index"], index_file)

    def save_checkpoint(self) -> Path:
        def write(directory: Path, previous: Path | None) -> None:
            import torch.distributed as dist
            from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO

            self.engine.save_checkpoint(str(directory), tag=ENCODER_TAG, client_state={UNIVERSAL_CHECKPOINT_INFO: {}},
                                        save_latest=False)
            if self.dist.is_main:
                self.table.create_store(directory / TABLE_DIR)
            dist.barrier()
            self.table.save_checkpoint(directory / TABLE_DIR, previous / TABLE_DIR if previous else None)
            torch.save(self.rank_state(), directory / f"rank{self.dist.rank}.pt")
            if self.index is not None and self.index.index is not None:
                self.index.save(directory / f"rank{self.dist.rank}.faiss")
            if self.dist.is_main:
                torch.save(self.state_dict(), directory / "trainer_state.pt")
                meta = {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                        "world_size": self.dist.world_size, "num_labels": self.num_labels,
                        "index_version": self.index.version if self.index is not None else 0}
                (directory / META).write_text(json.dumps(meta, indent=2))

        return self.checkpoints.save(self.step, write)

    def load_checkpoint(self, path: Path, meta: dict) -> None:
        """Continue exactly from `path`; written by another number of ranks, the encoder state goes through a
        universal checkpoint and the index is rebuilt over the re-sliced rows."""
        same_world = meta["world_size"] == self.dist.world_size
        tag = ENCODER_TAG if same_world else convert_encoder_to_universal(path, ENCODER_TAG, self.dist.is_main)
        self.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        self.table.load(path / TABLE_DIR, progress=self.progress)
        self.load_state_dict(torch.load(path / "trainer_state.pt", weights_only=False))
        if same_world:
            self.load_rank_state(torch.load(path / f"rank{self.dist.rank}.pt", weights_only=False),
                                 path / f"rank{self.dist.rank}.faiss")
        elif self.index is not None and meta["index_version"] > 0:
            log.warning("resumed on %d ranks from %d: each rank's index is rebuilt over its new rows",
                        self.dist.world_size, meta["world_size"])
            self.index.version = meta["index_version"] - 1
            self.index.build(self.table, None, self.cfg.negatives.shortlist_size, seed=self.cfg.train.seed)
        self.checkpoints.previous = path
        log.info("resumed from %s (step %d, epoch %d)", path, self.step, meta["epoch"])

    def init_from_checkpoint(self, path: Path) -> None:
        """Weights only: the encoder and classifier rows of `path`, fresh optimizer states, step 0."""
        self.engine.load_checkpoint(str(path), tag=ENCODER_TAG, load_module_only=True, load_optimizer_states=False,
                                    load_lr_scheduler_states=False)
        self.table.load(path / TABLE_DIR, rows_only=True, progress=self.progress)
        log.info("encoder and classifier rows initialised from %s", path)

    # ---- results ----------------------------------------------------------------------------------------------

    def save_model(self) -> None:
        """The final encoder weights and classifier table (each rank writes its rows), for `astra-ds eval`."""
        import torch.distributed as dist

        state = encoder_state_dict(self.engine)
        if self.dist.is_main:
            torch.save(state, self.run_dir / ENCODER_FILE)
            self.table.create_store(self.run_dir / TABLE_DIR)
        dist.barrier()
        previous = self.checkpoints.previous  # written at the end of `fit`: its table is this one, linked not copied
        self.table.save(self.run_dir / TABLE_DIR, previous / TABLE_DIR if previous else None, progress=self.progress)
        dist.barrier()

    def evaluate(self) -> dict:
        self.engine.eval()
        results = evaluate(lambda ids, mask: self.engine(ids, mask), self.table, self.data.test_tokens,
                           self.data.dataset.test.labels, self.train_labels, self.cfg.eval,
                           self.cfg.table.normalize_rows, self.run_dir, progress=self.progress)
        self.engine.train()
        if self.dist.is_main:
            print(format_table(results, self.cfg.eval.ks), flush=True)
        return results
