"""Readers of every format, their one-line errors, the synthetic generator and the cache a dataset's files are
prepared into."""

import gzip
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from astra_ds.data.prepare import prepare_data
from astra_ds.data.queries import ConcatQueries, QueryStats
from astra_ds.data.readers import DataError, read_dataset, read_sparse_file, write_sparse_file
from astra_ds.data.synth import SynthConfig, TopicModel, generate
from astra_ds.data.tokens import TokenizedTexts
from astra_ds.errors import UserError
from astra_ds.encoder.encoder import build_tokenizer
from astra_ds.config import load_config
from astra_ds.files import locked

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


RAW = {
    "trn_X.txt": "red apple\ngreen pear\nblue sky\n",
    "trn_X_Y.txt": "3 4\n0:1 1:1\n2:1\n3:1\n",
    "tst_X.txt": "red pear\n",
    "tst_X_Y.txt": "1 4\n0:1 2:1\n",
    "Y.txt": "apple\nfruit\npear\nsky\n",
}


def test_raw_text_format(tmp_path):
    d = read_dataset(_write(tmp_path / "raw", RAW))
    assert d.train.texts == ["red apple", "green pear", "blue sky"]
    assert d.train.labels.toarray().tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert d.test.labels.toarray().tolist() == [[1, 0, 1, 0]]
    assert d.num_labels == 4 and d.label_texts == ["apple", "fruit", "pear", "sky"]


def test_sparse_file_round_trip_and_gzip(tmp_path):
    matrix = sp.csr_matrix(np.array([[0, 1.5, 0], [0, 0, 0], [2, 0, 1]], dtype=np.float32))
    write_sparse_file(tmp_path / "m.txt", matrix)
    np.testing.assert_array_equal(read_sparse_file(tmp_path / "m.txt").toarray(), matrix.toarray())
    with gzip.open(tmp_path / "g.txt.gz", "wt") as f:
        f.write((tmp_path / "m.txt").read_text())
    np.testing.assert_array_equal(read_sparse_file(tmp_path / "g.txt.gz").toarray(), matrix.toarray())


@pytest.mark.parametrize("name, content, message", [
    ("trn_X_Y.txt", "3 4\n0:1 9:1\n2:1\n3:1\n", r"trn_X_Y.txt:2: label id 9 out of range \[0, 4\)"),
    ("trn_X_Y.txt", "4 4\n0:1\n2:1\n3:1\n", "header says 4 rows but the file has 3"),
    ("trn_X_Y.txt", "3\n0:1\n2:1\n3:1\n", "header must be two counts"),
    ("trn_X_Y.txt", "3 4\n0:x\n2:1\n3:1\n", "cannot parse label entry '0:x'"),
    ("trn_X.txt", "only one\n", "trn_X.txt has 1 queries but .*trn_X_Y.txt has 3 rows"),
    ("tst_X_Y.txt", "1 5\n0:1\n", "train has 4 labels but test has 5"),
    ("Y.txt", "a\nb\n", "2 label texts for 4 labels"),
])
def test_malformed_input_gives_one_line_error(tmp_path, name, content, message):
    directory = _write(tmp_path / "bad", RAW | {name: content})
    with pytest.raises(DataError, match=message) as err:
        read_dataset(directory)
    assert "\n" not in str(err.value)


