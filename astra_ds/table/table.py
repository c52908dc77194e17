"""The classifier table: L x d rows in host memory (pinned with CUDA), paged to the device a batch at a time.

A step fetches the unique rows of its sampled labels (`fetch`), scores them through autograd, then
`apply_gradients` runs the row-sparse optimizer on the device and writes the rows back. Work per step depends
on the number of rows fetched, never on L.

Rows are stored in float32, or in bfloat16 (`table.dtype`: half the memory) with float32 arithmetic: fetched
rows are widened, updated in float32 and written back with stochastic rounding, so that updates smaller than
a bfloat16 step still move a row on average.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astra_ds.choices import OPTIMIZERS
from astra_ds.collectives import barrier
from astra_ds.config import TableConfig
from astra_ds.errors import TableError, TrainingError
from astra_ds.progress import progress as progress_of
from astra_ds.rng import Stream, torch_generator
from astra_ds.table import store
from astra_ds.table.host_memory import host_zeros


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def round_to_bfloat16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastic rounding of float32 `values` to bfloat16: up with probability (dropped low bits) / 2^16, so
    the result is unbiased. Adding the noise to the bit pattern carries into the kept bits when it overflows."""
    bits = values.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


@dataclass
class RowBlock:
    """The rows of one step on the compute device."""

    global_ids: torch.Tensor  # (U,) sorted unique label ids, host
    local_rows: torch.Tensor  # (U,) rows in this rank's shard, host
    weights: torch.Tensor  # (U, d) on the device, a leaf that collects the step's gradients


