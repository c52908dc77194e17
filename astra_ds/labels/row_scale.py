"""The scale of added labels' rows: how far a `labels add` lets new labels into the top-1 of queries.

A new label's row comes from its text (labels/text_to_row.py), and where label texts say little it averages trained
rows: such a row sits near the popular labels' rows, and added labels would push good old ones out of the top-1 of
many queries. Each addition's row part is therefore scaled by s (the card's row_scales, applied by ScoringRows): the
largest s on a grid over [0, 1] at which the added labels are the top-1 of at most their share of the labels on
SAMPLE_QUERIES of the run's training queries, none of which has them as a positive; where texts say enough, s = 1
(measurements: docs/ablations.md).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from astra_ds.config import RunConfig
from astra_ds.data.prepared import PreparedDirectory, is_prepared
from astra_ds.data.readers import read_dataset
from astra_ds.encoder.encoder import build_tokenizer
from astra_ds.errors import UserError
from astra_ds.rng import Stream, numpy_rng
from astra_ds.rundir.card import ModelCard

log = logging.getLogger("astra_ds")

SAMPLE_QUERIES = 2_000
GRID = torch.linspace(0, 1, 51, dtype=torch.float64)  # steps of 0.02


def training_queries(cfg: RunConfig, card: ModelCard, first_new_id: int) -> list[str] | None:
    """Up to SAMPLE_QUERIES texts of the run's training split (seeded by the run's seed and the first new id), or
    None when its data can no longer be read."""
    try:
        count, texts_of = _training_texts(cfg, card)
    except (UserError, OSError) as err:
        log.warning("the run's training data cannot be read (%s): the added labels' rows are not scaled "
                    "(`labels add --row-scale S` sets the scale)", err)
        return None
    rng = numpy_rng(cfg.train.seed, Stream.ROW_SCALE, first_new_id)
    chosen = np.sort(rng.choice(count, min(SAMPLE_QUERIES, count), replace=False))
    return [text for text in texts_of(chosen) if text.strip()]


def _training_texts(cfg: RunConfig, card: ModelCard) -> tuple[int, Callable[[np.ndarray], list[str]]]:
    """The number of the run's training queries, and the texts of given rows. A prepared directory holds token
    ids, not texts: its rows' ids are decoded back to text (what the encoder reads of them: the same ids once
    tokenised again, for vocabularies such as BERT's)."""
    if not is_prepared(card.dataset):
        texts = read_dataset(card.dataset, cfg.data.format, cfg.data.text_fields, "replace").train.texts
        return len(texts), lambda rows: [texts[i] for i in rows]
    part = PreparedDirectory(card.dataset).part("train")
    tokenizer = build_tokenizer(cfg.encoder)

    def decoded(rows: np.ndarray) -> list[str]:
        return tokenizer.batch_decode([ids.tolist() for ids in part.token_ids(rows)], skip_special_tokens=True)

    return len(part), decoded


def new_label_wins(queries: torch.Tensor, best_old: torch.Tensor, row_part: torch.Tensor,
                   text_part: torch.Tensor | None, label_block: int = 8192) -> torch.Tensor:
    """(len(GRID), N) booleans: whether some added label outscores query n's best old label (`best_old`, N) when
    its row part is scaled by GRID[s]. `row_part`: the added labels' rows as scored (normalised where the run
    normalises rows), `text_part`: label_text_weight x their label-text embeddings, or None."""
    queries = queries.double()
    best_new = torch.full((len(GRID), len(queries)), float("-inf"), dtype=torch.float64)
    for start in range(0, len(row_part), label_block):
        rows = queries @ row_part[start:start + label_block].double().T
        texts = queries @ text_part[start:start + label_block].double().T if text_part is not None else 0
        for s, scale in enumerate(GRID):
            best_new[s] = torch.maximum(best_new[s], (scale * rows + texts).amax(dim=1))
    return best_new > best_old.double()[None]


def calibrated_row_scale(queries: torch.Tensor, best_old: torch.Tensor, rows: torch.Tensor,
                         embeddings: torch.Tensor, card: ModelCard, predictable_labels: int) -> float:
    """The largest GRID scale of the added labels' `rows` (`embeddings`: their label-text vectors) at which they
    outscore the best old label (`best_old`) of at most their share of the encoded training `queries` (at least
    one); 0 where none does. Logged with what it keeps out."""
    row_part = F.normalize(rows.double(), dim=-1) if card.normalize_rows else rows
    text_part = card.label_text_weight * embeddings if card.label_text_weight else None
    share = len(rows) / (predictable_labels + len(rows))
    allowed = max(1.0, share * len(queries))
    wins = new_label_wins(queries, best_old, row_part, text_part)
    fitting = (wins.sum(dim=1) <= allowed).nonzero().flatten()
    chosen = int(fitting.max()) if len(fitting) else 0
    scale, taken = float(GRID[chosen]), wins[chosen].double().mean()
    log.info("the added labels' rows are scaled by %.2f: on %d training queries they come first for %.1f%% "
             "(unscaled %.1f%%; their share of the labels %.1f%%)", scale, len(queries), 100 * taken,
             100 * wins[-1].double().mean(), 100 * share)
    if scale == 0:
        log.warning("the added labels come first for more than their share of the training queries even "
                    "without their rows: they rank by their label texts alone")
    return scale
