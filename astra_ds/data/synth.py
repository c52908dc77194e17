"""Synthetic text XC datasets with learnable structure, streamed to disk in the raw-text format.

Labels are topics over a vocabulary of pronounceable pseudo-words. Label l owns `words_per_label` signature words
and shares `cluster_words` words with the other labels of its cluster (labels l // cluster_size), so labels of one
cluster are confusable: hard negatives matter. A query draws 1-5 labels (the first by a power-law popularity,
the others from the first one's cluster with probability `cluster_cooccurrence`), then `min_words..max_words`
words, each a noise word with probability `noise`, else a word of one of its labels' topics.

Nothing of size L is held in memory: a label's words are a hash of its id, its popularity rank maps to its id
by an affine bijection, and Y.txt is written in blocks. So any L (up to 120M and more) streams to disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from astra_ds.errors import UserError
from astra_ds.hashing import mix64

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 70 syllables

# 1-based size of each choice: P(a query has k labels), k = 1..5
_LABELS_PER_QUERY = np.array([0.35, 0.25, 0.2, 0.12, 0.08])


@dataclass
class SynthConfig:
    num_labels: int = 1000
    num_train: int = 20000
    num_test: int = 2000
    vocab_size: int = 20000
    words_per_label: int = 4
    cluster_size: int = 10
    cluster_words: int = 3
    signature_prob: float = 0.7  # a topic word is a signature word (else a cluster word)
    cluster_cooccurrence: float = 0.5
    popularity_exponent: float = 0.5  # label of popularity rank r is drawn with density ~ r^-a
    min_words: int = 4
    max_words: int = 10
    noise: float = 0.2
    label_texts: bool = True
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.num_labels >= 2, "num_labels must be >= 2"),
            (self.num_train >= 1 and self.num_test >= 1, "num_train and num_test must be >= 1"),
            (self.vocab_size >= 2, "vocab_size must be >= 2"),
            (self.vocab_size <= len(_SYLLABLES) ** 4, f"vocab_size must be <= {len(_SYLLABLES) ** 4}"),
            (self.words_per_label >= 1 and self.cluster_size >= 1 and self.cluster_words >= 0,
             "words_per_label and cluster_size must be >= 1, cluster_words >= 0"),
            (1 <= self.min_words <= self.max_words, "need 1 <= min_words <= max_words"),
            (0 <= self.noise < 1 and 0 <= self.signature_prob <= 1 and 0 <= self.cluster_cooccurrence <= 1,
             "noise, signature_prob and cluster_cooccurrence are probabilities"),
            (0 <= self.popularity_exponent < 1, "popularity_exponent must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"synthetic data: {message}")


def word(word_id: int) -> str:
    """Pseudo-word of `word_id`: its base-70 digits as syllables (two at least)."""
    syllables = [_SYLLABLES[word_id % len(_SYLLABLES)]]
    word_id //= len(_SYLLABLES)
    while word_id or len(syllables) < 2:
        syllables.append(_SYLLABLES[word_id % len(_SYLLABLES)])
        word_id //= len(_SYLLABLES)
    return "".join(syllables)


class TopicModel:
    """The hidden structure: label popularity and each label's words, all computed from ids."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.salt = np.uint64(cfg.seed * 0x9E3779B97F4A7C15 % 2**64)
        # Popularity rank r -> label id (multiplier * r + offset) mod L, a bijection since gcd(multiplier, L) = 1.
        multiplier = int(cfg.num_labels * 0.6180339887) | 1
        while math.gcd(multiplier, cfg.num_labels) != 1:
            multiplier += 2
        self.multiplier, self.offset = multiplier, (cfg.seed * 7919) % cfg.num_labels

    def _hash_words(self, keys: np.ndarray, count: int, tag: int) -> np.ndarray:
        """(len(keys), count) word ids, a hash of (key, j, tag)."""
        grid = keys.astype(np.uint64)[:, None] * np.uint64(1 << 8) + np.arange(count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            hashed = mix64(grid * np.uint64(4) + np.uint64(tag) + self.salt)
        return (hashed % np.uint64(self.cfg.vocab_size)).astype(np.int64)

    def signature_words(self, labels: np.ndarray) -> np.ndarray:
        return self._hash_words(labels, self.cfg.words_per_label, tag=1)

    def cluster_words(self, labels: np.ndarray) -> np.ndarray:
        return self._hash_words(labels // self.cfg.cluster_size, self.cfg.cluster_words, tag=2)

    def popular_labels(self, rng: np.random.Generator, n: int) -> np.ndarray:
        a, num_labels = self.cfg.popularity_exponent, self.cfg.num_labels
        ranks = np.minimum((num_labels * rng.random(n) ** (1.0 / (1.0 - a))).astype(np.int64), num_labels - 1)
        return (ranks * self.multiplier + self.offset) % num_labels

    def cluster_mates(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        start = (labels // self.cfg.cluster_size) * self.cfg.cluster_size
        size = np.minimum(self.cfg.cluster_size, self.cfg.num_labels - start)
        return start + (rng.random(len(labels)) * size).astype(np.int64)

    def sample_queries(self, rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """n queries: (label ids, word ids) each."""
        cfg = self.cfg
        num_labels = rng.choice(len(_LABELS_PER_QUERY), size=n, p=_LABELS_PER_QUERY) + 1
        first = self.popular_labels(rng, n)
        slots = np.repeat(first, num_labels)  # one entry per (query, label slot)
        is_first = np.zeros(len(slots), bool)
        is_first[np.cumsum(num_labels) - num_labels] = True
        from_cluster = rng.random(len(slots)) < cfg.cluster_cooccurrence
        mates, popular = self.cluster_mates(rng, slots), self.popular_labels(rng, len(slots))
        slots = np.where(is_first, slots, np.where(from_cluster, mates, popular))

        num_words = rng.integers(cfg.min_words, cfg.max_words + 1, size=n)
        query_of_word = np.repeat(np.arange(n), num_words)
        slot_start = np.cumsum(num_labels) - num_labels
        word_label = slots[slot_start[query_of_word] + (rng.random(len(query_of_word)) * num_labels[query_of_word]).astype(np.int64)]
        signature = self.signature_words(word_label)[np.arange(len(word_label)), rng.integers(0, cfg.words_per_label, len(word_label))]
        if cfg.cluster_words:
            shared = self.cluster_words(word_label)[np.arange(len(word_label)), rng.integers(0, cfg.cluster_words, len(word_label))]
            topic = np.where(rng.random(len(word_label)) < cfg.signature_prob, signature, shared)
        else:
            topic = signature
        words = np.where(rng.random(len(topic)) < cfg.noise, rng.integers(0, cfg.vocab_size, len(topic)), topic)
        labels = [np.unique(x) for x in np.split(slots, np.cumsum(num_labels)[:-1])]
        return labels, np.split(words, np.cumsum(num_words)[:-1])


_BLOCK = 65536  # queries or labels generated at once; each query block has its own random stream
# tqdm bars below: disable=None hides them when stderr is not a terminal


def _write_split(path_x: Path, path_y: Path, model: TopicModel, vocabulary: list[str], n: int, split: int,
                 desc: str) -> None:
    with open(path_x, "w") as fx, open(path_y, "w") as fy:
        fy.write(f"{n} {model.cfg.num_labels}\n")
        for start in tqdm(range(0, n, _BLOCK), desc=desc, unit="block", disable=n <= _BLOCK or None):
            rng = np.random.default_rng([model.cfg.seed, split, start // _BLOCK])
            labels, words = model.sample_queries(rng, min(_BLOCK, n - start))
            fx.write("".join(" ".join(vocabulary[w] for w in ws) + "\n" for ws in words))
            fy.write("".join(" ".join(f"{lab}:1" for lab in ls) + "\n" for ls in labels))


def _write_label_texts(path: Path, model: TopicModel, vocabulary: list[str]) -> None:
    num_labels = model.cfg.num_labels
    with open(path, "w") as f:
        for start in tqdm(range(0, num_labels, _BLOCK), desc="label texts", unit="block", disable=num_labels <= _BLOCK or None):
            words = model.signature_words(np.arange(start, min(start + _BLOCK, num_labels)))
            f.write("".join(" ".join(vocabulary[w] for w in ws) + "\n" for ws in words))


CONFIG_FILE = "synth_config.json"


def generate(cfg: SynthConfig, out_dir: str | Path, exist_ok: bool = False) -> Path:
    """Write trn_X.txt, trn_X_Y.txt, tst_X.txt, tst_X_Y.txt, Y.txt and synth_config.json under out_dir
    (atomically: a temporary directory renamed at the end, so an interrupted run leaves no half dataset).
    With exist_ok, a directory already generated with the same config is kept as it is."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        saved = out_dir / CONFIG_FILE
        if exist_ok and saved.is_file() and json.loads(saved.read_text()) == dataclasses.asdict(cfg):
            return out_dir
        raise UserError(f"{out_dir} already exists" + (" with another generator config" if exist_ok else
                                                      ": choose a new directory (or --exist-ok to keep the same one)"))
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    model = TopicModel(cfg)
    vocabulary = [word(i) for i in range(cfg.vocab_size)]
    _write_split(tmp / "trn_X.txt", tmp / "trn_X_Y.txt", model, vocabulary, cfg.num_train, 1, "train")
    _write_split(tmp / "tst_X.txt", tmp / "tst_X_Y.txt", model, vocabulary, cfg.num_test, 2, "test")
    if cfg.label_texts:
        _write_label_texts(tmp / "Y.txt", model, vocabulary)
    (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    tmp.rename(out_dir)
    return out_dir
