"""Queries as training and evaluation read them: by row, their token ids (a batch padded to its longest) and their
positives, memory-mapped from a prepared directory (astra_ds/data/prepared.py) or, for new texts, tokenised in
memory. Nothing that reads them needs all N rows at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch



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


class ConcatQueries:
    """The rows of `first`, then those of `second` (the training queries, then the label texts as queries)."""

    def __init__(self, first: Queries, second: Queries, pad_id: int = 0):
        self.parts, self.pad_id = (first, second), pad_id
        self.split_at = len(first)

    def __len__(self) -> int:
        return self.split_at + len(self.parts[1])

    def _by_part(self, rows: np.ndarray):
        """(part, positions in `rows`, its rows) for each part."""
        rows = np.asarray(rows, dtype=np.int64)
        second = rows >= self.split_at
        for part, chosen, offset in ((self.parts[0], ~second, 0), (self.parts[1], second, self.split_at)):
            where = np.flatnonzero(chosen)
            if len(where):
                yield part, where, rows[where] - offset

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [(where, *part.batch(local)) for part, where, local in self._by_part(rows)]
        if not pieces:  # no rows: as the parts answer
            return self.parts[0].batch(rows)
        width = max(ids.shape[1] for _, ids, _ in pieces)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for where, ids, mask in pieces:
            input_ids[torch.from_numpy(where), :ids.shape[1]] = ids
            attention_mask[torch.from_numpy(where), :mask.shape[1]] = mask
        return input_ids, attention_mask

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows), np.int64)
        for part, where, local in self._by_part(rows):
            out[where] = part.lengths_of(local)
        return out

    def longest(self) -> int:
        return max(part.longest() for part in self.parts)

    def labels(self, rows: np.ndarray) -> sp.csr_matrix:
        pieces = [(where, part.labels(local)) for part, where, local in self._by_part(rows)]
        if not pieces:
            return self.parts[0].labels(rows)
        stacked = sp.vstack([labels for _, labels in pieces], format="csr")
        order = np.argsort(np.concatenate([where for where, _ in pieces]), kind="stable")
        return stacked[order]

    def stats(self) -> QueryStats:
        first, second = (part.stats() for part in self.parts)
        return QueryStats(first.rows + second.rows, first.positives + second.positives,
                          max(first.longest, second.longest), first.unlabelled + second.unlabelled)


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
