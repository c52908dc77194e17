"""Host memory for the table and its optimizer state.

With CUDA: pinned (page-locked) memory, so host-to-device copies are asynchronous DMA. Without: anonymous
memory advised to use transparent huge pages where the kernel allows it (`madvise` mode): a step gathers
rows at random from gigabytes, and 2 MiB pages spare most of the TLB misses of 4 KiB ones (tools/bench_pager.py
measures the paging).
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 * 2**20


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if pin:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    num_bytes = math.prod(shape) * dtype.itemsize
    if num_bytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps `memory` alive
