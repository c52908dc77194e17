"""Process-group setup: join the job's group (rank and rendezvous from astra_ds/launch.py), gloo on CPU and
nccl on GPUs. Collectives time out after `timeout_s`, so a lost rank ends the job instead of hanging it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from astra_ds.launch import discover_launch
from astra_ds.libraries import native_output_logged


def configure_accelerator() -> None:
    """DeepSpeed must be told to use its CPU accelerator before it is imported, when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join (or, for a plain `python` run, create) the process group: nccl with CUDA, gloo without."""
    configure_accelerator()
    import deepspeed
    import torch.distributed as dist

    discover_launch()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        with native_output_logged("DeepSpeed start-up", logging.DEBUG):  # its op builds and their linker lines
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                       timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
