"""The table on disk: a zarr v3 group of row-chunked arrays in global label order.

    <path>/rows            (L, d) classifier rows
    <path>/optim/<name>    (L, ...) row-sparse optimizer state, same row chunking
    attrs: num_labels, dim, chunk_rows, optimizer

Shards are contiguous, chunk-aligned row ranges, so each rank reads and writes whole chunks of its own and the
files do not depend on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr


@dataclass(frozen=True)
class ShardGeometry:
    """How L rows split into chunks of `chunk_rows` and into W contiguous, chunk-aligned rank shards."""

    num_labels: int
    chunk_rows: int
    world_size: int

    @classmethod
    def of(cls, num_labels: int, dim: int, itemsize: int, chunk_mb: float, world_size: int) -> "ShardGeometry":
        """Chunks of about `chunk_mb` MiB of rows, none longer than the table."""
        chunk_rows = max(1, int(chunk_mb * 2**20) // (dim * itemsize))
        return cls(num_labels, min(chunk_rows, num_labels), world_size)

    def range(self, rank: int) -> tuple[int, int]:
        """Rows [start, end) of `rank`: whole chunks, split as evenly as possible."""
        num_chunks = -(-self.num_labels // self.chunk_rows)
        base, extra = divmod(num_chunks, self.world_size)
        first = rank * base + min(rank, extra)
        count = base + (1 if rank < extra else 0)
        return min(first * self.chunk_rows, self.num_labels), min((first + count) * self.chunk_rows, self.num_labels)

    @property
    def largest_shard(self) -> int:
        return max(end - start for start, end in map(self.range, range(self.world_size)))


def create(path: str | Path, num_labels: int, chunk_rows: int, arrays: dict[str, tuple[tuple[int, ...], np.dtype]],
           attrs: dict) -> zarr.Group:
    """An empty table group; `arrays` maps a name ("rows", "optim/sum") to (trailing shape, dtype)."""
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update(attrs | {"num_labels": num_labels, "chunk_rows": chunk_rows})
    for name, (trailing, dtype) in arrays.items():
        group.create_array(name, shape=(num_labels, *trailing), chunks=(chunk_rows, *trailing), dtype=dtype,
                           compressors=None, fill_value=0)
    return group


def open_table(path: str | Path, mode: str = "r") -> zarr.Group:
    path = Path(path)
    if not (path / "zarr.json").is_file() or not (path / "rows" / "zarr.json").is_file():
        raise FileNotFoundError(f"no classifier table at {path}")
    return zarr.open_group(str(path), mode=mode)


def chunk_file(path: str | Path, name: str, chunk: int, ndim: int) -> Path:
    """The file of row chunk `chunk` of array `name` (zarr v3 default chunk keys: c/<row chunk>/0...)."""
    return Path(path, name, "c", str(chunk), *["0"] * (ndim - 1))


class StoredRows:
    """The rows of a saved table (or of label embeddings), read as float32 blocks: from disk a block at a time,
    or from memory after `load` (which keeps bfloat16 rows in bfloat16)."""

    def __init__(self, path: str | Path, num_rows: int | None = None):
        """`num_rows`: the first rows only (a model loaded before labels were added to its run reads its own)."""
        group = open_table(path)
        self.array, self.bfloat16 = group["rows"], group.attrs.get("dtype", "float32") == "bfloat16"
        self.start, self.dim = 0, int(group.attrs["dim"])
        self.end = int(group.attrs["num_labels"]) if num_rows is None else num_rows
        self.device = torch.device("cpu")
        self.rows: torch.Tensor | None = None

    def _read(self, start: int, end: int) -> torch.Tensor:
        values = torch.from_numpy(np.asarray(self.array[start:end]))
        return values.view(torch.bfloat16) if self.bfloat16 else values

    def load(self) -> "StoredRows":
        """All rows into memory, a chunk at a time."""
        if self.rows is None:
            self.rows = torch.empty((self.end, self.dim), dtype=torch.bfloat16 if self.bfloat16 else torch.float32)
            step = self.array.chunks[0]
            for start in range(0, self.end, step):
                self.rows[start:start + step] = self._read(start, min(start + step, self.end))
        return self

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        return (self.rows[start:end] if self.rows is not None else self._read(start, end)).float()
