"""Label texts embedded by the encoder: classifier rows initialised from them (NGAME / DEXML style) and the
label-text embeddings of dual scoring.

Label texts are encoded a batch at a time and each batch is written straight into this rank's rows: beyond the
rows themselves, memory holds one batch of embeddings, never an L x d copy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from astra_ds.collectives import barrier
from astra_ds.data.queries import Texts
from astra_ds.progress import progress as progress_of
from astra_ds.scoring.rows import evaluating
from astra_ds.table import store
from astra_ds.table.table import ClassifierTable


class ShardRows(Protocol):
    """This rank's rows [start, end) of an L x d table split by `geometry` (a ClassifierTable, LabelEmbeddings)."""

    start: int
    end: int
    geometry: store.ShardGeometry
    device: torch.device

    def block_rows(self, start: int, end: int) -> torch.Tensor: ...


def encode_label_texts(target: ShardRows, label_tokens: Texts, model: torch.nn.Module, batch_size: int,
                       progress: bool = True) -> None:
    """Row l <- model's embedding of label text l (a unit vector) for the rows of this rank's shard of `target`,
    `model` (the encoder or its DeepSpeed engine) in eval mode.

    Unit rows are longer than random ones (init_std * sqrt(d)): with normalised scoring a row-wise step turns a
    row by about lr / ||w||, so they keep more of the label text (rows scaled to the random norm did worse:
    docs/ablations.md).
    """
    # Every rank runs as many forward passes as the largest shard needs (ZeRO-3 gathers parameters in each
    # forward, collectively); a rank whose shard is done encodes a dummy batch.
    batches = math.ceil(target.geometry.largest_shard / batch_size)
    with evaluating(model):
        for batch in progress_of(range(batches), "encode label texts", progress, "batch"):
            start = target.start + batch * batch_size
            end = min(start + batch_size, target.end)
            input_ids, attention_mask = label_tokens.batch(np.arange(start, end) if start < end else np.arange(1))
            embeddings, _ = model(input_ids.to(target.device), attention_mask.to(target.device))
            if start < end:
                target.block_rows(start, end).copy_(embeddings.float().cpu())


class LabelEmbeddings:
    """e_l, the encoder's embedding of label l's text, for this rank's rows (split like the table's), on the
    host; saved as a zarr array beside the table for dual scoring."""

    def __init__(self, table: ClassifierTable):
        self.num_labels, self.dim, self.device = table.num_labels, table.dim, table.device
        self.geometry, self.start, self.end, self.rank = table.geometry, table.start, table.end, table.rank
        self.rows = torch.zeros((self.end - self.start, self.dim))

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return self.rows[start - self.start:end - self.start]

    def save(self, path: Path) -> None:
        """Every rank writes its rows (collective)."""
        if self.rank == 0:
            store.create(path, self.num_labels, self.geometry.chunk_rows, {"rows": ((self.dim,), np.dtype(np.float32))},
                         {"dim": self.dim})
        barrier()
        store.open_table(path, mode="r+")["rows"][self.start:self.end] = self.rows.numpy()
        barrier()

    def load(self, path: Path) -> None:
        self.rows.copy_(torch.from_numpy(np.asarray(store.open_table(path)["rows"][self.start:self.end])))
