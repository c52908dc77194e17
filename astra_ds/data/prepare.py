"""A dataset ready for training: a prepared directory (`astra-ds data prepare`), its parts memory-mapped from its
manifest alone: the queries training uses (with data.label_texts_as_queries, the label texts follow them), the
validation split held out of them when it was prepared (data.validation_fraction, by a hash of each row) and the
test split. A data.path in another layout is prepared first, once, into the cache (preparation.prepare_cached): a
run reads every dataset, small or large, the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from astra_ds.config import DataConfig, RunConfig
from astra_ds.data.prepared import PreparedDirectory, is_prepared
from astra_ds.data.preparation import LABEL_QUERIES, prepare_cached
from astra_ds.data.queries import ConcatQueries, Queries, Texts, TrainCounts
from astra_ds.data.tokens import tokenize, tokenizer_fingerprint
from astra_ds.errors import ConfigError

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
    """A dataset as a run reads it: the parts of a prepared directory, memory-mapped."""

    name: str
    num_labels: int
    train: Queries  # the queries training uses: the train split less the validation split, then label texts
    test: EvalSplit
    train_counts: TrainCounts  # of the training queries' labels, label texts left out (propensities)
    fingerprint: str  # of the prepared data: a run resumes on the data it was trained on
    label_tokens: Texts | None = None  # the label texts' tokens, when the run uses them
    label_texts: Sequence[str] | None = None  # the label texts, read as they are asked for
    validation: EvalSplit | None = None  # held out of the training queries, when data.validation_fraction > 0
    num_label_queries: int = 0  # label texts at the end of `train` (data.label_texts_as_queries)
    mapped_bytes: int = 0  # the training queries' memory-mapped arrays: page cache, shared by a host's ranks

    def split(self, name: str) -> EvalSplit:
        """The test or the validation split, by name."""
        if name == VALIDATION:
            if self.validation is None:
                raise ConfigError("there is no validation split: data.validation_fraction is 0")
            return self.validation
        return self.test


def prepare_data(cfg: RunConfig, tokenizer, label_max_len: int | None = None) -> PreparedData:
    """The dataset of cfg.data.path and its token ids; with `label_max_len`, the label texts' too (when the data has
    them). A path that is not a prepared directory is prepared into the cache first (once)."""
    path = Path(cfg.data.path) if is_prepared(cfg.data.path) else prepare_cached(cfg, tokenizer)
    return open_prepared(cfg.data, path, tokenizer, label_max_len)


def open_prepared(cfg: DataConfig, path: Path, tokenizer, label_max_len: int | None = None) -> PreparedData:
    """The prepared directory `path` (cfg.path or its copy in the cache), checked against the run's tokenizer and
    data settings; only its manifest is read."""
    directory = PreparedDirectory(path)
    settings = directory.settings
    if settings["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{cfg.path} was prepared with the tokenizer of encoder.model={settings['encoder']}, and "
                          "this run's tokenizer differs: prepare the data again for this encoder")
    asked = {"data.max_len": (settings["max_len"], cfg.max_len),
             "data.validation_fraction": (settings["validation_fraction"], cfg.validation_fraction)}
    if cfg.validation_fraction:
        asked["data.validation_group"] = (settings.get("validation_group", "row"), cfg.validation_group)
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
    if validation is not None and not len(validation.tokens):
        raise ConfigError(f"data.validation_fraction={cfg.validation_fraction} holds out none of the "
                          f"{len(parts['train']):,} training queries: raise it")
    test = evaluated(TEST) or EvalSplit(TEST, tokenize([], tokenizer, cfg.max_len),  # a dataset without one
                                        sp.csr_matrix((0, directory.num_labels), dtype=np.float32))
    counts = TrainCounts(np.asarray(directory.label_counts), len(parts["train"]))
    names = parts["labels"].texts() if parts["labels"] is not None and parts["labels"].has("names") else None
    train, label_queries, mapped = parts["train"], 0, directory.mapped_bytes("train")
    if cfg.label_texts_as_queries:  # the label texts follow the training queries
        if parts[LABEL_QUERIES] is None:
            raise ConfigError(f"data.label_texts_as_queries needs label texts, and the data at {cfg.path} has none")
        train, label_queries = ConcatQueries(train, parts[LABEL_QUERIES], pad_id), len(parts[LABEL_QUERIES])
        mapped += directory.mapped_bytes(LABEL_QUERIES)
    return PreparedData(Path(cfg.path).name, directory.num_labels, train, test, counts, directory.fingerprint, labels,
                        names, validation, label_queries, mapped)
