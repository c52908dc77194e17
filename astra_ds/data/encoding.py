"""Token ids of texts, as the tokenizer's `tokenizer(texts, max_length=..., truncation=True)` gives them, through
its fast batch encoder directly: the wrapper also computes character offsets, attention masks and token types and
copies each into Python lists, which doubles the time of tokenising a dataset. Preparation and new texts at
prediction time both encode here, so that both give the same ids.

`data prepare`'s worker processes encode with the fast tokenizer's backend alone (`backend_of`), rebuilt from its
serialised state: no transformers (whose tokenizer import pulls in torch, ~4 s a process) in a worker."""

from __future__ import annotations

import functools


def encode(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """The token ids of each text, special tokens included, truncated to `max_len`; `tokenizer` is a transformers
    tokenizer or a fast one's backend (a tokenizers.Tokenizer)."""
    if not texts:  # a tokenizer fails on an empty batch
        return []
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    batch = getattr(backend, "encode_batch_fast", None)
    if batch is None:  # a slow tokenizer, or a tokenizers release without the fast batch encoder
        return tokenizer(texts, max_length=max_len, truncation=True)["input_ids"]
    backend.enable_truncation(max_len, direction=getattr(tokenizer, "truncation_side", "right"))
    if backend.padding is not None:
        backend.no_padding()
    return [encoding.ids for encoding in batch(texts)]


def backend_of(tokenizer):
    """A picklable callable that rebuilds `tokenizer`'s fast backend (for `encode`) in another process; for a slow
    tokenizer, None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(backend, "encode_batch_fast", None) is None or getattr(tokenizer, "truncation_side", "right") != "right":
        return None
    return functools.partial(_backend_from_str, backend.to_str())


def _backend_from_str(state: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(state)
