"""A dataset ready for training: read, validated and tokenised (through the token cache)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from astra_ds.config import DataConfig
from astra_ds.data.readers import XCDataset, read_dataset
from astra_ds.data.tokens import TokenizedTexts, tokenize_cached


@dataclass
class PreparedData:
    dataset: XCDataset
    train_tokens: TokenizedTexts
    test_tokens: TokenizedTexts
    label_tokens: TokenizedTexts | None = None  # the label texts, when the run uses them


def default_cache_dir() -> Path:
    """Token caches are keyed by content, so one user-wide directory serves every dataset."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "astra_ds" / "tokens"


def prepare_data(cfg: DataConfig, tokenizer, label_max_len: int | None = None) -> PreparedData:
    """The dataset and its token ids; with `label_max_len`, the label texts' too (when the data has them)."""
    dataset = read_dataset(cfg.path, cfg.format, cfg.text_fields)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    label_tokens = None
    if label_max_len is not None and dataset.label_texts is not None:
        label_tokens = tokenize_cached(dataset.label_texts, tokenizer, label_max_len, cache_dir, "labels")
    return PreparedData(
        dataset,
        tokenize_cached(dataset.train.texts, tokenizer, cfg.max_len, cache_dir, "train"),
        tokenize_cached(dataset.test.texts, tokenizer, cfg.max_len, cache_dir, "test"),
        label_tokens,
    )
