"""A dataset ready for training: read, validated, tokenised (through the token cache), and split into the queries
training uses, the validation split held out of them (data.validation_fraction) and the test split; with
data.label_texts_as_queries the label texts join the queries training uses (not the dataset's train split, whose
label counts give the propensities)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from astra_ds.config import DataConfig
from astra_ds.data.readers import XCDataset, XCSplit, read_dataset
from astra_ds.data.tokens import TokenizedTexts, tokenize_cached
from astra_ds.errors import ConfigError
from astra_ds.rng import Stream, numpy_rng

TEST, VALIDATION = "test", "validation"


@dataclass
class EvalSplit:
    """Queries a model is evaluated on, with their labels."""

    name: str  # TEST or VALIDATION
    tokens: TokenizedTexts
    labels: sp.csr_matrix
    filter: sp.csr_matrix | None = None  # (query, label) pairs left out of the evaluation (the test split's)


@dataclass
class PreparedData:
    dataset: XCDataset  # its train split: the training queries less the validation split
    train_tokens: TokenizedTexts  # the queries training uses: the train split's, then the label texts as queries
    train_labels: sp.csr_matrix  # their positives
    test_tokens: TokenizedTexts
    label_tokens: TokenizedTexts | None = None  # the label texts, when the run uses them
    validation: EvalSplit | None = None  # held out of the training queries, when data.validation_fraction > 0

    @property
    def test(self) -> EvalSplit:
        return EvalSplit(TEST, self.test_tokens, self.dataset.test.labels, self.dataset.test_filter)

    def split(self, name: str) -> EvalSplit:
        """The test or the validation split, by name."""
        if name == VALIDATION:
            if self.validation is None:
                raise ConfigError("there is no validation split: data.validation_fraction is 0")
            return self.validation
        return self.test


def default_cache_dir() -> Path:
    """Token caches are keyed by content, so one user-wide directory serves every dataset."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "astra_ds" / "tokens"


def validation_rows(num_train: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted rows of the training queries held out as the validation split (at least one)."""
    count = max(1, round(fraction * num_train))
    if count >= num_train:
        raise ConfigError(f"data.validation_fraction={fraction} leaves no training query of {num_train}")
    return np.sort(numpy_rng(seed, Stream.VALIDATION_SPLIT).choice(num_train, size=count, replace=False))


def prepare_data(cfg: DataConfig, tokenizer, label_max_len: int | None = None, seed: int = 0) -> PreparedData:
    """The dataset and its token ids; with `label_max_len`, the label texts' too (when the data has them); with
    data.validation_fraction, the validation split drawn from `seed` (the run's train.seed)."""
    dataset = read_dataset(cfg.path, cfg.format, cfg.text_fields, cfg.on_bad_text)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    label_tokens = None
    if label_max_len is not None and dataset.label_texts is not None:
        label_tokens = tokenize_cached(dataset.label_texts, tokenizer, label_max_len, cache_dir, "labels")
    train_tokens = tokenize_cached(dataset.train.texts, tokenizer, cfg.max_len, cache_dir, "train")
    test_tokens = tokenize_cached(dataset.test.texts, tokenizer, cfg.max_len, cache_dir, "test")
    validation = None
    if cfg.validation_fraction > 0:
        held_out = validation_rows(len(dataset.train.texts), cfg.validation_fraction, seed)
        kept = np.setdiff1d(np.arange(len(dataset.train.texts)), held_out)
        validation = EvalSplit(VALIDATION, train_tokens.subset(held_out), dataset.train.labels[held_out])
        train = XCSplit([dataset.train.texts[i] for i in kept], dataset.train.labels[kept])
        train_filter = dataset.train_filter[kept] if dataset.train_filter is not None else None
        dataset = dataclasses.replace(dataset, train=train, train_filter=train_filter)
        train_tokens = train_tokens.subset(kept)
    train_labels = dataset.train.labels
    if cfg.label_texts_as_queries:
        train_tokens, train_labels = _with_label_queries(dataset, train_tokens, tokenizer, cfg, cache_dir)
    return PreparedData(dataset, train_tokens, train_labels, test_tokens, label_tokens, validation)


def _with_label_queries(dataset: XCDataset, train_tokens: TokenizedTexts, tokenizer, cfg: DataConfig,
                        cache_dir: Path) -> tuple[TokenizedTexts, sp.csr_matrix]:
    """The training queries followed by one query per label with a text (at the queries' max_len), its positive
    the label."""
    if dataset.label_texts is None:
        raise ConfigError(f"data.label_texts_as_queries needs label texts, and the data at {cfg.path} has none")
    labels = np.array([i for i, text in enumerate(dataset.label_texts) if text.strip()], dtype=np.int64)
    tokens = tokenize_cached([dataset.label_texts[i] for i in labels], tokenizer, cfg.max_len, cache_dir,
                             "label_queries")
    positives = sp.csr_matrix((np.ones(len(labels), dataset.train.labels.dtype), labels, np.arange(len(labels) + 1)),
                              shape=(len(labels), dataset.num_labels))
    return (TokenizedTexts(np.concatenate([train_tokens.ids, tokens.ids]),
                           np.concatenate([train_tokens.lengths, tokens.lengths])),
            sp.vstack([dataset.train.labels, positives], format="csr"))