def test_corrupt_gzip_names_the_file(tmp_path):
    directory = _write(tmp_path / "gz", {k: v for k, v in RAW.items() if k != "trn_X_Y.txt"})
    payload = gzip.compress(RAW["trn_X_Y.txt"].encode())
    (directory / "trn_X_Y.txt.gz").write_bytes(payload[:len(payload) // 2])  # truncated
    with pytest.raises(DataError, match="cannot read .*trn_X_Y.txt.gz"):
        read_dataset(directory)


def test_missing_and_unknown_formats(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no known dataset format"):
        read_dataset(_write(tmp_path / "empty", {"readme": "x"}))
    files = dict(RAW)
    del files["tst_X_Y.txt"]
    with pytest.raises(DataError, match="missing file .*tst_X_Y.txt"):
        read_dataset(_write(tmp_path / "partial", files))


def test_bow_formats_split_and_single_file(tmp_path):
    vocab = "Xf.txt", "alpha\nbeta\ngamma\n"
    split = _write(tmp_path / "split", dict([vocab], **{
        "trn_X_Xf.txt": "2 3\n0:0.5 2:0.9\n1:1\n", "trn_X_Y.txt": "2 2\n0:1\n1:1\n",
        "tst_X_Xf.txt": "1 3\n2:1\n", "tst_X_Y.txt": "1 2\n1:1\n"}))
    single = _write(tmp_path / "single", dict([vocab], **{
        "train.txt": "2 3 2\n0 0:0.5 2:0.9\n1 1:1\n", "test.txt": "1 3 2\n1 2:1\n"}))
    for directory in (split, single):
        d = read_dataset(directory)
        assert d.train.texts == ["gamma alpha", "beta"]  # strongest feature first
        assert d.train.labels.toarray().tolist() == [[1, 0], [0, 1]]
        assert d.test.texts == ["gamma"] and d.label_texts is None
    with pytest.raises(DataError, match=r"label id 7 out of range \[0, 2\)"):
        read_dataset(_write(tmp_path / "badsingle", {"Xf.txt": vocab[1], "train.txt": "1 3 2\n7 0:1\n",
                                                     "test.txt": "1 3 2\n1 2:1\n"}))


@pytest.mark.parametrize("name, train, test, num_labels, label", [
    ("Bibtex", 4880, 2515, 159, "2005"), ("Delicious", 12920, 3185, 983, ".imported")])
def test_pair_format_of_the_shared_benchmarks(name, train, test, num_labels, label):
    if not (SHARED / name).is_dir():
        pytest.skip(f"{SHARED / name} not present")
    d = read_dataset(SHARED / name)
    assert (len(d.train.texts), len(d.test.texts), d.num_labels) == (train, test, num_labels)
    assert d.label_texts[0] == label  # TAG_ prefix dropped
    assert d.train.labels.shape == (train, num_labels)
    assert all(t for t in d.train.texts[:100])


def test_pair_format_small(tmp_path):
    d = read_dataset(_write(tmp_path / "pairs", {
        "toy_train_word.txt": "0 1\n0 2\n1 0\n", "toy_train_label.txt": "0 1\n1 0\n1 1\n",
        "toy_test_leml.txt": "#num_feature=3 num_label=2\n1 0:1.000000\n 2:1.000000\r\n",
        "feature_names.txt": "a\nb\nc\n", "label_names.txt": "TAG_x\nTAG_y\n"}))
    assert d.train.texts == ["b c", "a"] and d.test.texts == ["a", "c"]
    assert d.train.labels.toarray().tolist() == [[0, 1], [1, 1]]
    assert d.test.labels.toarray().tolist() == [[0, 1], [0, 0]]
    assert d.label_texts == ["x", "y"]


SMALL = SynthConfig(num_labels=200, num_train=2000, num_test=300, vocab_size=3000, seed=4)


def test_synthetic_data_is_deterministic_and_valid(tmp_path):
    generate(SMALL, tmp_path / "a")
    generate(SMALL, tmp_path / "b")
    generate(SynthConfig(**{**SMALL.__dict__, "seed": 5}), tmp_path / "c")
    for name in ("trn_X.txt", "trn_X_Y.txt", "tst_X.txt", "tst_X_Y.txt", "Y.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes(), name
    d = read_dataset(tmp_path / "a")
    per_query = np.diff(d.train.labels.indptr)
    assert d.num_labels == 200 and len(d.train.texts) == 2000 and len(d.label_texts) == 200
    assert per_query.min() >= 1 and per_query.max() <= 5
    with pytest.raises(UserError, match="already exists: choose a new directory"):
        generate(SMALL, tmp_path / "a")
    assert generate(SMALL, tmp_path / "a", exist_ok=True) == tmp_path / "a"
    with pytest.raises(UserError, match="another generator config"):
        generate(SynthConfig(**{**SMALL.__dict__, "num_train": 10}), tmp_path / "a", exist_ok=True)


def test_synthetic_queries_carry_their_labels_words(tmp_path):
    """Learnable structure: a query shares far more words with its labels' texts than with other labels'."""
    d = read_dataset(generate(SMALL, tmp_path / "s"))
    rng = np.random.default_rng(0)
    own, other = [], []
    for i in range(500):
        words = set(d.train.texts[i].split())
        for label in d.train.labels[i].indices:
            own.append(len(words & set(d.label_texts[label].split())))
            other.append(len(words & set(d.label_texts[rng.integers(d.num_labels)].split())))
    assert np.mean(own) > 1.0 and np.mean(other) < 0.2


def test_synthetic_labels_stream_at_large_l(tmp_path):
    """L = 10^8: nothing of size L is built; label ids cover the range and clusters hold."""
    cfg = SynthConfig(num_labels=100_000_000, num_train=2000, num_test=10, vocab_size=100_000, label_texts=False)
    d = read_dataset(generate(cfg, tmp_path / "big"))
    assert d.num_labels == 100_000_000 and d.label_texts is None
    ids = d.train.labels.indices
    assert ids.max() > 50_000_000 and ids.min() < 50_000_000
    model = TopicModel(cfg)
    assert model.signature_words(np.array([99_999_999])).shape == (1, cfg.words_per_label)


def test_bad_synthetic_config():
    with pytest.raises(ValueError, match="min_words"):
        SynthConfig(min_words=5, max_words=2)


def test_files_are_prepared_into_the_cache_once_keyed_by_files_and_settings(tmp_path):
    data = _write(tmp_path / "raw", RAW)
    cache = tmp_path / "cache"
    cfg = load_config(None, ["encoder.model=tiny-random", f"data.path={data}", f"data.cache_dir={cache}",
                             "data.max_len=8"])
    tokenizer = build_tokenizer(cfg.encoder)
    first = prepare_data(cfg, tokenizer)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    manifest_time = (entry / "manifest.json").stat().st_mtime_ns
    again = prepare_data(cfg, tokenizer)
    assert [p for p in cache.iterdir() if p.is_dir()] == [entry]  # reused, not prepared again
    assert (entry / "manifest.json").stat().st_mtime_ns == manifest_time and again.fingerprint == first.fingerprint

    texts = RAW["trn_X.txt"].splitlines()
    expected = tokenizer(texts, max_length=8, truncation=True)["input_ids"]
    assert first.train.lengths_of(np.arange(3)).tolist() == [len(e) for e in expected]
    input_ids, mask = first.train.batch(np.array([2, 0]))
    assert input_ids[0].tolist() == expected[2] and input_ids[1].tolist() == expected[0]
    assert mask.sum(1).tolist() == [len(expected[2]), len(expected[0])]

    cfg.data.max_len = 16  # another setting: another entry
    prepare_data(cfg, tokenizer)
    (data / "trn_X.txt").write_text("red apple tree\ngreen pear\nblue sky\n")  # other files: another entry
    os.utime(data / "trn_X.txt", ns=(1, 1))
    changed = prepare_data(cfg, tokenizer)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3
    assert changed.fingerprint != first.fingerprint


def test_a_process_that_finds_the_cache_in_preparation_waits_for_it(tmp_path):
    data = _write(tmp_path / "raw", RAW)
    cfg = load_config(None, ["encoder.model=tiny-random", f"data.path={data}", f"data.cache_dir={tmp_path / 'c'}"])
    tokenizer = build_tokenizer(cfg.encoder)
    reference = prepare_data(cfg, tokenizer)  # fills the cache: its lock file is known
    (lock,) = (tmp_path / "c").glob("*.lock")
    got = []
    with locked(lock):  # another rank preparing it
        reader = threading.Thread(target=lambda: got.append(prepare_data(cfg, tokenizer)))
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive() and not got  # waits for the lock
    reader.join(timeout=60)
    assert got[0].fingerprint == reference.fingerprint


class _DenseQueries:
    """Padded token ids and a CSR of positives in memory: the reference."""

    def __init__(self, tokens: TokenizedTexts, positives: sp.csr_matrix):
        self.tokens, self.positives = tokens, positives
        self.batch, self.lengths_of, self.longest = tokens.batch, tokens.lengths_of, tokens.longest

    def __len__(self) -> int:
        return len(self.tokens)

    def labels(self, rows: np.ndarray) -> sp.csr_matrix:
        return self.positives[rows]

    def stats(self) -> QueryStats:
        per_query = np.diff(self.positives.indptr)
        return QueryStats(len(self), int(self.positives.nnz), self.tokens.longest(), int((per_query == 0).sum()))


def test_concatenated_queries_answer_as_one_set_of_their_rows():
    """The training queries then the label texts as queries (of other widths): batches, lengths and positives of
    any rows as those of one in-memory set holding both (the dense reference)."""
    rng = np.random.default_rng(0)

    def part(rows: int, width: int) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        lengths = rng.integers(1, width + 1, rows).astype(np.int32)
        ids = np.zeros((rows, width), np.int32)
        for i, length in enumerate(lengths):
            ids[i, :length] = rng.integers(1, 100, length)
        positives = sp.csr_matrix((rng.random((rows, 9)) < 0.3).astype(np.float32))
        return ids, lengths, positives

    (ids_a, lengths_a, labels_a), (ids_b, lengths_b, labels_b) = part(7, 5), part(4, 8)
    joined = ConcatQueries(_DenseQueries(TokenizedTexts(ids_a, lengths_a), labels_a),
                           _DenseQueries(TokenizedTexts(ids_b, lengths_b), labels_b))
    whole = _DenseQueries(TokenizedTexts(np.vstack([np.pad(ids_a, ((0, 0), (0, 3))), ids_b]),
                                         np.concatenate([lengths_a, lengths_b])), sp.vstack([labels_a, labels_b],
                                                                                            format="csr"))
    assert len(joined) == 11 and joined.longest() == whole.longest() and joined.stats() == whole.stats()
    for rows in (np.array([9, 2, 7, 0, 10]), np.array([3, 1]), np.array([8]), np.arange(11)[::-1], np.array([], int)):
        for got, expected in zip(joined.batch(rows), whole.batch(rows)):
            assert torch.equal(got, expected), rows
        assert np.array_equal(joined.lengths_of(rows), whole.lengths_of(rows))
        assert np.array_equal(joined.labels(rows).toarray(), whole.labels(rows).toarray())
