"""Resident memory of an encoding pass (`astra_ds.scoring.encode_queries`, as the classifier stage's start and
every evaluation run it), with the freed pages handed back after each batch and without, in one run.

Each variant runs in its own process (a fresh heap): the dataset's first --queries training texts are tokenised,
then encoded by the pretrained MiniLM; printed are the RSS before and after the pass, its peak, the embeddings'
own size, and the pass's seconds.

    python tools/bench_encode_memory.py --data ../shared/data/WordNetHyper --queries 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("trimmed", "not trimmed")


def measure(data: str, queries: int, max_len: int, batch_size: int, trim: bool) -> dict:
    import resource

    import psutil
    import torch

    import astra_ds.scoring as scoring
    from astra_ds.config import EncoderConfig
    from astra_ds.data.readers import read_dataset
    from astra_ds.data.tokens import tokenize
    from astra_ds.libraries import quiet_libraries
    from astra_ds.encoder.encoder import QueryEncoder, build_tokenizer

    quiet_libraries()
    if not trim:
        scoring.release_free_memory = lambda: None
    cfg = EncoderConfig(model="all-MiniLM-L6-v2")
    texts = read_dataset(data).train.texts[:queries]
    tokens = tokenize(texts, build_tokenizer(cfg), max_len)
    encoder = QueryEncoder(cfg, num_labels=1)
    scoring.release_free_memory()  # both variants start from a trimmed heap
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    embeddings, _ = scoring.encode_queries(encoder, tokens, batch_size, torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - started
    return {"rss_before": before, "rss_after": psutil.Process().memory_info().rss,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "embeddings": embeddings.numel() * 4, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset directory (training texts are encoded)")
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256, help="eval.batch_size")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.data, args.queries, args.max_len, args.batch_size, args.variant == "trimmed")))
        return
    gib = 2 ** 30
    print(f"{args.queries} queries of {args.data}, max_len {args.max_len}, batch {args.batch_size}")
    print(f"{'variant':<12}{'RSS before':>12}{'after':>9}{'growth':>9}{'peak':>9}{'embeddings':>12}{'seconds':>9}")
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--variant", variant],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:<12}{r['rss_before'] / gib:11.2f}G{r['rss_after'] / gib:8.2f}G"
              f"{(r['rss_after'] - r['rss_before']) / gib:8.2f}G{r['peak'] / gib:8.2f}G"
              f"{r['embeddings'] / gib:11.2f}G{r['seconds']:9.1f}")


if __name__ == "__main__":
    main()
