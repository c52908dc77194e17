"""The order in which training queries form mini-batches: random, or NGAME clusters.

Clustered batching groups the queries by balanced k-means on their current embeddings: recursive balanced
2-means (NGAME's algorithm), where every split sends whole multiples of cluster_size queries to each side, so
all clusters hold exactly cluster_size queries but one (the remainder). An epoch's batches are the clusters in
a random order, concatenated and cut every batch_size queries: the other queries of a batch are similar, and
their positives are hard in-batch negatives. Random batches are used until the first clustering.

The clusters come from the embeddings the training steps computed (a QueryBank fed by `observe`, in fp16 on
the host), so clustering costs no encoding pass; only queries no step has seen are encoded. The state is the
clustered permutation of the queries and the bank, so a resumed run gets the same batches.

The modes (`batching.mode`, registry BATCHING in astra_ds/choices.py): RandomBatches, ClusteredBatches.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from astra_ds.collectives import computed_on_main
from astra_ds.config import BatchingConfig
from astra_ds.plan import PlanLine
from astra_ds.rng import Stream, numpy_rng, stream_key
from astra_ds.training.permutation import KeyedPermutation

BATCH_ORDER = 1  # the counter of the batches' own order (length pools), after the epoch's


def balanced_2means(x: np.ndarray, left_size: int, rng: np.random.Generator, iters: int = 8) -> np.ndarray:
    """Rows of unit vectors `x` ordered so that the first `left_size` form one spherical cluster and the
    rest the other: each iteration sends the rows most similar to centroid 0 (relative to centroid 1) left."""
    centroids = x[rng.choice(len(x), 2, replace=False)]
    for _ in range(iters):
        order = np.argsort(x @ (centroids[1] - centroids[0]), kind="stable")
        centroids = np.stack([x[order[:left_size]].sum(0), x[order[left_size:]].sum(0)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return order


def balanced_clusters(embeddings: np.ndarray, cluster_size: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the rows of `embeddings` (N, d) in which each run of cluster_size rows is a cluster."""
    x = embeddings.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    clusters, stack = [], [np.arange(len(x))]
    while stack:  # depth first, left before right: the output order is a function of the inputs only
        node = stack.pop()
        if len(node) <= cluster_size:
            clusters.append(node)
            continue
        left_size = cluster_size * (math.ceil(len(node) / cluster_size) // 2)
        order = node[balanced_2means(x[node], left_size, rng)]
        stack += [order[left_size:], order[:left_size]]
    return np.concatenate(clusters)


class QueryBank:
    """The latest embedding of every training query (fp16, host), as the training steps computed them."""

    def __init__(self, num_queries: int, dim: int):
        self.embeddings = torch.zeros((num_queries, dim), dtype=torch.float16)
        self.seen = np.zeros(num_queries, bool)

    def store(self, query_ids: np.ndarray, queries: torch.Tensor) -> None:
        self.embeddings[query_ids] = queries.half()
        self.seen[query_ids] = True

    def state_dict(self) -> dict:  # tensors only: checkpoints load with weights_only
        return {"embeddings": self.embeddings, "seen": torch.from_numpy(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings, self.seen = state["embeddings"], state["seen"].numpy()


class EpochBatches:
    """The batches of an epoch by position (0 ... steps - 1), each computed when asked for; np.asarray gives them
    all, (steps, batch_size)."""

    def __init__(self, rows_of: Callable[[int], np.ndarray], steps: int):
        self.rows_of, self.steps = rows_of, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, position: int) -> np.ndarray:
        if not 0 <= position < self.steps:
            raise IndexError(f"an epoch of {self.steps} steps has no step {position}")
        return self.rows_of(position)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.stack([self[position] for position in range(self.steps)]).astype(dtype or np.int64)


class RandomBatches:
    """The (steps_per_epoch, batch_size) query rows of each epoch: a keyed permutation of the queries, a function
    of (seed, stream, epoch); with `lengths_of` and batching.length_pools, batches of queries of similar lengths:
    each pool of length_pools batches of the permutation sorted by length, the batches in a random order."""

    def __init__(self, cfg: BatchingConfig, num_queries: int, batch_size: int, seed: int, dim: int, stream: int,
                 lengths_of: Callable[[np.ndarray], np.ndarray] | None = None):
        """`dim`: the width of the query embeddings; `stream`: the random stream of the stage the batches are for
        (each stage draws its own orders); `lengths_of(rows)`: the queries' token counts, for a stage that encodes
        them."""
        self.cfg, self.num_queries, self.batch_size, self.seed = cfg, num_queries, batch_size, seed
        self.stream, self.lengths_of = stream, lengths_of
        self.steps_per_epoch = num_queries // batch_size
        self.clustered_order: np.ndarray | None = None  # ClusteredBatches: None until the first clustering

    @staticmethod
    def memory(num_queries: int, dim: int) -> list[PlanLine]:
        """What the batches hold beyond the query ids (astra_ds/plan.py)."""
        return []

    def observe(self, query_ids: np.ndarray, queries: torch.Tensor) -> None:
        """The embeddings (host) a training step computed for these queries."""

    def on_epoch_start(self, epoch: int, train_queries: Callable[[np.ndarray], torch.Tensor]) -> dict:
        """Work due before an epoch's batches are drawn; values for the training log."""
        return {}

    def epoch_batches(self, epoch: int) -> "EpochBatches":
        """The batches of `epoch`: random ones are computed a step at a time from a keyed permutation of the
        queries (no O(N) order, whatever N); NGAME's clusters are an order held whole."""
        if self.clustered_order is not None:  # whole clusters in a random order
            rng = numpy_rng(self.seed, Stream.EPOCH_ORDER, self.stream, epoch)
            cluster_of = np.arange(self.num_queries) // self.cfg.cluster_size
            rank_of_cluster = np.argsort(rng.permutation(cluster_of[-1] + 1))
            order = self.clustered_order[np.argsort(rank_of_cluster[cluster_of], kind="stable")]
            return EpochBatches(lambda position: order[self._span(position)], self.steps_per_epoch)
        queries = KeyedPermutation(self.num_queries, stream_key(self.seed, Stream.EPOCH_ORDER, self.stream, epoch))
        if not (self.cfg.length_pools and self.lengths_of is not None):
            return EpochBatches(lambda position: queries[self._span(position)], self.steps_per_epoch)
        batches = KeyedPermutation(self.steps_per_epoch,
                                   stream_key(self.seed, Stream.EPOCH_ORDER, self.stream, epoch, BATCH_ORDER))
        return EpochBatches(lambda position: self._similar_lengths(queries, int(batches[position])),
                            self.steps_per_epoch)

    def _span(self, batch: int) -> np.ndarray:
        return np.arange(batch * self.batch_size, (batch + 1) * self.batch_size)

    def _similar_lengths(self, queries: KeyedPermutation, batch: int) -> np.ndarray:
        """Batch `batch` of the pools of length_pools batches of `queries`, each pool sorted by query length."""
        pools = self.cfg.length_pools
        first = batch // pools * pools
        rows = queries[np.arange(first * self.batch_size, min(first + pools, self.steps_per_epoch) * self.batch_size)]
        rows = rows[np.argsort(self.lengths_of(rows), kind="stable")]
        return rows[self._span(batch - first)]

    @staticmethod
    def rank_part(batch_rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """This rank's disjoint, contiguous part of a global batch (sizes differ by at most one)."""
        return np.array_split(batch_rows, world_size)[rank]

    def state_dict(self) -> dict:
        order = None if self.clustered_order is None else torch.from_numpy(self.clustered_order)
        return {"seed": self.seed, "clustered_order": order, "bank": None}

    def load_state_dict(self, state: dict) -> None:
        order = None if state["clustered_order"] is None else state["clustered_order"].numpy()
        if order is not None and len(order) != self.num_queries:
            raise ValueError(f"batch sampler state covers {len(order)} queries, this run has {self.num_queries}")
        self.seed, self.clustered_order = state["seed"], order


class ClusteredBatches(RandomBatches):
    """NGAME: random batches for batching.warmup_epochs, then whole clusters of similar queries."""

    def __init__(self, cfg: BatchingConfig, num_queries: int, batch_size: int, seed: int, dim: int, stream: int,
                 lengths_of: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(cfg, num_queries, batch_size, seed, dim, stream, lengths_of)
        self.bank = QueryBank(num_queries, dim)

    @staticmethod
    def memory(num_queries: int, dim: int) -> list[PlanLine]:
        return [PlanLine("NGAME query embeddings", num_queries * (dim * 2 + 1), advice="batching.mode=random",
                         per_query=True)]

    def clustering_due(self, epoch: int) -> bool:
        """Clusters are (re)built at epochs W, W + C, W + 2C, ... (W warm-up epochs, C = recluster_every)."""
        warmup, every = self.cfg.warmup_epochs, self.cfg.recluster_every
        return epoch >= warmup and (epoch - warmup) % every == 0

    def recluster(self, embeddings: np.ndarray, epoch: int) -> np.ndarray:
        rng = numpy_rng(self.seed, Stream.CLUSTERS, self.stream, epoch)
        self.clustered_order = balanced_clusters(embeddings, self.cfg.cluster_size, rng)
        return self.clustered_order

    def observe(self, query_ids: np.ndarray, queries: torch.Tensor) -> None:
        self.bank.store(query_ids, queries)

    def on_epoch_start(self, epoch: int, train_queries: Callable[[np.ndarray], torch.Tensor]) -> dict:
        """Cluster the bank's embeddings into the batches of the coming epochs, when due; queries no step has seen
        (the dropped last batches) are encoded with `train_queries` first. Rank 0 clusters, every rank gets its
        order."""
        if not self.clustering_due(epoch):
            return {}
        started = time.time()
        unseen = np.flatnonzero(~self.bank.seen)
        if len(unseen):
            self.bank.store(unseen, train_queries(unseen))
        self.clustered_order = computed_on_main(lambda: self.recluster(self.bank.embeddings.float().numpy(), epoch),
                                                self.num_queries)
        return {"recluster_s": time.time() - started, "reclustered_unseen": len(unseen)}

    def state_dict(self) -> dict:
        return super().state_dict() | {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state["bank"] is not None:
            self.bank.load_state_dict(state["bank"])
