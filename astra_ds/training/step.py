"""The classifier half of a training step, for the trainer and tools/bench_scaling.py.

Given the batch's query embeddings (every rank holds all of them) and its negatives: build the (query, label)
pairs, keep those whose label this rank owns, fetch their rows from the host table to the device, score them and
return this rank's part of the loss (`classifier.loss`, mean over the batch's queries). After backward, the rows'
gradients are in `block.weights.grad`, for `ClassifierTable.apply_gradients`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from astra_ds.negatives.base import Negatives
from astra_ds.negatives.in_batch import batch_labels
from astra_ds.table.table import ClassifierTable, RowBlock
from astra_ds.choices import LOSSES
from astra_ds.training.loss import in_batch_scores, make_pairs, pair_scores


@dataclass
class ClassifierPart:
    loss: torch.Tensor  # this rank's part of the batch loss
    block: RowBlock  # the rows it scored (a leaf: the gradients land in block.weights.grad)


def classifier_loss(table: ClassifierTable, queries: torch.Tensor, calibration: torch.Tensor,
                    positives: sp.csr_matrix, negatives: Negatives, importance_weights: bool = True,
                    in_batch: bool = False, normalize_rows: bool = True, loss: str = "bce") -> ClassifierPart:
    """`in_batch` (NGAME): the batch's labels are scored densely against every query and summed exactly; sampled
    negatives inside them are dropped (astra_ds/negatives/in_batch.py)."""
    labels = batch_labels(positives) if in_batch else None
    pairs = make_pairs(positives, negatives, importance_weights, labels)
    pairs = pairs.owned(table.start, table.end).to(queries.device)
    labels = labels.owned(table.start, table.end) if labels is not None else None

    in_batch_ids = torch.from_numpy(labels.global_ids if labels is not None else np.zeros(0, np.int64))
    block, slots = table.fetch(torch.cat([pairs.label.cpu(), in_batch_ids]))
    pair_slots, in_batch_slots = slots[:len(pairs.label)], slots[len(pairs.label):]
    scores = pair_scores(queries, calibration, block.weights, pair_slots, pairs.query, normalize_rows)
    dense_scores = dense_targets = None
    if labels is not None:
        dense_scores = in_batch_scores(queries, calibration, block.weights[in_batch_slots], normalize_rows)
        dense_targets = torch.from_numpy(labels.targets).to(queries.device)
    value = LOSSES.get(loss)(scores, pairs, len(queries), dense_scores, dense_targets)
    return ClassifierPart(value, block)
