"""Label texts as training queries (data.label_texts_as_queries, Renée): each label's text joins the queries
training uses, its one positive that label; the dataset's train split (whose label counts give the propensities)
and the validation split stay as they were."""

import json

import numpy as np
import pytest
import torch

from astra_ds.config import load_config
from astra_ds.data.prepare import prepare_data
from astra_ds.data.readers import read_dataset
from astra_ds.data.tokens import tokenize
from astra_ds.errors import ConfigError
from astra_ds.encoder.encoder import build_tokenizer
from conftest import TINY_RUN, run_main


def test_label_texts_follow_the_training_queries_each_with_its_label(synth_dir, data_cache):
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", "data.validation_fraction=0.1"]
    cfg = load_config(None, [*sets, "data.label_texts_as_queries=true"])
    tokenizer = build_tokenizer(cfg.encoder)
    data = prepare_data(cfg, tokenizer)
    plain = prepare_data(load_config(None, sets), tokenizer)
    label_texts = read_dataset(synth_dir).label_texts
    num_train = len(plain.train)
    assert len(data.train) == num_train + 50 and data.num_label_queries == 50
    rows, label_rows = np.arange(num_train), np.arange(num_train, num_train + 50)
    for got, expected in zip(data.train.batch(rows), plain.train.batch(rows)):
        assert torch.equal(got, expected)
    texts = tokenize(label_texts, tokenizer, cfg.data.max_len)
    for got, expected in zip(data.train.batch(label_rows), texts.batch(np.arange(50))):
        assert torch.equal(got, expected)
    assert (data.train.labels(rows) != plain.train.labels(rows)).nnz == 0
    assert (data.train.labels(label_rows).toarray() == np.eye(50)).all()  # label text i: label i, nothing else
    np.testing.assert_array_equal(data.train_counts.per_label, plain.train_counts.per_label)  # propensities' counts
    assert data.train_counts.queries == plain.train_counts.queries == num_train  # unchanged
    assert (data.validation.labels != plain.validation.labels).nnz == 0


def test_a_run_trains_on_the_label_texts_too(synth_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={data_cache}", f"out_dir={out}",
            "data.label_texts_as_queries=true", "train.epochs=1", "train.record_batches=true"]
    run_main("train", "--no-eval", *[a for s in sets for a in ("--set", s)])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    batches = np.concatenate([r["batch"] for r in records if "batch" in r])
    # an epoch: 17 batches of 32 drawn without repeats from the 512 queries and the 50 label texts
    assert len(np.unique(batches)) == len(batches) == 17 * 32 and batches.max() < 512 + 50
    assert (batches >= 512).sum() > 40


def test_data_without_label_texts_is_refused_in_one_line(tmp_path, data_cache, synth_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in synth_dir.iterdir():
        if path.name not in ("Y.txt", "Y.txt.gz"):
            (bare / path.name).write_bytes(path.read_bytes())
    cfg = load_config(None, [*TINY_RUN, f"data.path={bare}", f"data.cache_dir={data_cache}",
                             "data.label_texts_as_queries=true"])
    with pytest.raises(ConfigError, match="data.label_texts_as_queries needs label texts, and the data at .* has none"):
        prepare_data(cfg, build_tokenizer(cfg.encoder))
