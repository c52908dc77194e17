"""The classifier table: L x d rows in host memory (pinned with CUDA), paged to the device a batch at a time.

A step fetches the unique rows of its sampled labels (`fetch`), scores them through autograd, then
`apply_gradients` runs the row-sparse optimizer on the device and writes the rows back. Work per step depends
on the number of rows fetched, never on L.

Rows are stored in float32, or in bfloat16 (`table.dtype`: half the memory) with float32 arithmetic: fetched
rows are widened, updated in float32 and written back with stochastic rounding, so that updates smaller than
a bfloat16 step still move a row on average.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from astra_ds.config import TableConfig
from astra_ds.table import store
from astra_ds.table.host_memory import host_zeros
from astra_ds.table.optim import build_optimizer


class TableError(ValueError):
    """A stored table that does not fit the run (another shape)."""


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


@dataclass
class Prefetch:
    """Rows of a coming step on their way to the device (`ClassifierTable.prefetch`)."""

    requested: torch.Tensor  # the ids asked for (any shape), host
    global_ids: torch.Tensor  # (U,) sorted unique, host
    slots: torch.Tensor  # each requested id's row in the block, host
    weights: torch.Tensor  # (U, d) float32 on the device; on CUDA being copied until `ready`
    updates: int  # the table's update count when the rows were read
    ready: object = None  # torch.cuda.Event on CUDA


class ClassifierTable:
    def __init__(self, num_labels: int, dim: int, cfg: TableConfig, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1):
        self.num_labels, self.dim, self.cfg = num_labels, dim, cfg
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        self.chunk_rows = min(store.chunk_rows_for(dim, self.dtype.itemsize, cfg.chunk_mb), num_labels)  # no chunk past the table
        self.start, self.end = store.shard_range(num_labels, self.chunk_rows, rank, world_size)
        pin = torch.cuda.is_available()
        self.rows = host_zeros((self.end - self.start, dim), self.dtype, pin)
        # bfloat16 write-backs: update u of rank r rounds with a generator seeded by (r, u), so a resumed run
        # (the count is saved with the table) rounds as an uninterrupted one
        self.rank, self.updates = rank, 0
        # the local rows (sorted, host) and stored values (device) of the latest update: a prefetch made before
        # it is patched with them (`fetch`)
        self.last_update = (torch.zeros(0, dtype=torch.long), torch.zeros((0, dim), device=self.device))
        # CUDA paging: a side stream for host-to-device copies and two pinned staging buffers used in turn (a
        # prefetch fills one while the other may still be copying), each with the event of its last copy
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.staging: list[tuple[torch.Tensor, object]] = []
        self.optimizer = build_optimizer(cfg, self.end - self.start, dim, pin)
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
            generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
            block = torch.randn((end - start, self.dim), generator=generator) * self.cfg.init_std
            self.rows[start - self.start:end - self.start] = block

    def _unique(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unique_ids, slots = torch.unique(global_ids.reshape(-1).cpu(), sorted=True, return_inverse=True)
        if len(unique_ids) and (unique_ids[0] < self.start or unique_ids[-1] >= self.end):
            raise IndexError(f"label ids outside this shard's rows [{self.start}, {self.end})")
        return unique_ids, slots.reshape(global_ids.shape)

    def _staging_buffer(self, num_rows: int) -> torch.Tensor:
        """The next pinned staging buffer (grown when needed), once its previous copy has finished."""
        buffer, copied = self.staging.pop(0) if len(self.staging) == 2 else (None, None)
        if copied is not None:
            copied.synchronize()
        if buffer is None or len(buffer) < num_rows:
            buffer = torch.empty((max(num_rows, 1024), self.dim), dtype=self.dtype, pin_memory=True)
        return buffer

    def prefetch(self, global_ids: torch.Tensor) -> Prefetch:
        """Start paging the rows of `global_ids` to the device. On CUDA they are gathered into pinned staging
        and copied on a side stream, overlapping whatever the default stream runs meanwhile (one step ahead:
        the current step's update). `fetch(global_ids, prefetched)` then takes them."""
        unique_ids, slots = self._unique(global_ids)
        local_rows = unique_ids - self.start
        if self.copy_stream is None:
            weights = self.rows.index_select(0, local_rows).to(self.device).float()
            return Prefetch(global_ids, unique_ids, slots, weights, self.updates)
        buffer = self._staging_buffer(len(local_rows))
        staging = buffer[:len(local_rows)]
        torch.index_select(self.rows, 0, local_rows, out=staging)
        with torch.cuda.stream(self.copy_stream):
            weights = staging.to(self.device, non_blocking=True).float()
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.staging.append((buffer, ready))
        return Prefetch(global_ids, unique_ids, slots, weights, self.updates, ready)

    def fetch(self, global_ids: torch.Tensor, prefetched: Prefetch | None = None) -> tuple[RowBlock, torch.Tensor]:
        """Rows of `global_ids` (any shape, repeats allowed) on the device, and each id's slot in the block;
        from `prefetched` (made for the same ids before the latest update, at most) when given."""
        if prefetched is None:
            prefetched = self.prefetch(global_ids)
        elif not torch.equal(prefetched.requested, global_ids):
            raise ValueError("fetch: the prefetched rows are those of other label ids")
        weights = prefetched.weights
        if prefetched.ready is not None:
            torch.cuda.current_stream().wait_event(prefetched.ready)
            weights.record_stream(torch.cuda.current_stream())  # made on the side stream, used on this one
        self._patch(prefetched)
        local_rows = prefetched.global_ids - self.start
        return RowBlock(prefetched.global_ids, local_rows, weights.requires_grad_(True)), prefetched.slots.to(self.device)

    def _patch(self, prefetched: Prefetch) -> None:
        """The overlap patch: prefetched rows that the update since then changed take their new values."""
        behind = self.updates - prefetched.updates
        if behind == 0:
            return
        if behind > 1:
            raise RuntimeError(f"rows prefetched {behind} updates ago: prefetch at most one step ahead")
        updated_rows, values = self.last_update
        if len(updated_rows) == 0:
            return
        local_rows = prefetched.global_ids - self.start
        position = torch.searchsorted(updated_rows, local_rows).clamp_max(len(updated_rows) - 1)
        hit = updated_rows[position] == local_rows
        prefetched.weights[hit.to(self.device)] = values[position[hit].to(self.device)].float()

    @torch.no_grad()
    def apply_gradients(self, blocks: list[RowBlock]) -> None:
        """One optimizer step on the rows of `blocks` (several with gradient accumulation: their gradients
        are summed per row); rows without a gradient are left untouched."""
        self.updates += 1  # every rank counts every step, with or without rows to update
        self.last_update = (self.last_update[0][:0], self.last_update[1][:0])
        blocks = [b for b in blocks if b.weights.grad is not None]
        if not blocks:
            return
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
            generator = torch.Generator(self.device).manual_seed(self.rank * 1_000_003 + self.updates)
            new_weights = round_to_bfloat16(new_weights, generator)
        self.rows.index_copy_(0, local_rows, new_weights.to("cpu"))
        self.last_update = (local_rows, new_weights)  # kept as they are: only a prefetch's patch reads them
        self.dirty[local_rows.numpy() // self.chunk_rows] = True  # shards start on a chunk boundary

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
                      "updates": self.updates})

    def save(self, path: str | Path, unchanged_from: str | Path | None = None, progress: bool = False) -> None:
        """Write this shard's rows and optimizer state (whole chunks) into the table at `path`. Chunks no step
        changed since the table `unchanged_from` (the last checkpoint's, saved or loaded) become hard links to
        its files instead of being written again."""
        group = store.open_table(path, mode="r+")
        for name, (tensor, trailing, _) in self._arrays().items():
            target = group[name]
            for i, (chunk, start, end) in enumerate(tqdm(list(self._chunks()), desc=f"save {name}", disable=not progress)):
                if unchanged_from is not None and not self.dirty[i] and _link_chunk(
                        unchanged_from, path, name, chunk, 1 + len(trailing)):
                    continue
                target[start:end] = _to_numpy(tensor[start - self.start:end - self.start])

    def save_checkpoint(self, path: str | Path, previous: str | Path | None) -> None:
        """`save` into a new checkpoint's table; the chunks changed from now on are counted against it."""
        self.save(path, previous)
        self.dirty[:] = False

    def load(self, path: str | Path, rows_only: bool = False, progress: bool = False) -> None:
        """Read this shard's rows and optimizer state (not with `rows_only`) from the table at `path` (any world
        size wrote it)."""
        group = store.open_table(path)
        if (group.attrs["num_labels"], group.attrs["dim"]) != (self.num_labels, self.dim):
            raise TableError(f"table at {path} is {group.attrs['num_labels']} x {group.attrs['dim']}, "
                             f"expected {self.num_labels} x {self.dim}")
        same_optimizer = group.attrs["optimizer"] == self.cfg.optimizer
        stored_dtype = group.attrs.get("dtype", "float32")
        for name, (tensor, _, _) in self._arrays().items():
            if name.startswith("optim/") and (rows_only or not same_optimizer):
                continue  # fresh optimizer state
            source = group[name]
            for _, start, end in tqdm(list(self._chunks()), desc=f"load {name}", disable=not progress):
                values = torch.from_numpy(np.asarray(source[start:end]))
                if name == "rows" and stored_dtype == "bfloat16":
                    values = values.view(torch.bfloat16)
                tensor[start - self.start:end - self.start] = values  # float32 <-> bfloat16 converts (to nearest)
        self.updates = 0 if rows_only else group.attrs.get("updates", 0)
        same_bytes = same_optimizer and not rows_only and stored_dtype == self.cfg.dtype
        self.dirty[:] = not same_bytes  # else the chunks are those of the table at `path`


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _link_chunk(source_table: str | Path, table: str | Path, name: str, chunk: int, ndim: int) -> bool:
    """Hard-link chunk `chunk` of array `name` from `source_table` into `table`; False where the file systems
    differ (the caller writes the chunk instead)."""
    source = store.chunk_file(source_table, name, chunk, ndim)
    if not source.exists():  # the chunk holds only zeros (zarr's fill value): nothing to link
        return True
    destination = store.chunk_file(table, name, chunk, ndim)
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:  # EXDEV: checkpoint.dir on another file system than out_dir
        return False
    return True
