"""List the checkpoints of a run: tag, step, stage, world size, components, and a checksum of each rank's
table shard (rows and optimizer state, as the ranks that wrote it held them).

    python tools/inspect_checkpoint.py runs/synthetic/checkpoints
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from astra_ds.errors import CheckpointError
from astra_ds.table import store
from astra_ds.training.checkpoint import CHECKPOINT_PREFIX, LATEST, check_checkpoint, step_of


def shard_checksums(table_dir: Path, world_size: int) -> list[str]:
    group = store.open_table(table_dir)
    names = ["rows", *(f"optim/{name}" for name in group["optim"].array_keys())] if "optim" in group else ["rows"]
    geometry = store.ShardGeometry(group.attrs["num_labels"], group.attrs["chunk_rows"], world_size)
    sums = []
    for rank in range(world_size):
        start, end = geometry.range(rank)
        digest = hashlib.sha1()
        for name in names:
            digest.update(np.ascontiguousarray(group[name][start:end]).tobytes())
        sums.append(f"rank {rank} [{start}, {end}) {digest.hexdigest()[:12]}")
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="a run's checkpoint.dir (default <out_dir>/checkpoints)")
    args = parser.parse_args()
    if not args.checkpoint_dir.is_dir():
        raise SystemExit(f"inspect_checkpoint: no directory {args.checkpoint_dir}")
    latest_file = args.checkpoint_dir / LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    tags = sorted((p for p in args.checkpoint_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir()),
                  key=lambda p: step_of(p.name))
    for path in tags:
        marker = " (latest)" if path.name == latest else ""
        try:
            meta = check_checkpoint(path)
        except CheckpointError as err:
            print(f"{path.name}{marker}: unusable: {err}")
            continue
        print(f"{path.name}{marker}: step {meta['step']} ({meta['stage']} stage), {meta['world_size']} ranks, "
              f"components {', '.join(meta['components'])}")
        for line in shard_checksums(path / "table",  # the table component's files
                                    meta["world_size"]):
            print(f"    {line}")


if __name__ == "__main__":
    main()
