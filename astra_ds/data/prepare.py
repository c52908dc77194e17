"""A dataset ready for training: read, validated, tokenised (through the token cache), and split into the queries
training uses, the validation split held out of them (data.validation_fraction) and the test split; with
data.label_texts_as_queries the label texts join the queries training uses (not the dataset's train split, whose
label counts give the propensities). A prepared directory (`astra-ds data prepare`) gives the same parts,
memory-mapped, from its manifest alone: its validation split was chosen when it was prepared."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from astra_ds.config import DataConfig
from astra_ds.data.prepared import PreparedDirectory, is_prepared
from astra_ds.data.preparation import LABEL_QUERIES
from astra_ds.data.queries import ConcatQueries, Queries, QueriesInMemory, Texts, TrainCounts
from astra_ds.data.readers import XCDataset, XCSplit, read_dataset
from astra_ds.data.tokens import TokenizedTexts, tokenize, tokenize_cached, tokenizer_fingerprint
from astra_ds.errors import ConfigError
from astra_ds.rng import Stream, numpy_rng

TEST, VALIDATION = "test", "validation"


@dataclass
class EvalSplit:
    """Queries a model is evaluated on, with their labels."""

    name: str  # TEST or VALIDATION
    tokens: Texts
    labels: sp.csr_matrix
    filter: sp.csr_matrix | None = None  # (query, label) pairs left out of the evaluation (the test split's)


@dataclass
class PreparedData:
    """A dataset as a run reads it, from its files (in memory) or from a prepared directory (memory-mapped)."""

    name: str
    num_labels: int
    train: Queries  # the queries training uses: the train split less the validation split, then label texts
    test: EvalSplit
    train_counts: TrainCounts  # of the training queries' labels, label texts left out (propensities)
    fingerprint: str  # of the training queries and their labels: a run resumes on the data it was trained on
    label_tokens: Texts | None = None  # the label texts' tokens, when the run uses them
    label_texts: Sequence[str] | None = None  # the label texts (of a prepared directory: read as they are asked for)
    validation: EvalSplit | None = None  # held out of the training queries, when data.validation_fraction > 0
    num_label_queries: int = 0  # label texts at the end of `train` (data.label_texts_as_queries)
    mapped_bytes: int = 0  # the training queries' memory-mapped arrays (a prepared directory's): page cache

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
    data.validation_fraction, the validation split drawn from `seed` (the run's train.seed). A data.path that is a
    prepared directory (`astra-ds data prepare`) is memory-mapped; other layouts are read and tokenised here."""
    if is_prepared(cfg.path):
        return open_prepared(cfg, tokenizer, label_max_len)
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
        dataset = dataclasses.replace(dataset, train=train)
        train_tokens = train_tokens.subset(kept)
    train_labels, num_label_queries = dataset.train.labels, 0
    if cfg.label_texts_as_queries:
        train_tokens, train_labels = _with_label_queries(dataset, train_tokens, tokenizer, cfg, cache_dir)
        num_label_queries = len(train_tokens) - len(dataset.train.texts)
    return PreparedData(dataset.name, dataset.num_labels, QueriesInMemory(train_tokens, train_labels),
                        EvalSplit(TEST, test_tokens, dataset.test.labels, dataset.test_filter),
                        TrainCounts.of(dataset.train.labels), dataset.train.fingerprint(), label_tokens,
                        dataset.label_texts, validation, num_label_queries)


def open_prepared(cfg: DataConfig, tokenizer, label_max_len: int | None = None) -> PreparedData:
    """A prepared directory, checked against the run's tokenizer and data settings; only its manifest is read."""
    directory = PreparedDirectory(cfg.path)
    settings = directory.settings
    if settings["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{cfg.path} was prepared with the tokenizer of encoder.model={settings['encoder']}, and "
                          "this run's tokenizer differs: prepare the data again for this encoder")
    asked = {"data.max_len": (settings["max_len"], cfg.max_len),
             "data.validation_fraction": (settings["validation_fraction"], cfg.validation_fraction)}
    if label_max_len is not None:
        asked["siamese.label_max_len"] = (settings["label_max_len"], label_max_len)
    for key, (prepared, run) in asked.items():
        if prepared != run:
            raise ConfigError(f"{cfg.path} was prepared with {key}={prepared}, and this run asks for {run}: set "
                              f"{key}={prepared}, or prepare the data again")
    if cfg.label_texts_as_queries and not settings.get("label_queries"):
        raise ConfigError(f"{cfg.path} was prepared without data.label_texts_as_queries: prepare it again with "
                          "--set data.label_texts_as_queries=true")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts = {name: directory.part(name, pad_id) for name in ("train", "validation", "test", "labels", LABEL_QUERIES)}

    def evaluated(name: str) -> EvalSplit | None:
        part = parts[name]
        return None if part is None else EvalSplit(name, part, part.labels(np.arange(len(part))),
                                                   directory.test_filter() if name == TEST else None)

    labels = parts["labels"] if label_max_len is not None and parts["labels"] is not None and len(parts["labels"]) \
        else None
    validation = evaluated(VALIDATION) if cfg.validation_fraction > 0 else None
    test = evaluated(TEST) or EvalSplit(TEST, tokenize([], tokenizer, cfg.max_len),  # a dataset without one
                                        sp.csr_matrix((0, directory.num_labels), dtype=np.float32))
    counts = TrainCounts(np.asarray(directory.label_counts), len(parts["train"]))
    names = parts["labels"].texts() if parts["labels"] is not None and parts["labels"].has("names") else None
    train, label_queries, mapped = parts["train"], 0, directory.mapped_bytes("train")
    if cfg.label_texts_as_queries:  # the label texts follow the training queries
        train, label_queries = ConcatQueries(train, parts[LABEL_QUERIES], pad_id), len(parts[LABEL_QUERIES])
        mapped += directory.mapped_bytes(LABEL_QUERIES)
    return PreparedData(directory.path.name, directory.num_labels, train, test, counts, directory.fingerprint, labels,
                        names, validation, label_queries, mapped)


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
