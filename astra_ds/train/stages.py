"""The stages of a run, in the order they run; each owns its batches and its step, the trainer runs them.

    siamese     (siamese.epochs)     the encoder alone: queries against their labels' texts, in-batch softmax
    classifier  (classifier.epochs)  the rows alone, on the frozen encoder's query embeddings (computed once)
    joint       (train.epochs)       encoder and rows together: the sampled BCE through both
    refit       (classifier.refit_epochs)  the classifier stage again, on the final encoder

A stage with 0 epochs is left out. Steps are numbered across stages: the trainer's step says which stage a
resumed run is in. Every stage draws its batches from its own random stream; the NGAME embedding bank of a
stage's batches is fed by the query embeddings its steps compute (the classifier stage: the frozen ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from astra_ds.build import Training
from astra_ds.collectives import gather_rows, rank, scale_grad, sum_across_ranks, world_size
from astra_ds.config import RunConfig
from astra_ds.eval.predict import encode_queries
from astra_ds.rng import Stream, numpy_rng
from astra_ds.train.batching import BatchSampler
from astra_ds.train.loss import siamese_softmax
from astra_ds.train.step import classifier_loss


@dataclass
class StageContext:
    cfg: RunConfig
    parts: Training
    device: torch.device
    progress: bool


class Stage:
    name = ""
    trains_encoder = trains_table = False

    def __init__(self, ctx: StageContext, index: int, epochs: int, batch_size: int, batching):
        self.ctx, self.cfg, self.epochs = ctx, ctx.cfg, epochs
        parts = ctx.parts
        self.batches = BatchSampler(batching, len(parts.data.train_tokens), batch_size, ctx.cfg.train.seed,
                                    parts.table.dim, stage=index)
        self.steps_per_epoch = self.batches.steps_per_epoch

    def begin(self, resumed: bool) -> None:
        """The stage starts (or a run resumes inside it)."""

    def on_epoch_start(self, epoch: int) -> dict:
        """NGAME clusters for this epoch's batches, when due; values for the training log."""
        encode = lambda rows: self.ctx.parts.encode_train(rows, self.cfg.eval.batch_size, self.ctx.progress)  # noqa: E731
        return self.batches.on_epoch_start(epoch, encode)

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        raise NotImplementedError

    def _encode_batch(self, micro: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank encodes its part of the micro-batch; every rank gets all its embeddings (B, d), and the
        calibration, with gradients that flow back to the rank that encoded them."""
        parts, ranks = self.ctx.parts, world_size()
        mine = BatchSampler.rank_part(micro, rank(), ranks)
        input_ids, attention_mask = parts.data.train_tokens.batch(mine)
        local_queries, calibration = parts.engine(input_ids.to(self.ctx.device), attention_mask.to(self.ctx.device))
        return gather_rows(local_queries, grad_scale=ranks), scale_grad(calibration, ranks)


class SiameseStage(Stage):
    name, trains_encoder = "siamese", True

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        """Queries and the texts of the batch's labels through the encoder, the in-batch softmax both ways. Every
        rank encodes its part of each and computes the whole loss, divided by the number of ranks (the gathers'
        backward sums the ranks' gradients)."""
        parts, ranks = self.ctx.parts, world_size()
        losses = []
        for micro in np.array_split(batch_rows, self.cfg.train.grad_accum):
            queries, _ = self._encode_batch(micro)
            positives = parts.data.dataset.train.labels[micro]
            labels = np.unique(positives.indices)
            per_rank = math.ceil(len(labels) / ranks)  # parts padded to one size (a gather needs equal shapes)
            mine = labels[np.minimum(np.arange(rank() * per_rank, (rank() + 1) * per_rank), len(labels) - 1)]
            input_ids, attention_mask = parts.data.label_tokens.batch(mine)
            local_labels, _ = parts.engine(input_ids.to(self.ctx.device), attention_mask.to(self.ctx.device))
            label_embeddings = gather_rows(local_labels, grad_scale=ranks)[:len(labels)]
            targets = torch.zeros((len(micro), len(labels)), device=self.ctx.device)
            query_rows = np.repeat(np.arange(len(micro)), np.diff(positives.indptr))
            targets[query_rows, np.searchsorted(labels, positives.indices)] = 1.0
            loss = siamese_softmax(queries, label_embeddings, targets, self.cfg.siamese.scale) / ranks
            parts.engine.backward(loss)
            parts.engine.step()
            self.batches.observe(micro, queries.detach().float().cpu())
            losses.append(loss.item())
        return {"loss": sum_across_ranks([sum(losses)])[0] / self.cfg.train.grad_accum}


class ClassifierStage(Stage):
    name, trains_table = "classifier", True

    def begin(self, resumed: bool) -> None:
        """The frozen encoder's embeddings of every training query, computed once (again when resumed: the
        same values) and kept on the host."""
        parts = self.ctx.parts
        parts.engine.eval()
        self.queries, self.calibration = encode_queries(lambda ids, mask: parts.engine(ids, mask),
                                                        parts.data.train_tokens, self.cfg.eval.batch_size,
                                                        self.ctx.device, self.ctx.progress)
        parts.engine.train()
        parts.frozen_queries = self.queries  # what the sampler and the clustering get for "encode these queries"

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        """The classifier half on the cached embeddings, then the rows' update; the encoder does not move."""
        cfg, parts = self.cfg, self.ctx.parts
        rng = numpy_rng(cfg.train.seed, Stream.NEGATIVES, step)
        queries = self.queries[batch_rows].to(self.ctx.device)
        calibration = self.calibration.to(self.ctx.device)
        positives = parts.data.dataset.train.labels[batch_rows]
        negatives = parts.sampler.sample(batch_rows, queries, positives, rng)
        part = classifier_loss(parts.table, queries, calibration, positives, negatives,
                               cfg.negatives.importance_weights, cfg.negatives.in_batch, cfg.table.normalize_rows)
        part.loss.backward()
        parts.table.apply_gradients([part.block])
        parts.sampler.observe(batch_rows, queries.cpu())
        self.batches.observe(batch_rows, queries.cpu())
        loss, rows = sum_across_ranks([part.loss.item(), len(part.block.global_ids)])
        return {"loss": loss, "rows": int(rows)}


class JointStage(Stage):
    name, trains_encoder, trains_table = "joint", True, True

    def begin(self, resumed: bool) -> None:
        self.ctx.parts.frozen_queries = None  # the encoder moves again

    def step(self, batch_rows: np.ndarray, step: int) -> dict:
        """One optimizer step on a global batch; every rank draws the same negatives for the whole batch (from
        the step's random stream), scores all queries against the labels it owns, and updates its rows."""
        cfg, neg, parts, ranks = self.cfg, self.cfg.negatives, self.ctx.parts, world_size()
        rng = numpy_rng(cfg.train.seed, Stream.NEGATIVES, step)
        blocks, totals = [], np.zeros(2)  # loss, rows fetched
        for micro in np.array_split(batch_rows, cfg.train.grad_accum):
            queries, calibration = self._encode_batch(micro)  # (len(micro), d) on every rank
            positives = parts.data.dataset.train.labels[micro]
            negatives = parts.sampler.sample(micro, queries, positives, rng)
            part = classifier_loss(parts.table, queries, calibration, positives, negatives, neg.importance_weights,
                                   neg.in_batch, cfg.table.normalize_rows)
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
    name = "refit"


def build_stages(ctx: StageContext) -> list[Stage]:
    """The stages with epochs, in order."""
    cfg = ctx.cfg
    stages = [SiameseStage(ctx, 0, cfg.siamese.epochs, cfg.train.batch_size, cfg.batching),
              ClassifierStage(ctx, 1, cfg.classifier.epochs, cfg.classifier.batch_size, cfg.batching),
              JointStage(ctx, 2, cfg.train.epochs, cfg.train.batch_size, cfg.batching),
              RefitStage(ctx, 3, cfg.classifier.refit_epochs, cfg.classifier.batch_size, cfg.batching)]
    return [stage for stage in stages if stage.epochs > 0]
