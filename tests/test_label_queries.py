"""Label texts as training queries (data.label_texts_as_queries, Renée): each label's text joins the queries
training uses, its one positive that label; the dataset's train split (whose label counts give the propensities)
and the validation split stay as they were."""

import json

import numpy as np
import pytest

from astra_ds.config import load_config
from astra_ds.data.prepare import prepare_data
from astra_ds.data.readers import read_dataset
from astra_ds.data.tokens import tokenize
from astra_ds.errors import ConfigError
from astra_ds.encoder.encoder import build_tokenizer
from conftest import TINY_RUN, run_main


def test_label_texts_follow_the_training_queries_each_with_its_label(synth_dir, token_cache):
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={token_cache}", "data.validation_fraction=0.1"]
    cfg = load_config(None, [*sets, "data.label_texts_as_queries=true"])
    tokenizer = build_tokenizer(cfg.encoder)
    data = prepare_data(cfg.data, tokenizer, seed=3)
    plain = prepare_data(load_config(None, sets).data, tokenizer, seed=3)
    label_texts = read_dataset(synth_dir).label_texts
    num_train = len(plain.train)
    tokens, positives = data.train.tokens, data.train.positives
    assert len(data.train) == num_train + 50 and positives.shape == (num_train + 50, 50)
    assert data.num_label_queries == 50
    np.testing.assert_array_equal(tokens.ids[:num_train], plain.train.tokens.ids)
    np.testing.assert_array_equal(tokens.ids[num_train:], tokenize(label_texts, tokenizer, cfg.data.max_len).ids)
    assert (positives[:num_train] != plain.train.positives).nnz == 0
    assert (positives[num_train:] != np.eye(50)).sum() == 0  # label text i: label i, nothing else
    np.testing.assert_array_equal(data.train_counts.per_label, plain.train_counts.per_label)  # propensities' counts
    assert data.train_counts.queries == plain.train_counts.queries == num_train  # unchanged
    np.testing.assert_array_equal(data.validation.tokens.ids, plain.validation.tokens.ids)


def test_a_run_trains_on_the_label_texts_too(synth_dir, token_cache, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={synth_dir}", f"data.cache_dir={token_cache}", f"out_dir={out}",
            "data.label_texts_as_queries=true", "train.epochs=1", "train.record_batches=true"]
    run_main("train", "--no-eval", *[a for s in sets for a in ("--set", s)])
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    batches = np.concatenate([r["batch"] for r in records if "batch" in r])
    # an epoch: 17 batches of 32 drawn without repeats from the 512 queries and the 50 label texts
    assert len(np.unique(batches)) == len(batches) == 17 * 32 and batches.max() < 512 + 50
    assert (batches >= 512).sum() > 40


def test_data_without_label_texts_is_refused_in_one_line(tmp_path, token_cache, synth_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in synth_dir.iterdir():
        if path.name not in ("Y.txt", "Y.txt.gz"):
            (bare / path.name).write_bytes(path.read_bytes())
    cfg = load_config(None, [*TINY_RUN, f"data.path={bare}", f"data.cache_dir={token_cache}",
                             "data.label_texts_as_queries=true"])
    with pytest.raises(ConfigError, match="data.label_texts_as_queries needs label texts, and the data at .* has none"):
        prepare_data(cfg.data, build_tokenizer(cfg.encoder))