class ClassifierTable:
    def __init__(self, num_labels: int, dim: int, cfg: TableConfig, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        self.num_labels, self.dim, self.cfg = num_labels, dim, cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.geometry = store.ShardGeometry.of(num_labels, dim, self.dtype.itemsize, cfg.chunk_mb, world_size)
        self.chunk_rows = self.geometry.chunk_rows
        self.start, self.end = self.geometry.range(rank)
        pin = torch.cuda.is_available()
        self.rows = host_zeros((self.end - self.start, dim), self.dtype, pin)
        # bfloat16 write-backs: update u of rank r rounds with the stream (seed, r, u), so a resumed run (the
        # count is saved with the table) rounds as an uninterrupted one
        self.rank, self.seed, self.updates = rank, seed, 0
        self.initialized = False  # rows set by a table init (astra_ds/table/init.py) or loaded; zeros until then
        self.optimizer = OPTIMIZERS.get(cfg.optimizer)(self.end - self.start, dim, cfg, pin)
        # chunks changed since the table was last saved or loaded (a checkpoint rewrites only these)
        self.dirty = np.ones(len(list(self._chunks())), bool)

    @property
    def num_local_rows(self) -> int:
        return self.end - self.start

    def _chunks(self):
        """(chunk index, global start, global end) of the chunks of this shard."""
        for start in range(self.start, self.end, self.chunk_rows):
            yield start // self.chunk_rows, start, min(start + self.chunk_rows, self.end)

    def init_random(self, seed: int) -> None:
        """N(0, init_std) rows, each chunk seeded by (seed, chunk index): the same table for any world size."""
        for chunk, start, end in self._chunks():
            generator = torch_generator(seed, Stream.TABLE_INIT, chunk)
            block = torch.randn((end - start, self.dim), generator=generator) * self.cfg.init_std
            self.rows[start - self.start:end - self.start] = block

    def mark_initialized(self) -> None:
        """Every row was set by a table init: the next checkpoint rewrites every chunk."""
        self.initialized = True
        self.dirty[:] = True

    def unique_rows(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted unique ids of `global_ids` (any shape) and each id's slot among them, on the host."""
        unique_ids, slots = torch.unique(global_ids.reshape(-1).cpu(), sorted=True, return_inverse=True)
        if len(unique_ids) and (unique_ids[0] < self.start or unique_ids[-1] >= self.end):
            raise IndexError(f"label ids outside this shard's rows [{self.start}, {self.end})")
        return unique_ids, slots.reshape(global_ids.shape)

    def fetch(self, global_ids: torch.Tensor) -> tuple[RowBlock, torch.Tensor]:
        """Rows of `global_ids` (any shape, repeats allowed) on the device in float32, and each id's slot in
        the block."""
        unique_ids, slots = self.unique_rows(global_ids)
        local_rows = unique_ids - self.start
        weights = self.rows.index_select(0, local_rows).to(self.device).float()
        return RowBlock(unique_ids, local_rows, weights.requires_grad_(True)), slots.to(self.device)

    @torch.no_grad()
    def apply_gradients(self, blocks: list[RowBlock]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the rows of `blocks` (several with gradient accumulation: their gradients
        are summed per row); rows without a gradient are left untouched. Returns the updated local rows (sorted,
        host) and their stored values (device)."""
        self.updates += 1  # every rank counts every step, with or without rows to update
        blocks = [b for b in blocks if b.weights.grad is not None]
        if not blocks:
            return torch.zeros(0, dtype=torch.long), torch.zeros((0, self.dim), device=self.device)
        if len(blocks) == 1:
            local_rows, weights, grads = blocks[0].local_rows, blocks[0].weights.detach(), blocks[0].weights.grad
        else:
            local_rows, slots = torch.unique(torch.cat([b.local_rows for b in blocks]), return_inverse=True)
            slots = slots.to(self.device)
            weights = torch.zeros((len(local_rows), self.dim), device=self.device)
            weights.index_copy_(0, slots, torch.cat([b.weights.detach() for b in blocks]))
            grads = torch.zeros_like(weights).index_add_(0, slots, torch.cat([b.weights.grad for b in blocks]))
        new_weights = self.optimizer.step(local_rows, weights, grads)
        if self.dtype == torch.bfloat16:
            generator = torch_generator(self.seed, Stream.BF16_ROUNDING, self.rank, self.updates, device=self.device)
            new_weights = round_to_bfloat16(new_weights, generator)
        if not torch.isfinite(new_weights).all():
            bad = local_rows[~torch.isfinite(new_weights.cpu()).all(dim=1)] + self.start
            raise TrainingError(f"{len(bad)} updated classifier rows are not finite (labels {bad[:5].tolist()}); "
                                "they were not written")
        self.rows.index_copy_(0, local_rows, new_weights.to("cpu"))
        self.dirty[local_rows.numpy() // self.chunk_rows] = True  # shards start on a chunk boundary
        return local_rows, new_weights

    def block_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of this shard (global ids), as a view of host memory."""
        return self.rows[start - self.start:end - self.start]

    # ---- persistence: zarr in global label order -------------------------------------------------------------

    def _arrays(self) -> dict[str, tuple[torch.Tensor, tuple[int, ...], np.dtype]]:
        """name -> (host tensor, trailing shape, numpy dtype on disk); bfloat16 rows are stored as their bits."""
        arrays = {"rows": (self.rows, (self.dim,), np.dtype(np.float32 if self.dtype == torch.float32 else np.uint16))}
        for name, tensor in self.optimizer.state.items():
            arrays[f"optim/{name}"] = (tensor, tuple(tensor.shape[1:]), np.dtype(str(tensor.dtype).split(".")[1]))
        return arrays

    def create_store(self, path: str | Path) -> None:
        """An empty table at `path` that every rank's `save` then fills (one rank creates it)."""
        store.create(path, self.num_labels, self.chunk_rows,
                     {name: (shape, dtype) for name, (_, shape, dtype) in self._arrays().items()},
                     {"dim": self.dim, "optimizer": self.cfg.optimizer, "dtype": self.cfg.dtype,
                      "updates": self.updates, "initialized": self.initialized})

    def save(self, path: str | Path, unchanged_from: str | Path | None = None, progress: bool = False) -> None:
        """Write this shard's rows and optimizer state (whole chunks) into the table at `path`. Chunks no step
        changed since the table `unchanged_from` (the last checkpoint's, saved or loaded) become hard links to
        its files instead of being written again."""
        group = store.open_table(path, mode="r+")
        for name, (tensor, trailing, _) in self._arrays().items():
            target = group[name]
            for i, (chunk, start, end) in enumerate(progress_of(list(self._chunks()), f"save {name}", progress, "chunk")):
                if unchanged_from is not None and not self.dirty[i] and _link_chunk(
                        unchanged_from, path, name, chunk, 1 + len(trailing)):
                    continue
                target[start:end] = _to_numpy(tensor[start - self.start:end - self.start])

    # ---- as a checkpoint component (astra_ds/training/checkpoint.py) ---------------------------------------------

    def save_files(self, directory: Path, previous: Path | None) -> None:
        """Every rank writes its shard into one table at `directory`, linking the chunks unchanged since the
        table at `previous`; the chunks changed from now on are counted against this one."""
        if self.rank == 0:
            self.create_store(directory)
        barrier()
        self.save(directory, previous)
        self.dirty[:] = False

    def load_files(self, directory: Path, resharded: bool) -> None:
        self.load(directory)  # the table is stored in global label order: any world size reads it

    def load_weights(self, directory: Path) -> None:
        self.load(directory, rows_only=True)

    def load(self, path: str | Path, rows_only: bool = False, progress: bool = False) -> None:
        """Read this shard's rows and optimizer state (not with `rows_only`) from the table at `path` (any world
        size wrote it)."""
        group = self._open_stored(path, self.num_labels)
        same_optimizer = group.attrs["optimizer"] == self.cfg.optimizer
        self._read_rows(group, np.arange(self.start, self.end), with_optimizer=same_optimizer and not rows_only,
                        progress=progress)
        self.updates = 0 if rows_only else group.attrs.get("updates", 0)
        self.initialized = group.attrs.get("initialized", True)  # tables from before the flag always were
        same_bytes = same_optimizer and not rows_only and group.attrs.get("dtype", "float32") == self.cfg.dtype
        self.dirty[:] = not same_bytes  # else the chunks are those of the table at `path`

    def load_matched(self, path: str | Path, source_rows: np.ndarray) -> None:
        """This shard's rows, and their optimizer state where the stored table has this optimizer's, from rows
        `source_rows` of the table at `path` (one stored row a local row; -1: the row is left as it is). The stored
        table may have any number of rows (a run whose labels this one extends, astra_ds/training/from_run.py)."""
        group = self._open_stored(path, None)
        self._read_rows(group, source_rows, with_optimizer=group.attrs["optimizer"] == self.cfg.optimizer)
        self.dirty[:] = True

    def _open_stored(self, path: str | Path, num_labels: int | None):
        group = store.open_table(path)
        if group.attrs["dim"] != self.dim or num_labels not in (None, group.attrs["num_labels"]):
            raise TableError(f"table at {path} is {group.attrs['num_labels']} x {group.attrs['dim']}, "
                             f"expected {num_labels or 'L'} x {self.dim}")
        return group

    def _read_rows(self, group, source_rows: np.ndarray, with_optimizer: bool, progress: bool = False) -> None:
        """Local row i <- stored row source_rows[i] (skipped where -1), for the rows and, `with_optimizer`, the
        optimizer state; the stored table is read a chunk at a time, each chunk once."""
        local = np.flatnonzero(source_rows >= 0)
        order = np.argsort(source_rows[local], kind="stable")
        local, stored = local[order], source_rows[local][order]
        bfloat16_rows = group.attrs.get("dtype", "float32") == "bfloat16"
        for name, (tensor, _, _) in self._arrays().items():
            if name.startswith("optim/") and not with_optimizer:
                continue  # fresh optimizer state
            source = group[name]
            chunk_rows, num_stored = source.chunks[0], source.shape[0]
            for start in progress_of(range(0, num_stored, chunk_rows), f"load {name}", progress, "chunk"):
                lo, hi = np.searchsorted(stored, [start, start + chunk_rows])
                if lo == hi:
                    continue  # no row of this shard in this chunk
                first, last = stored[lo], stored[hi - 1]
                block = np.asarray(source[first:last + 1])
                if last - first == hi - lo - 1 and local[hi - 1] - local[lo] == hi - lo - 1:
                    values, target = block, slice(local[lo], local[hi - 1] + 1)  # consecutive rows to consecutive rows
                else:
                    values, target = block[stored[lo:hi] - first], torch.from_numpy(local[lo:hi])
                values = torch.from_numpy(np.ascontiguousarray(values))
                if name == "rows" and bfloat16_rows:
                    values = values.view(torch.bfloat16)
                tensor[target] = values.to(tensor.dtype)  # float32 <-> bfloat16: to nearest


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _link_chunk(source_table: str | Path, table: str | Path, name: str, chunk: int, ndim: int) -> bool:
    """Clone (reflink) or else hard-link chunk `chunk` of array `name` from `source_table` into `table`; False
    where the file systems differ (the caller writes the chunk instead)."""
    source = store.chunk_file(source_table, name, chunk, ndim)
    if not source.exists():  # the chunk holds only zeros (zarr's fill value): nothing to link
        return True
    destination = store.chunk_file(table, name, chunk, ndim)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if _reflink(source, destination):
        return True
    try:
        os.link(source, destination)
    except OSError:  # EXDEV: checkpoint.dir on another file system than out_dir
        return False
    return True


FICLONE = 0x40049409  # Linux ioctl: share the source's blocks, copy-on-write (btrfs, XFS, ...)


def _reflink(source: Path, destination: Path) -> bool:
    """A copy-on-write clone of `source`, where the file system offers one: as cheap as a link, but damage to
    one file does not reach the other."""
    try:
        with open(source, "rb") as src, open(destination, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        destination.unlink(missing_ok=True)
        return False
