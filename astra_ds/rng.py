"""Named random streams: every random draw of a run comes from one of these, keyed by the run's seed and a
counter (epoch, step, chunk, ...), so that a run is reproducible and a resumed run draws what an uninterrupted
one would. Streams never share a key: (seed, stream, counters...) is unique per draw site."""

from __future__ import annotations

import random
from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    EPOCH_ORDER = 1  # the random batch order of an epoch (counters: stage, epoch)
    NEGATIVES = 2  # the negatives of a step (counter: step)
    CLUSTERS = 3  # NGAME's balanced 2-means initial centroids (counters: stage, epoch)
    INDEX_TRAINING = 4  # the rows an IVF index trains its centroids on (counters: index version, rank)
    TABLE_INIT = 5  # random classifier rows (counter: chunk)
    BF16_ROUNDING = 6  # stochastic rounding of bfloat16 rows (counters: rank, update)
    SERVING_INDEX = 7  # the rows the serving index of a finished run trains on (no counter)
    ROW_SCALE = 9  # the training queries a `labels add` scales the new rows on (counter: the first new id)
    EMBEDDING_DROPOUT = 10  # the dropout mask on a rows-only step's query embeddings (counter: step)


def numpy_rng(seed: int, stream: Stream, *counters: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), *counters])


def stream_key(seed: int, stream: Stream, *counters: int) -> int:
    """A 64-bit key from the same (seed, stream, counters) as `numpy_rng`, for draws made by hashing (a keyed
    permutation) or by another generator."""
    return int(np.random.SeedSequence([seed, int(stream), *counters]).generate_state(1, np.uint64)[0])


def torch_generator(seed: int, stream: Stream, *counters: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device`, seeded from the same (seed, stream, counters) key as `numpy_rng`."""
    return torch.Generator(device).manual_seed(stream_key(seed, stream, *counters) >> 1)  # a signed 64-bit seed


class GlobalRngState:
    """The process-wide generators (python, numpy, torch, CUDA) that libraries draw from (dropout, for one): a
    per-rank checkpoint component."""

    def state_dict(self) -> dict:
        """Tensors and plain values only (checkpoints load with weights_only): numpy's key array as a tensor."""
        name, keys, position, has_gauss, gauss = np.random.get_state()
        return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position,
                                                       has_gauss, gauss),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        name, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
