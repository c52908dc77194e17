"""Paging a coming step's rows to the device while the current step updates (CUDA), for tools/bench_pager.py.

`RowPager.prefetch(ids)` gathers the rows of `ids` into one of two pinned staging buffers and copies them to the
device on a side stream; `fetch(ids, prefetched)` waits for that copy and patches the rows that the update made
in between changed (the overlap patch), so that paging one step ahead trains exactly like fetching in order.
On a CPU the "device" is host memory and a prefetch is a plain gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from astra_ds.table.table import ClassifierTable, RowBlock


@dataclass
class Prefetch:
    """Rows of a coming step on their way to the device."""

    requested: torch.Tensor  # the ids asked for (any shape), host
    global_ids: torch.Tensor  # (U,) sorted unique, host
    slots: torch.Tensor  # each requested id's row in the block, host
    weights: torch.Tensor  # (U, d) float32 on the device; on CUDA being copied until `ready`
    updates: int  # the table's update count when the rows were read
    ready: object = None  # torch.cuda.Event on CUDA


class RowPager:
    def __init__(self, table: ClassifierTable):
        self.table = table
        # the local rows (sorted, host) and stored values (device) of the latest update
        self.last_update = (torch.zeros(0, dtype=torch.long), torch.zeros((0, table.dim), device=table.device))
        # a side stream for host-to-device copies and two pinned staging buffers used in turn (a prefetch fills
        # one while the other may still be copying), each with the event of its last copy
        self.copy_stream = torch.cuda.Stream(table.device) if table.device.type == "cuda" else None
        self.staging: list[tuple[torch.Tensor, object]] = []

    def _staging_buffer(self, num_rows: int) -> torch.Tensor:
        """The next pinned staging buffer (grown when needed), once its previous copy has finished."""
        buffer, copied = self.staging.pop(0) if len(self.staging) == 2 else (None, None)
        if copied is not None:
            copied.synchronize()
        if buffer is None or len(buffer) < num_rows:
            buffer = torch.empty((max(num_rows, 1024), self.table.dim), dtype=self.table.dtype, pin_memory=True)
        return buffer

    def prefetch(self, global_ids: torch.Tensor) -> Prefetch:
        """Start paging the rows of `global_ids` to the device, overlapping whatever the default stream runs
        meanwhile (one step ahead: the current step's update)."""
        table = self.table
        unique_ids, slots = table.unique_rows(global_ids)
        local_rows = unique_ids - table.start
        if self.copy_stream is None:
            weights = table.rows.index_select(0, local_rows).to(table.device).float()
            return Prefetch(global_ids, unique_ids, slots, weights, table.updates)
        buffer = self._staging_buffer(len(local_rows))
        staging = buffer[:len(local_rows)]
        torch.index_select(table.rows, 0, local_rows, out=staging)
        with torch.cuda.stream(self.copy_stream):
            weights = staging.to(table.device, non_blocking=True).float()
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.staging.append((buffer, ready))
        return Prefetch(global_ids, unique_ids, slots, weights, table.updates, ready)

    def fetch(self, global_ids: torch.Tensor, prefetched: Prefetch) -> tuple[RowBlock, torch.Tensor]:
        """The rows of `prefetched` (made for the same ids, at most one update ago) as `ClassifierTable.fetch`
        returns them."""
        if not torch.equal(prefetched.requested, global_ids):
            raise ValueError("fetch: the prefetched rows are those of other label ids")
        weights = prefetched.weights
        if prefetched.ready is not None:
            torch.cuda.current_stream().wait_event(prefetched.ready)
            weights.record_stream(torch.cuda.current_stream())  # made on the side stream, used on this one
        self._patch(prefetched)
        local_rows = prefetched.global_ids - self.table.start
        return (RowBlock(prefetched.global_ids, local_rows, weights.requires_grad_(True)),
                prefetched.slots.to(self.table.device))

    def _patch(self, prefetched: Prefetch) -> None:
        """Prefetched rows that the update since then changed take their new values."""
        behind = self.table.updates - prefetched.updates
        if behind == 0:
            return
        if behind > 1:
            raise RuntimeError(f"rows prefetched {behind} updates ago: prefetch at most one step ahead")
        updated_rows, values = self.last_update
        if len(updated_rows) == 0:
            return
        local_rows = prefetched.global_ids - self.table.start
        position = torch.searchsorted(updated_rows, local_rows).clamp_max(len(updated_rows) - 1)
        hit = updated_rows[position] == local_rows
        prefetched.weights[hit.to(self.table.device)] = values[position[hit].to(self.table.device)].float()

    def apply_gradients(self, blocks: list[RowBlock]) -> None:
        """The table's update, remembered for the patch of the next fetch."""
        self.last_update = self.table.apply_gradients(blocks)
