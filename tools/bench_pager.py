"""Paging throughput of the classifier table: gather -> device -> update -> write-back, next to the machine's
memcpy bandwidth measured in the same run (the physical limit of moving the same bytes).

Each step pages U random rows of an L x d table (their row-wise Adagrad state too) to the compute device,
applies a gradient and writes rows and state back. Bytes moved a step = U x (row + state) x 2 (read, then
written). Modes:
  sync       fetch, update, write back, one after the other
  prefetch   the next step's rows are paged while this step updates (on CUDA: pinned staging, a side stream
             for the host-to-device copy, rows the update changed patched in the prefetched block); on a CPU
             the "device" is host memory and both modes do the same work

    python tools/bench_pager.py --labels 1e7 --dim 64 --rows 1024 4096 16384 65536
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from astra_ds.config import TableConfig
from astra_ds.table.pager import RowPager
from astra_ds.table.table import ClassifierTable


def memcpy_gbs(num_bytes: int, repeats: int = 5) -> dict[str, float]:
    """Best-of copy bandwidth (GB/s of bytes copied): host to host, and on CUDA pinned host <-> device."""
    src, dst = torch.empty(num_bytes, dtype=torch.uint8), torch.empty(num_bytes, dtype=torch.uint8)
    src.fill_(1)
    dst.fill_(0)  # pages touched before timing
    results = {"host memcpy": _best(lambda: dst.copy_(src), num_bytes, repeats)}
    if torch.cuda.is_available():
        pinned, device = src.pin_memory(), torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
        results["host->GPU (pinned)"] = _best(lambda: device.copy_(pinned, non_blocking=True), num_bytes, repeats)
        results["GPU->host (pinned)"] = _best(lambda: pinned.copy_(device, non_blocking=True), num_bytes, repeats)
    return results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(copy, num_bytes: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        copy()
        _sync()
        times.append(time.perf_counter() - start)
    return num_bytes / min(times) / 1e9


def page_steps(table: ClassifierTable, rows_per_step: int, steps: int, prefetch: bool, seed: int = 0) -> float:
    """Median seconds of one paging step (after 2 warm-up steps)."""
    rng = np.random.default_rng(seed)
    ids = [torch.from_numpy(np.sort(rng.choice(table.num_labels, rows_per_step, replace=False)))
           for _ in range(steps + 2)]
    grad = torch.full((rows_per_step, table.dim), 1e-3, device=table.device)
    times = []
    pager = RowPager(table)
    prefetched = pager.prefetch(ids[0]) if prefetch else None
    for step in range(steps + 2):
        _sync()
        start = time.perf_counter()
        block, _ = pager.fetch(ids[step], prefetched) if prefetch else table.fetch(ids[step])
        block.weights.grad = grad
        if prefetch and step + 1 < len(ids):
            prefetched = pager.prefetch(ids[step + 1])  # pages while this step's update runs
        pager.apply_gradients([block])
        _sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=float, default=1e7, help="table rows L")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                        help="rows paged a step (a step of B queries x m negatives pages about B x m)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_labels = int(args.labels)

    table = ClassifierTable(num_labels, args.dim, TableConfig(dtype=args.dtype), device)
    table.init_random(0)
    row_bytes = args.dim * table.rows.element_size() + 4  # the row and its Adagrad accumulator
    print(f"table {num_labels:,} x {args.dim} {args.dtype} ({num_labels * row_bytes / 2**30:.1f} GiB with optimizer "
          f"state) on {'CUDA, pinned host memory' if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads")
    limits = memcpy_gbs(256 * 2**20)
    for name, gbs in limits.items():
        print(f"{name:>20}: {gbs:6.2f} GB/s (256 MiB, best of 5)")
    limit = limits["host memcpy"]
    print(f"\n{'rows/step':>10} {'mode':>9} {'ms/step':>9} {'Mrows/s':>8} {'GB/s':>7} {'of memcpy':>10}")
    for rows in args.rows:
        for prefetch in (False, True):
            seconds = page_steps(table, rows, args.steps, prefetch)
            gbs = rows * row_bytes * 2 / seconds / 1e9
            print(f"{rows:>10,} {'prefetch' if prefetch else 'sync':>9} {1000 * seconds:9.2f} "
                  f"{rows / seconds / 1e6:8.2f} {gbs:7.2f} {gbs / limit:9.1%}")


if __name__ == "__main__":
    main()
