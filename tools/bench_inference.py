"""Inference latency: the encoder per query, and the top-k search per query, exact against the serving index
(ANN), at several label counts, with the recall@k of ANN against exact, in one run.

Rows are synthetic and clustered like trained classifier rows (sqrt(L) topics, each row a unit vector near its
topic); queries are unit vectors near the topics of random labels. The index is the serving index of a run
(astra_ds.index.label_index.LabelIndex, its kind chosen by L as `astra-ds index` chooses it: HNSW, IVF-Flat,
IVF-PQ). Search times are per single query (batch of 1), as a serving stack sees them; exact search is the
blockwise exact top-k of `astra-ds predict --exact`.

    python tools/bench_inference.py --labels 1e5 1e6 1e7 --dim 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from astra_ds.config import EncoderConfig, IndexConfig
from astra_ds.index.label_index import LabelIndex
from astra_ds.scoring.rows import ScoringRows, exact_topk, recall_at_k


class SyntheticRows:
    """L clustered unit rows, generated a block at a time into one float32 tensor."""

    def __init__(self, num_labels: int, dim: int, seed: int = 0, block: int = 1 << 20):
        generator = torch.Generator().manual_seed(seed)
        self.num_topics = max(1, int(np.sqrt(num_labels)))
        self.topics = F.normalize(torch.randn(self.num_topics, dim, generator=generator), dim=1)
        self.rows = torch.empty(num_labels, dim)
        for start in range(0, num_labels, block):
            end = min(start + block, num_labels)
            topic = torch.randint(self.num_topics, (end - start,), generator=generator)
            noise = torch.randn(end - start, dim, generator=generator) * (0.5 / np.sqrt(dim))
            self.rows[start:end] = F.normalize(self.topics[topic] + noise, dim=1)
        self.start, self.end, self.dim, self.device = 0, num_labels, dim, torch.device("cpu")

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return self.rows[start:end]

    def queries(self, count: int, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        topic = torch.randint(self.num_topics, (count,), generator=generator)
        noise = torch.randn(count, self.dim, generator=generator) * (0.7 / np.sqrt(self.dim))
        return F.normalize(self.topics[topic] + noise, dim=1)


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1e3), float(np.percentile(seconds, 99) * 1e3)


def time_each(search, queries: torch.Tensor) -> list[float]:
    times = []
    for i in range(len(queries)):
        started = time.perf_counter()
        search(queries[i:i + 1])
        times.append(time.perf_counter() - started)
    return times


def encoder_times(model: str, count: int, max_len: int) -> list[float]:
    """Per-query seconds of tokenising and encoding one short text (batch of 1)."""
    from astra_ds.libraries import quiet_libraries
    from astra_ds.encoder.encoder import QueryEncoder, build_tokenizer

    quiet_libraries()
    cfg = EncoderConfig(model=model)
    tokenizer, encoder = build_tokenizer(cfg), QueryEncoder(cfg, 1).eval()
    words = "extreme classification tags a query with its relevant labels out of millions".split()
    texts = [" ".join(words[i % 5:i % 5 + 6]) for i in range(count)]
    times = []
    with torch.no_grad():
        for text in texts:
            started = time.perf_counter()
            batch = tokenizer([text], max_length=max_len, truncation=True, return_tensors="pt")
            encoder(batch["input_ids"], batch["attention_mask"])
            times.append(time.perf_counter() - started)
    return times[1:]  # the first call warms up


def bench_labels(num_labels: int, args, cfg: IndexConfig) -> str:
    """The table line of L = num_labels."""
    rows = SyntheticRows(num_labels, args.dim)
    scoring = ScoringRows(rows, normalize=False)
    queries = rows.queries(args.queries)
    index = LabelIndex(cfg, normalize_rows=False)
    report = index.build(scoring, np.random.default_rng(0))
    index.search(queries[:1], args.k)  # warm-up
    ann = time_each(lambda q: index.search(q, args.k), queries)
    exact = time_each(lambda q: exact_topk(q, scoring, args.k, False, progress=False), queries[:args.exact_queries])
    _, exact_ids = exact_topk(queries, scoring, args.k, False, progress=False)
    _, ann_ids = index.search(queries, args.k)
    recall = recall_at_k(ann_ids, exact_ids.numpy())
    (exact_p50, exact_p99), (ann_p50, ann_p99) = percentiles_ms(exact), percentiles_ms(ann)
    return (f"{num_labels:>12,} {report.kind:>9} {report.seconds:>8.1f} | {exact_p50:>12.2f} {exact_p99:>8.2f} "
            f"{1e3 / exact_p50:>7.1f} | {ann_p50:>10.3f} {ann_p99:>7.3f} {1e3 / ann_p50:>7.0f} | "
            f"{exact_p50 / ann_p50:>7.0f}x {recall:>9.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=500, help="queries timed against the index")
    parser.add_argument("--exact-queries", type=int, default=20, help="queries timed one by one with exact search")
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="encoder timed per query ('none': skip)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an index setting, e.g. --set nprobe=64 (see the index section of the run config)")
    args = parser.parse_args()
    overrides = {key: type(getattr(IndexConfig(), key) or 0)(value)
                 for key, value in (item.split("=", 1) for item in args.set)}
    cfg = IndexConfig(**overrides)
    print(f"torch threads {torch.get_num_threads()} | d = {args.dim} | k = {args.k} | index settings {overrides or 'defaults'}")
    if args.encoder != "none":
        p50, p99 = percentiles_ms(encoder_times(args.encoder, 101, 32))
        print(f"encoder {args.encoder}, one query (tokenise + forward): p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
              f"{1e3 / p50:.0f} queries/s")
    header = (f"{'labels':>12} {'index':>9} {'build s':>8} | {'exact p50 ms':>12} {'p99':>8} {'q/s':>7} | "
              f"{'ANN p50 ms':>10} {'p99':>7} {'q/s':>7} | {'speed-up':>8} {f'recall@{args.k}':>9}")
    print(header)
    for num_labels in map(int, args.labels):
        print(bench_labels(num_labels, args, cfg), flush=True)


if __name__ == "__main__":
    main()
