"""Resident memory and speed of encoder training steps on batches of similar lengths (`batching.length_pools`,
as the recipes train), by the capacity of the caches of compiled matmul kernels, in one run.

Under bfloat16 autocast on a CPU, PyTorch runs the matmuls through oneDNN, which compiles a kernel for each shape
it meets; oneDNN (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and PyTorch's ideep in front of it (LRU_CACHE_CAPACITY) keep
1024 each by default, and astra_ds sets both to astra_ds.libraries.KERNEL_CACHE_CAPACITY. Batches padded to their
longest text have a new shape at nearly every length, so the caches fill with kernels of past lengths. Each
variant runs in its own process with both variables at one capacity (they are read once); printed are the RSS
after the first step and after the last, the peak, and the steps a second past the first.

    python tools/bench_step_memory.py --data ../shared/data/Bibtex --max-len 96 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from astra_ds.libraries import KERNEL_CACHES
from astra_ds.encoder.encoder import MINILM

CAPACITIES = ("1024", "256", "64", "16")  # 1024: the libraries' default (ideep's crashes at 0)


def measure(data: str, model: str, max_len: int, batch_size: int, steps: int, compute_dtype: str) -> dict:
    import resource

    import numpy as np
    import psutil
    import torch

    from astra_ds.config import BatchingConfig, EncoderConfig
    from astra_ds.data.readers import read_dataset
    from astra_ds.data.tokens import tokenize
    from astra_ds.libraries import quiet_libraries, release_free_memory
    from astra_ds.encoder.encoder import QueryEncoder, build_tokenizer
    from astra_ds.training.batching import RandomBatches

    quiet_libraries()
    torch.manual_seed(0)
    cfg = EncoderConfig(model=model, compute_dtype=compute_dtype)
    texts = read_dataset(data).train.texts[:steps * batch_size]
    tokens = tokenize(texts, build_tokenizer(cfg), max_len)
    batches = RandomBatches(BatchingConfig(length_pools=20), len(texts), batch_size, seed=0, dim=0, stream=0,
                            lengths_of=tokens.lengths.__getitem__).epoch_batches(0)
    encoder = QueryEncoder(cfg, num_labels=1)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    first_rss, started = 0, 0.0
    for step, rows in enumerate(batches):
        queries = encoder(*tokens.batch(rows))[0]
        torch.logsumexp(queries @ queries.T, dim=1).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del queries
        release_free_memory()  # as the trainer does after each encoder step
        if step == 0:
            first_rss, started = rss(), time.perf_counter()
    return {"first": first_rss, "last": rss(), "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "steps_per_s": (len(batches) - 1) / (time.perf_counter() - started),
            "lengths": len(np.unique(tokens.lengths[np.asarray(batches)].max(axis=1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset directory (its first training texts are used)")
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--capacities", nargs="+", default=list(CAPACITIES),
                        help="kernels each cache keeps, one process each")
    parser.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.data, args.model, args.max_len, args.batch_size, args.steps,
                                 args.compute_dtype)))
        return
    gib = 2 ** 30
    print(f"{args.steps} steps of {args.batch_size} queries of {args.data}, max_len {args.max_len}, "
          f"{args.compute_dtype}, batches of similar lengths")
    print(f"{'kernel cache':<14}{'RSS step 1':>11}{'last':>9}{'growth':>9}{'peak':>9}{'steps/s':>9}")
    for capacity in args.capacities:
        env = {**os.environ, **{variable: capacity for variable in KERNEL_CACHES}}
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--variant"],
                             check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{capacity:<14}{r['first'] / gib:10.2f}G{r['last'] / gib:8.2f}G{(r['last'] - r['first']) / gib:8.2f}G"
              f"{r['peak'] / gib:8.2f}G{r['steps_per_s']:9.2f}")
    print(f"{r['lengths']} distinct batch lengths")


if __name__ == "__main__":
    main()
