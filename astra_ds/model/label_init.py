"""Classifier rows initialised from the encoder's embeddings of the label texts (NGAME / DEXML style).

Label texts are tokenised and encoded a batch at a time and each batch is written straight into this rank's
rows of the table: beyond the table itself, memory holds one batch of embeddings, never an L x d copy.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm import tqdm

from astra_ds.table.table import ClassifierTable


@torch.no_grad()
def init_rows_from_label_texts(table: ClassifierTable, label_texts: list[str], tokenizer,
                               encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                               max_len: int, batch_size: int, progress: bool = True) -> None:
    """Row l <- encode(label_texts[l]) (a unit vector) for the rows of this rank's shard.

    Unit rows are 2.5x longer than random ones (init_std * sqrt(d) = 0.39 for MiniLM): with normalised scoring a
    row-wise step turns a row by about lr / ||w||, so they keep more of the label text. Measured: rows scaled to
    the random norm lose that edge by the second epoch (docs/results.md).
    """
    # Every rank runs as many forward passes as the largest shard needs (ZeRO-3 gathers parameters in each
    # forward, collectively); a rank whose shard is done encodes a dummy batch.
    for batch in tqdm(range(math.ceil(table.geometry.largest_shard / batch_size)), desc="label-text init", unit="batch",
                      disable=not progress):
        start = table.start + batch * batch_size
        end = min(start + batch_size, table.end)
        texts = label_texts[start:end] if start < end else label_texts[:1]
        tokens = tokenizer(texts, max_length=max_len, truncation=True, padding=True, return_tensors="pt")
        embeddings, _ = encode(tokens["input_ids"].to(table.device), tokens["attention_mask"].to(table.device))
        if start < end:
            table.block_rows(start, end).copy_(embeddings.float().cpu())
