"""Embeddings by the encoder as it is now, computed again only after it has changed: the label texts' (dual
scoring), the training queries' (kNN votes) and an evaluation split's queries. Evaluations along training, the
choices on the validation split, the saved model and the test evaluation share them: a stage that trains the rows
alone on a frozen encoder encodes each of them once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from astra_ds.data.prepare import EvalSplit
from astra_ds.encoder.label_text import LabelEmbeddings
from astra_ds.scoring.neighbour_votes import NeighbourVotes
from astra_ds.scoring.rows import encode_queries
from astra_ds.training.build import Training


class Encodings:
    def __init__(self, parts: Training, encoder_steps: Callable[[], int]):
        """`encoder_steps()`: the steps so far that trained the encoder; embeddings of the same count are current."""
        self.parts, self.encoder_steps = parts, encoder_steps
        self.progress = parts.progress
        self.kept: dict[str, tuple[int, object]] = {}  # name -> (encoder steps, embeddings)

    def current(self, name: str, encode: Callable[[object | None], object]):
        """`encode(stale)` runs again only after the encoder has changed; `stale` (None the first time) may lend
        its memory."""
        steps, embeddings = self.kept.get(name, (None, None))
        if steps != self.encoder_steps():
            embeddings = encode(embeddings)
            self.kept[name] = (self.encoder_steps(), embeddings)
        return embeddings

    def label_embeddings(self) -> LabelEmbeddings:
        """The label texts as the encoder embeds them now."""
        def encode(stale: LabelEmbeddings | None) -> LabelEmbeddings:
            embeddings = stale or LabelEmbeddings(self.parts.table)
            self.parts.encode_label_texts(embeddings)
            return embeddings

        return self.current("label texts", encode)

    def neighbour_votes(self) -> NeighbourVotes:
        """The training queries as the encoder embeds them now, with their labels: the kNN votes (collective:
        every rank encodes a part of them)."""
        parts, cfg = self.parts, self.parts.cfg.eval
        train = parts.data.train
        return self.current("training queries", lambda _: NeighbourVotes(encode_queries(
            parts.engine, train, cfg.batch_size, parts.dist.device, self.progress)[0],
            train.labels(np.arange(len(train))), cfg))

    def queries(self, split: EvalSplit) -> tuple:
        """The split's queries as the encoder embeds them now, and the calibration."""
        parts = self.parts
        return self.current(split.name, lambda _: encode_queries(
            parts.engine, split.tokens, parts.cfg.eval.batch_size, parts.dist.device, self.progress))
