"""Rows for labels the training never saw, from their texts: a linear map fitted on the trained labels.

A trained row is not its label text's embedding: training pulls it towards its queries and pushes it from its hard
negatives. Started from its raw text embedding e, a new label outscores the trained ones on any query that speaks
of it (q·e against q·row), and pushes good old labels out of the top-1. A map A fitted by ridge regression from
the trained labels' text embeddings to their rows (rows ≈ E A) turns e into a row like the trained ones
(docs/ablations.md). It is no cure where label texts say little (single tags): mapped rows, which average trained
rows, still come first too often, and `labels add` scales them on the run's training queries
(labels/row_scale.py).

The map is fitted on at most FIT_LABELS labels, read as FIT_BLOCKS contiguous blocks spread over the ids, so that
a table of any size is read in a few slices, and with a fixed ridge (the label-text embeddings are unit vectors, so
one value serves every run).
"""

from __future__ import annotations

from pathlib import Path

import torch

from astra_ds.table.store import StoredRows

FIT_LABELS = 10_000
FIT_BLOCKS = 16
RIDGE = 1.0


def fit_ranges(num_labels: int) -> list[range]:
    """The ids the map is fitted on: up to FIT_BLOCKS contiguous blocks evenly spread over [0, num_labels), together
    at most FIT_LABELS ids (all of them for a smaller table)."""
    if num_labels <= FIT_LABELS:
        return [range(num_labels)]
    size = FIT_LABELS // FIT_BLOCKS
    return [range(start, start + size)
            for start in (block * (num_labels - size) // (FIT_BLOCKS - 1) for block in range(FIT_BLOCKS))]


def fit_text_to_row(embeddings: torch.Tensor, rows: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """The (d, dim) map A minimising |E A - W|^2 + ridge |A|^2 over the trained labels' text embeddings E (n, d)
    and rows W (n, dim); a new label's row is e @ A."""
    e, w = embeddings.double(), rows.double()
    return torch.linalg.solve(e.T @ e + ridge * torch.eye(e.shape[1], dtype=e.dtype), e.T @ w)


def read_stored_rows(path: Path, ranges: list[range]) -> torch.Tensor:
    """Rows `ranges` of a stored table (or of stored label-text embeddings) as float32."""
    stored = StoredRows(path)
    return torch.cat([stored.block_rows(r.start, r.stop) for r in ranges])
