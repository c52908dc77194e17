"""The stages of a run (registry STAGES in astra_ds/choices.py, in the order they run); each owns its batches and
its step, the trainer runs them.

    siamese     (siamese.epochs)     the encoder alone: queries against their labels' texts, in-batch softmax
    classifier  (classifier.epochs)  the rows alone, on the frozen encoder's query embeddings (computed once)
    joint       (train.epochs)       encoder and rows together: the sampled BCE through both
    refit       (classifier.refit_epochs)  the classifier stage again, on the final encoder

A stage with 0 epochs is left out. Steps are numbered across stages: the trainer's step says which stage a
resumed run is in. A stage is known by its name (checkpoint keys, logs) and draws its batches from its own random
stream, a number fixed for the name: adding or leaving out a stage changes no other stage's batches. The query
embeddings a stage trains on (`train_queries`: encoded by the current encoder, or the frozen ones) are what the
negative sampler and the NGAME batches get when they need the training queries.

A new stage is one subclass of Stage here and one entry in STAGES.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from astra_ds.choices import BATCHING
from astra_ds.collectives import gather_rows, padded_part, scale_grad, sum_across_ranks
from astra_ds.config import RunConfig
from astra_ds.data.queries import RowsOf
from astra_ds.rng import Stream, numpy_rng, torch_generator
from astra_ds.scoring.rows import encode_queries
from astra_ds.training.batching import RandomBatches
from astra_ds.training.build import Training, stage_classes
from astra_ds.training.loss import siamese_softmax
from astra_ds.training.step import classifier_loss


class Stage:
    name = ""  # its entry in STAGES
    stream = -1  # its random streams' counter (batch order, clusters): fixed for the name, never reused
    trains_encoder = trains_table = False
    uses_label_texts = False  # its steps encode label texts (the data must have them)

    @staticmethod
    def schedule(cfg: RunConfig) -> tuple[int, int]:
        """(epochs, batch size) from the config; 0 epochs leave the stage out."""
        raise NotImplementedError

    def __init__(self, parts: Training):
        self.parts, self.cfg, self.dist = parts, parts.cfg, parts.dist
        self.epochs, batch_size = self.schedule(parts.cfg)
        self.batches: RandomBatches = BATCHING.get(parts.cfg.batching.mode)(
            parts.cfg.batching, len(parts.data.train), batch_size, parts.cfg.train.seed, parts.table.dim,
            self.stream, parts.data.train.lengths_of if self.trains_encoder else None)
        self.steps_per_epoch = self.batches.steps_per_epoch

    def begin(self, resumed: bool) -> None:
        """The stage starts (or a run resumes inside it)."""

    def end(self) -> None:
        """The stage has run its steps: what it held for them goes."""

    def train_queries(self, rows: np.ndarray | None) -> torch.Tensor:
        """Embeddings (host) of the training queries at `rows` (None: all), as this stage trains on them: by the
        encoder as it is now."""
        return self._encode_train(rows)[0]

    def _encode_train(self, rows: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training queries at `rows` (None: all) through the encoder as it is now: embeddings, calibration."""
        parts = self.parts
        queries = parts.data.train if rows is None else RowsOf(parts.data.train, rows)
        return encode_queries(parts.engine, queries, self.cfg.eval.batch_size, self.dist.device, parts.progress)

    def on_epoch_start(self, epoch: int) -> dict:
        """NGAME clusters for this epoch's batches, when due; values for the training log."""
        return self.batches.on_epoch_start(epoch, self.train_queries)

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        raise NotImplementedError

    def _encode_batch(self, micro: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank encodes its part of the micro-batch; every rank gets all its embeddings (B, d), and the
        calibration, with gradients that flow back to the rank that encoded them."""
        parts, ranks = self.parts, self.dist.world_size
        mine = RandomBatches.rank_part(micro, self.dist.rank, ranks)
        input_ids, attention_mask = parts.data.train.batch(mine)
        local_queries, calibration = parts.engine(input_ids.to(self.dist.device), attention_mask.to(self.dist.device))
        return gather_rows(local_queries, grad_scale=ranks), scale_grad(calibration, ranks)


class SiameseStage(Stage):
    name, stream, trains_encoder, uses_label_texts = "siamese", 0, True, True

    @staticmethod
    def schedule(cfg: RunConfig) -> tuple[int, int]:
        return cfg.siamese.epochs, cfg.train.batch_size

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        """Queries and the texts of the batch's labels through the encoder, the in-batch softmax both ways. Every
        rank encodes its part of each and computes the whole loss, divided by the number of ranks (the gathers'
        backward sums the ranks' gradients)."""
        parts, ranks, device = self.parts, self.dist.world_size, self.dist.device
        losses = []
        for micro in np.array_split(batch_rows, self.cfg.train.grad_accum):
            queries, _ = self._encode_batch(micro)
            positives = parts.data.train.labels(micro)
            labels = np.unique(positives.indices)
            input_ids, attention_mask = parts.data.label_tokens.batch(labels[padded_part(len(labels))])
            local_labels, _ = parts.engine(input_ids.to(device), attention_mask.to(device))
            label_embeddings = gather_rows(local_labels, grad_scale=ranks)[:len(labels)]
            targets = torch.zeros((len(micro), len(labels)), device=device)
            query_rows = np.repeat(np.arange(len(micro)), np.diff(positives.indptr))
            targets[query_rows, np.searchsorted(labels, positives.indices)] = 1.0
            loss = siamese_softmax(queries, label_embeddings, targets, self.cfg.siamese.scale) / ranks
            parts.engine.backward(loss)
            parts.engine.step()
            self.batches.observe(micro, queries.detach().float().cpu())
            losses.append(loss.item())
        return {"loss": sum_across_ranks([sum(losses)])[0] / self.cfg.train.grad_accum}


class ClassifierStage(Stage):
    name, stream, trains_table = "classifier", 1, True

    @staticmethod
    def schedule(cfg: RunConfig) -> tuple[int, int]:
        return cfg.classifier.epochs, cfg.classifier.batch_size

    def begin(self, resumed: bool) -> None:
        """The frozen encoder's embeddings of every training query, computed once (again when resumed: the
        same values) and kept on the host."""
        self.queries, self.calibration = self._encode_train(None)

    def end(self) -> None:
        del self.queries, self.calibration

    def train_queries(self, rows: np.ndarray | None) -> torch.Tensor:
        """The frozen embeddings: the encoder does not move in this stage."""
        return self.queries if rows is None else self.queries[rows]

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        """The classifier half on the cached embeddings, then the rows' update; the encoder does not move."""
        cfg, parts = self.cfg, self.parts
        rng = numpy_rng(cfg.train.seed, Stream.NEGATIVES, step)
        queries = self.queries[batch_rows].to(self.dist.device)
        calibration = self.calibration.to(self.dist.device)
        positives = parts.data.train.labels(batch_rows)
        negatives = parts.sampler.sample(batch_rows, queries, positives, rng)
        part = classifier_loss(parts.table, self._dropout(queries, step), calibration, positives, negatives,
                               cfg.negatives.importance_weights, cfg.negatives.in_batch, cfg.table.normalize_rows,
                               cfg.classifier.loss)
        part.loss.backward()
        parts.table.apply_gradients([part.block])
        parts.sampler.observe(batch_rows, queries.cpu())
        self.batches.observe(batch_rows, queries.cpu())
        loss, rows = sum_across_ranks([part.loss.item(), len(part.block.global_ids)])
        return {"loss": loss, "rows": int(rows)}

    def _dropout(self, queries: torch.Tensor, step: int) -> torch.Tensor:
        """classifier.embedding_dropout on the embeddings the rows train on (the negatives are sampled with the
        whole ones); the mask is a function of (seed, step), as the negatives are."""
        p = self.cfg.classifier.embedding_dropout
        if p == 0:
            return queries
        generator = torch_generator(self.cfg.train.seed, Stream.EMBEDDING_DROPOUT, step)
        keep = torch.rand(queries.shape, generator=generator) >= p
        return queries * keep.to(queries.device) / (1 - p)


class JointStage(Stage):
    name, stream, trains_encoder, trains_table = "joint", 2, True, True

    @staticmethod
    def schedule(cfg: RunConfig) -> tuple[int, int]:
        return cfg.train.epochs, cfg.train.batch_size

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        """One optimizer step on a global batch; every rank draws the same negatives for the whole batch (from
        the step's random stream), scores all queries against the labels it owns, and updates its rows."""
        cfg, neg, parts, ranks = self.cfg, self.cfg.negatives, self.parts, self.dist.world_size
        rng = numpy_rng(cfg.train.seed, Stream.NEGATIVES, step)
        blocks, totals = [], np.zeros(2)  # loss, rows fetched
        for micro in np.array_split(batch_rows, cfg.train.grad_accum):
            queries, calibration = self._encode_batch(micro)  # (len(micro), d) on every rank
            positives = parts.data.train.labels(micro)
            negatives = parts.sampler.sample(micro, queries, positives, rng)
            part = classifier_loss(parts.table, queries, calibration, positives, negatives, neg.importance_weights,
                                   neg.in_batch, cfg.table.normalize_rows, cfg.classifier.loss)
            loss = part.loss
            if ranks > 1:  # keep the gather in the graph even if this rank owns no label of the batch
                loss = loss + 0.0 * queries.sum()
            parts.engine.backward(loss)  # DeepSpeed divides by grad_accum: the sum over micro-batches is the mean
            parts.engine.step()  # steps the encoder at the accumulation boundary only
            host_queries = queries.detach().float().cpu()
            parts.sampler.observe(micro, host_queries)
            self.batches.observe(micro, host_queries)
            blocks.append(part.block)
            totals += [loss.item(), len(part.block.global_ids)]
        parts.table.apply_gradients(blocks)
        loss_sum, rows_fetched = sum_across_ranks(totals.tolist())
        log_scale, bias = calibration.detach().tolist()
        return {"loss": loss_sum / cfg.train.grad_accum, "rows": int(rows_fetched), "scale": math.exp(log_scale),
                "bias": bias}


class RefitStage(ClassifierStage):
    name, stream = "refit", 3

    @staticmethod
    def schedule(cfg: RunConfig) -> tuple[int, int]:
        return cfg.classifier.refit_epochs, cfg.classifier.batch_size


def build_stages(parts: Training) -> list[Stage]:
    """The stages with epochs, in the order of STAGES."""
    return [cls(parts) for cls in stage_classes(parts.cfg)]
