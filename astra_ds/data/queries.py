"""Queries as training and evaluation read them: by row, their token ids (a batch padded to its longest) and their
positives, whether the rows are in memory (a small dataset read from its files) or memory-mapped from a prepared
directory (astra_ds/data/prepared.py). Nothing that reads them needs all N rows at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch

from astra_ds.data.tokens import TokenizedTexts


@dataclass(frozen=True)
class QueryStats:
    """What a plan and the start-up checks need of a set of queries, without reading its rows."""

    rows: int
    positives: int
    longest: int  # tokens of the longest query
    unlabelled: int  # queries without a positive

    @property
    def positives_per_query(self) -> float:
        return self.positives / max(1, self.rows)


class Texts(Protocol):
    """Token ids by row."""

    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of `rows`, padded to the longest of them."""

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of each row."""

    def longest(self) -> int:
        """Tokens of the longest row."""


class Queries(Texts, Protocol):
    """Token ids and positives by row."""

    def labels(self, rows: np.ndarray) -> sp.csr_matrix:
        """The positives of `rows`, (len(rows), num_labels)."""

    def stats(self) -> QueryStats: ...


class QueriesInMemory:
    """Token ids (memory-mapped from the token cache) and a CSR of positives held in memory."""

    def __init__(self, tokens: TokenizedTexts, positives: sp.csr_matrix):
        self.tokens, self.positives = tokens, positives

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.batch(rows)

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        return self.tokens.lengths_of(rows)

    def longest(self) -> int:
        return self.tokens.longest()

    def labels(self, rows: np.ndarray) -> sp.csr_matrix:
        return self.positives[rows]

    def stats(self) -> QueryStats:
        per_query = np.diff(self.positives.indptr)
        return QueryStats(len(self), int(self.positives.nnz), self.tokens.longest(), int((per_query == 0).sum()))


class RowsOf:
    """The rows `rows` of `texts` (queries or texts), as a set of their own."""

    def __init__(self, texts: Texts, rows: np.ndarray):
        self.texts, self.rows = texts, np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.texts.batch(self.rows[rows])

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        return self.texts.lengths_of(self.rows[rows])

    def longest(self) -> int:
        return int(self.lengths_of(np.arange(len(self))).max(initial=0))


@dataclass(frozen=True)
class TrainCounts:
    """The training queries each label is a positive of, and their number: all that propensities and the
    popularity baseline need of the training data."""

    per_label: np.ndarray  # (L,) int64
    queries: int

    @staticmethod
    def of(positives: sp.csr_matrix) -> "TrainCounts":
        counts = np.bincount(positives.indices[positives.data != 0], minlength=positives.shape[1])
        return TrainCounts(counts.astype(np.int64), positives.shape[0])
