"""Tokenise once: token ids cached as memory-mapped .npy files keyed by tokenizer, max length and texts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astra_ds.data.encoding import encode
from astra_ds.progress import progress as progress_of


@dataclass
class TokenizedTexts:
    ids: np.ndarray  # (N, max_len) int32, padded with pad_id (memory-mapped)
    lengths: np.ndarray  # (N,) int32 tokens per text, special tokens included

    def __len__(self) -> int:
        return len(self.lengths)

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        return self.lengths[rows]

    def longest(self) -> int:
        return int(self.lengths.max(initial=0))

    def subset(self, rows: np.ndarray) -> "TokenizedTexts":
        return TokenizedTexts(self.ids[rows], self.lengths[rows])

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of `rows`, trimmed to the longest of them."""
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 1
        input_ids = torch.from_numpy(np.ascontiguousarray(self.ids[rows, :width], dtype=np.int64))
        attention_mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]).long()
        return input_ids, attention_mask


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids (computed once a tokenizer, which astra_ds never
    changes after building it)."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that cannot be weakly referenced or hashed
        pass
    fingerprint = _fingerprint(tokenizer)
    try:
        _FINGERPRINTS[tokenizer] = fingerprint
    except TypeError:
        pass
    return fingerprint


def _fingerprint(tokenizer) -> str:
    h = hashlib.sha1(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole pipeline, less the call-time truncation and padding settings
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        # in the serialiser's own (fixed) key order: sorting the 30k-entry vocabulary and escaping it took 0.2 s
        h.update(json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def _texts_digest(texts: list[str]) -> str:
    h = hashlib.sha1(str(len(texts)).encode())
    for text in texts:
        h.update(text.encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()


def _tokenize_into(ids: np.ndarray, lengths: np.ndarray, first: int, texts: list[str], tokenizer, max_len: int) -> None:
    """Rows first, first + 1, ... of (ids, lengths) <- the padded token ids of `texts`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode(tokenizer, texts, max_len)
    for row, seq in enumerate(encoded, start=first):
        ids[row, :len(seq)] = seq
        ids[row, len(seq):] = pad_id
        lengths[row] = len(seq)


def tokenize(texts: list[str], tokenizer, max_len: int) -> TokenizedTexts:
    """Token ids of `texts` in memory (new text at prediction time), as `tokenize_cached` makes them."""
    ids, lengths = np.zeros((len(texts), max_len), np.int32), np.zeros(len(texts), np.int32)
    _tokenize_into(ids, lengths, 0, texts, tokenizer, max_len)
    return TokenizedTexts(ids, lengths)


def tokenize_cached(texts: list[str], tokenizer, max_len: int, cache_dir: str | Path, name: str,
                    chunk: int = 8192) -> TokenizedTexts:
    """Token ids of `texts`, from `cache_dir` when this (tokenizer, max_len, texts) was seen before."""
    key = hashlib.sha1(f"{tokenizer_fingerprint(tokenizer)}|{max_len}|{_texts_digest(texts)}".encode()).hexdigest()[:16]
    final = Path(cache_dir) / f"{name}-len{max_len}-{key}"
    if not final.is_dir():
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.int32, shape=(len(texts), max_len))
        lengths = np.zeros(len(texts), np.int32)
        for start in progress_of(range(0, len(texts), chunk), f"tokenize {name}", len(texts) > chunk, "chunk"):
            _tokenize_into(ids, lengths, start, texts[start:start + chunk], tokenizer, max_len)
        ids.flush()
        del ids
        np.save(tmp / "lengths.npy", lengths)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenizedTexts(np.load(final / "ids.npy", mmap_mode="r"), np.load(final / "lengths.npy"))
