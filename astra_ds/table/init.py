"""How a fresh run's classifier rows start (`table.init`, registry TABLE_INITS in astra_ds/choices.py). The trainer
initialises the rows when the first stage that trains them begins, so that label-text rows come from the encoder
as the stages before it left it (the Siamese stage's).

    random      N(0, table.init_std) rows, each chunk drawn from the run's seed (the same for any world size)
    label_text  each row is the encoder's embedding of its label text (NGAME / DEXML style; unit rows)
"""

from __future__ import annotations

from typing import Callable

from astra_ds.table.table import ClassifierTable

EncodeLabelTexts = Callable[[ClassifierTable], None]  # this rank's rows <- the current encoder's label-text embeddings


class RandomRows:
    needs_label_texts = False

    @staticmethod
    def initialize(table: ClassifierTable, seed: int, encode_label_texts: EncodeLabelTexts) -> None:
        table.init_random(seed)


class LabelTextRows:
    needs_label_texts = True

    @staticmethod
    def initialize(table: ClassifierTable, seed: int, encode_label_texts: EncodeLabelTexts) -> None:
        encode_label_texts(table)
