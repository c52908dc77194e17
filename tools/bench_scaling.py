"""Time per training step as the number of labels L grows, everything else fixed, against a dense baseline.

    classifier   our classifier side alone: uniform negatives, pairs, rows paged from the host table, scores,
                 sampled BCE backward into the rows, row-sparse Adagrad, write-back
    whole step   `Trainer.train_step` on a synthetic dataset of L labels: encoder forward/backward under
                 DeepSpeed plus the classifier side
    dense        plain PyTorch: the same encoder, logits against all L rows, BCE over all L labels, backward,
                 a dense SGD step on the L x d weights (cheaper than Adagrad); run up to where it fits

Each column prints the median step time and its ratio to the smallest L. None of our per-step work is O(L),
so our ratios stay near 1; the dense ones grow with L.

    python tools/bench_scaling.py --labels 1e4 1e5 1e6 1e7
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from astra_ds.config import TableConfig, load_config
from astra_ds.data.synth import SynthConfig, generate
from astra_ds.negatives.uniform import sample_uniform
from astra_ds.table.table import ClassifierTable
from astra_ds.training.step import classifier_loss


def median_time(step, steps: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def classifier_step_time(num_labels: int, dim: int, batch: int, num_negatives: int, steps: int) -> tuple[float, float]:
    """(median seconds of our classifier side, unique rows a step)."""
    table = ClassifierTable(num_labels, dim, TableConfig())
    table.init_random(0)
    rng = np.random.default_rng(0)
    calibration = torch.tensor([np.log(20.0), -np.log(num_labels)])
    rows = []

    def step(_):
        positives = sp.csr_matrix((np.ones(batch * 3), rng.integers(0, num_labels, batch * 3),
                                   np.arange(0, batch * 3 + 1, 3)), shape=(batch, num_labels))
        positives.sum_duplicates()
        queries = F.normalize(torch.randn(batch, dim), dim=-1)
        part = classifier_loss(table, queries, calibration, positives, sample_uniform(positives, num_negatives, rng))
        part.loss.backward()
        table.apply_gradients([part.block])
        rows.append(len(part.block.global_ids))

    return median_time(step, steps), float(np.mean(rows))


def dataset(root: Path, num_labels: int, num_train: int) -> Path:
    cfg = SynthConfig(num_labels=num_labels, num_train=num_train, num_test=64, vocab_size=5000, label_texts=False)
    return generate(cfg, root / f"L{num_labels}", exist_ok=True)


def whole_step_time(data: Path, encoder: str, dim: int, batch: int, num_negatives: int, steps: int) -> float:
    from astra_ds.dist import init_distributed
    from astra_ds.training.trainer import Trainer

    cfg = load_config(None, [f"data.path={data}", f"encoder.model={encoder}", f"encoder.dim={dim}",
                             f"train.batch_size={batch}", f"negatives.num_negatives={num_negatives}",
                             f"out_dir={tempfile.mkdtemp(prefix='bench_scaling_')}"])
    trainer = Trainer(cfg, init_distributed(), progress=False)
    trainer.parts.initialize_rows()
    order = trainer.stages[-1].batches.epoch_batches(0)
    seconds = median_time(lambda i: trainer.stages[-1].step(order[i % len(order)], i), steps)
    del trainer
    gc.collect()
    return seconds


def dense_step_time(data: Path, encoder_name: str, dim: int, batch: int, steps: int, num_labels: int) -> float | None:
    """Median seconds of a dense full-label step, or None when its tensors would not fit in memory."""
    from astra_ds.data.prepare import prepare_data
    from astra_ds.encoder.encoder import QueryEncoder, build_tokenizer

    # weights, their gradient, logits and their gradient, BCE's temporaries (float32)
    need = num_labels * dim * 4 * 2 + batch * num_labels * 4 * 4
    if need > 0.7 * psutil.virtual_memory().available:
        return None
    cfg = load_config(None, [f"data.path={data}", f"encoder.model={encoder_name}", f"encoder.dim={dim}"])
    prepared = prepare_data(cfg, build_tokenizer(cfg.encoder))
    torch.manual_seed(0)
    encoder = QueryEncoder(cfg.encoder, num_labels)
    weights = torch.nn.Parameter(torch.randn(num_labels, dim) * 0.02)
    optimizer = torch.optim.SGD([*encoder.parameters(), weights], lr=1e-3)

    def step(i):
        rows = np.arange(i * batch, (i + 1) * batch) % len(prepared.train)
        input_ids, attention_mask = prepared.train.batch(rows)
        queries, calibration = encoder(input_ids, attention_mask)
        logits = calibration[0].exp() * queries @ F.normalize(weights, dim=-1).T + calibration[1]
        targets = torch.from_numpy(prepared.train.labels(rows).toarray()).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / batch
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    seconds = median_time(step, steps)
    del weights, optimizer, encoder
    gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 or tiny-random")
    parser.add_argument("--dim", type=int, default=64, help="classifier dimension (a projection of the encoder)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 3 warm-up steps)")
    parser.add_argument("--data-root", default="data/bench_scaling", help="synthetic datasets, kept between runs")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from astra_ds.libraries import quiet_libraries

    quiet_libraries()
    sizes = [int(x) for x in args.labels]
    print(f"batch {args.batch}, {args.negatives} uniform negatives/query, d={args.dim}, encoder {args.encoder}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'L':>12} | {'classifier ms':>13} {'ratio':>6} {'rows':>6} | {'whole step ms':>13} {'ratio':>6} | "
          f"{'dense ms':>9} {'ratio':>7}")
    base = {}
    for num_labels in sizes:
        data = dataset(Path(args.data_root), num_labels, num_train=args.batch * (args.steps + 3))
        classifier, rows = classifier_step_time(num_labels, args.dim, args.batch, args.negatives, args.steps)
        whole = whole_step_time(data, args.encoder, args.dim, args.batch, args.negatives, args.steps)
        dense = None if args.no_dense else dense_step_time(data, args.encoder, args.dim, args.batch, args.steps,
                                                           num_labels)
        base = base or {"classifier": classifier, "whole": whole, "dense": dense}
        dense_text = (f"{1000 * dense:9.1f} {dense / base['dense']:7.2f}" if dense and base["dense"]
                      else f"{'-':>9} {'no fit' if not args.no_dense else '':>7}")
        print(f"{num_labels:>12,} | {1000 * classifier:13.2f} {classifier / base['classifier']:6.2f} {rows:6.0f} | "
              f"{1000 * whole:13.1f} {whole / base['whole']:6.2f} | {dense_text}", flush=True)


if __name__ == "__main__":
    main()
