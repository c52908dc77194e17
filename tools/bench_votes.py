"""What the kNN votes of the training queries cost at inference: the top-k search of a finished run with votes
(eval.neighbour_weight > 0) against the same run without them (eval.neighbour_weight=0), per query (batches of 1,
as a serving stack sees them) and per batch, exact and through the serving index, in one run. The queries are the
run's validation (or test) queries, encoded once; the encoder's time is left out (tools/bench_inference.py).

    python tools/bench_votes.py --run-dir runs/wordnet_hyper --queries 200 --batch 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import astra_ds
from astra_ds.data.queries import RowsOf


def seconds_per_query(model, queries, batch: int, exact: bool, k: int) -> float:
    model.topk(queries[:batch], k, exact)  # the rows, the votes and the index read before timing
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        model.topk(queries[start:start + batch], k, exact)
    return (time.perf_counter() - started) / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished run trained with kNN votes")
    parser.add_argument("--queries", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--batch", type=int, default=256, help="the batch of the batched timing")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    voted = astra_ds.load(args.run_dir)
    if not voted.cfg.eval.neighbour_weight:
        parser.error(f"{args.run_dir} ranks without kNN votes (eval.neighbour_weight is 0)")
    plain = astra_ds.load(args.run_dir, ["eval.neighbour_weight=0"])
    data = voted.load_data()
    split = data.validation or data.test
    count = min(len(split.tokens), max(args.queries, 4 * args.batch))
    queries, _ = voted.encode_tokens(RowsOf(split.tokens, np.arange(count)))
    print(f"{args.run_dir}: {voted.num_labels} labels, {voted.neighbour_votes().end} training queries, "
          f"d = {queries.shape[1]}, {len(queries)} {split.name} queries")
    print("search | batch | without votes ms/query | with votes ms/query | ratio")
    for exact in (True, False):
        if not exact and voted.index is None:
            continue
        for batch, count in ((1, args.queries), (args.batch, len(queries))):
            times = [seconds_per_query(model, queries[:count], batch, exact, args.k) * 1e3 for model in (plain, voted)]
            print(f"{'exact' if exact else 'index'} | {batch} | {times[0]:.2f} | {times[1]:.2f} | "
                  f"{times[1] / times[0]:.1f}")


if __name__ == "__main__":
    main()
