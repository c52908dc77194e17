"""The cost of the table's part of a checkpoint, with the digests that make damage detectable, in one run:

  full save        every chunk written (the first checkpoint, or the run's final table)
  full digest      BLAKE2b of every file just written (what the first save of a process pays)
  next save        `--changed` of the chunks rewritten, the others cloned (reflink) or hard-linked
  next digest      digests of the new chunks only (linked chunks hit the cache of file identities)
  verify           every digest checked again, as a resume does (cold cache)

    python tools/bench_checkpoint.py --labels 1e7 --dim 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from astra_ds.config import TableConfig
from astra_ds.digests import DigestCache, damaged_files, manifest
from astra_ds.files import files_under
from astra_ds.table.table import ClassifierTable


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=float, default=1e7)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--changed", type=float, default=0.05, help="share of the chunks a step range changes")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    table = ClassifierTable(int(args.labels), args.dim, TableConfig(dtype=args.dtype))
    table.init_random(0)
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
    try:
        first, second = root / "global_step1", root / "global_step2"
        save_full, _ = timed(lambda: table.save_files(first, None))
        files = files_under(first)
        size = sum((first / name).stat().st_size for name in files)
        cache = DigestCache()
        digest_full, digests = timed(lambda: manifest(first, files, cache))

        chunks = len(table.dirty)
        changed = np.random.default_rng(0).choice(chunks, max(1, int(args.changed * chunks)), replace=False)
        for chunk in changed:
            start = chunk * table.chunk_rows
            table.rows[start:start + table.chunk_rows] += torch.tensor(0.01, dtype=table.rows.dtype)
        table.dirty[changed] = True
        save_next, _ = timed(lambda: table.save_files(second, first))
        digest_next, digests_next = timed(lambda: manifest(second, files_under(second), cache))
        verify, damaged = timed(lambda: damaged_files(second, digests_next, DigestCache()))
        assert not damaged
        gb = size / 1e9
        print(f"table {int(args.labels):,} x {args.dim} {args.dtype} + row-wise Adagrad state: {len(files)} files, "
              f"{gb:.2f} GB, {chunks} chunks of {table.chunk_rows:,} rows; {len(changed)} chunks changed")
        print(f"{'full save':<14}{save_full:8.2f} s  {gb / save_full:6.2f} GB/s")
        print(f"{'full digest':<14}{digest_full:8.2f} s  {gb / digest_full:6.2f} GB/s  "
              f"(+{100 * digest_full / save_full:.0f}% on the full save)")
        print(f"{'next save':<14}{save_next:8.2f} s")
        print(f"{'next digest':<14}{digest_next:8.2f} s  (+{100 * digest_next / save_next:.0f}% on the next save)")
        print(f"{'verify':<14}{verify:8.2f} s  {gb / verify:6.2f} GB/s  (once, on resume)")
        print(f"digests of the first save: {len(digests)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
