"""Lexical features beside the transformer's embedding: a query's exact tokens, for labels named by words in it.

A sparse linear model over TF-IDF learns "Python 3 bindings" -> `python3` from a few examples; a briefly
fine-tuned transformer does not. So the encoder can append to its embedding a fixed sketch of the text's TF-IDF
vector over token unigrams and bigrams, and each label's row (in the host table, d + `dim` wide) learns weights
over it as a linear model would, with no new trained module: the features are a function of the token ids.

    features   token ids between the first and the last token (the special tokens of BERT-style tokenizers are
               dropped), and each adjacent pair of them hashed into BUCKETS - vocabulary ids
    weights    tf x idf, idf = log((1 + N) / (1 + df)) + 1 over the N training queries (a buffer, fitted once,
               saved with the encoder's weights)
    sketch     each feature adds +-weight / sqrt(HASHES) to HASHES of `dim` coordinates (a sparse signed random
               projection: inner products of TF-IDF vectors are kept up to about 1 / sqrt(dim)); L2-normalised

The hashes are fixed constants, never the run's seed: a served model computes the features the trainer did.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BUCKETS = 1 << 20  # feature ids: token ids below the vocabulary size, bigram hashes above
HASHES = 4  # coordinates each feature is added to
_PRIME = (1 << 31) - 1
_BIGRAM = 1_000_003
# (multiplier, offset) pairs of the coordinate hashes, then of the sign hashes: fixed forever (served models)
_COORDS = [(1_103_515_245, 12_345), (2_147_483_629, 40_503), (1_664_525, 1_013_904_223), (22_695_477, 1)]
_SIGNS = [(134_775_813, 7), (214_013, 2_531_011), (69_069, 1_234_567), (16_807, 3)]


class LexicalSketch(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        if vocab_size >= BUCKETS:
            raise ValueError(f"a vocabulary of {vocab_size} tokens leaves no buckets for bigrams")
        self.dim, self.vocab_size = dim, vocab_size
        self.register_buffer("idf", torch.ones(BUCKETS))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature ids (B, F) of every text and which of them are real (B, F): unigrams, then bigrams."""
        lengths = attention_mask.sum(1, keepdim=True)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        inner = (positions >= 1) & (positions < lengths - 1)  # without the first and last (special) tokens
        ids = input_ids.long()
        pairs = (ids[:, :-1] * _BIGRAM + ids[:, 1:]) % (BUCKETS - self.vocab_size) + self.vocab_size
        return torch.cat([ids, pairs], 1), torch.cat([inner, inner[:, :-1] & inner[:, 1:]], 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm sketches (B, dim) of the texts' TF-IDF vectors (zero for a text without inner tokens)."""
        features, real = self.features(input_ids, attention_mask)
        weights = self.idf[features] * real / math.sqrt(HASHES)
        sketch = torch.zeros((len(features), self.dim), device=features.device)
        for (a, b), (c, d) in zip(_COORDS, _SIGNS):
            coords = (features * a + b) % _PRIME % self.dim
            signs = 1.0 - 2.0 * ((features * c + d) % _PRIME % 2)
            sketch.scatter_add_(1, coords, weights * signs)
        return F.normalize(sketch, dim=-1)

    @torch.no_grad()
    def fit_idf(self, tokens, chunk: int = 4096) -> None:
        """idf from the document frequencies of the features over `tokens` (the training queries)."""
        df = torch.zeros(BUCKETS, dtype=torch.float64)
        for start in range(0, len(tokens), chunk):
            features, real = self.features(*tokens.batch(np.arange(start, min(start + chunk, len(tokens)))))
            rows = torch.arange(len(features))[:, None].expand_as(features)
            present = torch.unique(rows[real] * BUCKETS + features[real])  # each feature once per text
            df += torch.bincount(present % BUCKETS, minlength=BUCKETS).double()
        self.idf.copy_((math.log(1 + len(tokens)) - torch.log1p(df) + 1).float())
