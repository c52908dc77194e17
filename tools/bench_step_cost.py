"""Classifier-side cost of one training step as the number of labels L grows (everything else fixed).

A step samples uniform negatives, builds the (query, label) pairs, fetches their rows from the host table,
scores them, backpropagates the sampled BCE into the rows and applies the row-sparse optimizer. None of it
may be O(L): the cost follows the unique rows a step touches (which saturate at B (m + |P|) once L is much
larger than that), so the time per row and, past saturation, the ratio to the smallest L stay near 1.

    python tools/bench_step_cost.py --labels 1e3 1e4 1e5 1e6 --dim 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.config import TableConfig
from astra_ds.negatives.uniform import sample_uniform
from astra_ds.table.table import ClassifierTable
from astra_ds.train.loss import make_pairs, pair_scores, sampled_bce


def step_time(num_labels: int, dim: int, batch: int, num_negatives: int, steps: int) -> tuple[float, float, float]:
    """(seconds per step, unique rows per step, table init seconds)."""
    start = time.perf_counter()
    table = ClassifierTable(num_labels, dim, TableConfig())
    table.init_random(0)
    init_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    calibration = torch.tensor([np.log(20.0), -np.log(num_labels)])
    timings, rows = [], []
    for step in range(steps + 3):
        positives = sp.csr_matrix((np.ones(batch * 3), rng.integers(0, num_labels, batch * 3),
                                   np.arange(0, batch * 3 + 1, 3)), shape=(batch, num_labels))
        positives.sum_duplicates()
        queries = F.normalize(torch.randn(batch, dim), dim=-1)
        t0 = time.perf_counter()
        pairs = make_pairs(positives, sample_uniform(positives, num_negatives, rng), importance_weights=True)
        block, slots = table.fetch(pairs.label)
        loss = sampled_bce(pair_scores(queries, calibration, block.weights, slots, pairs.query, True), pairs, batch)
        loss.backward()
        table.apply_gradients([block])
        if step >= 3:  # warm-up steps excluded
            timings.append(time.perf_counter() - t0)
            rows.append(len(block.global_ids))
    return float(np.median(timings)), float(np.mean(rows)), init_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"batch {args.batch}, {args.negatives} negatives/query, d={args.dim}, median of {args.steps} steps")
    print(f"{'L':>12} {'ms/step':>9} {'ratio':>7} {'rows/step':>10} {'us/row':>7} {'table init s':>13}")
    base = None
    for num_labels in (int(x) for x in args.labels):
        seconds, rows, init_s = step_time(num_labels, args.dim, args.batch, args.negatives, args.steps)
        base = base or seconds
        print(f"{num_labels:>12,} {1000 * seconds:9.2f} {seconds / base:7.2f} {rows:10.0f} "
              f"{1e6 * seconds / rows:7.2f} {init_s:13.2f}")


if __name__ == "__main__":
    main()
