"""Token ids of texts in memory (new texts at prediction time), and the tokenizer's fingerprint: what a prepared
directory's ids depend on, so that a run refuses data tokenised by another tokenizer."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from astra_ds.data.encoding import encode


@dataclass
class TokenizedTexts:
    ids: np.ndarray  # (N, max_len) int32, padded with pad_id
    lengths: np.ndarray  # (N,) int32 tokens per text, special tokens included

    def __len__(self) -> int:
        return len(self.lengths)

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        return self.lengths[rows]

    def longest(self) -> int:
        return int(self.lengths.max(initial=0))

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


def _tokenize_into(ids: np.ndarray, lengths: np.ndarray, first: int, texts: list[str], tokenizer, max_len: int) -> None:
    """Rows first, first + 1, ... of (ids, lengths) <- the padded token ids of `texts`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode(tokenizer, texts, max_len)
    for row, seq in enumerate(encoded, start=first):
        ids[row, :len(seq)] = seq
        ids[row, len(seq):] = pad_id
        lengths[row] = len(seq)


def tokenize(texts: list[str], tokenizer, max_len: int) -> TokenizedTexts:
    """Token ids of `texts` in memory (new text at prediction time), as a prepared directory holds them."""
    ids, lengths = np.zeros((len(texts), max_len), np.int32), np.zeros(len(texts), np.int32)
    _tokenize_into(ids, lengths, 0, texts, tokenizer, max_len)
    return TokenizedTexts(ids, lengths)
