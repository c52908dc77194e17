"""Process-group setup: join the job's group (rank and rendezvous from astra_ds/launch.py), gloo on CPU and
nccl on GPUs. Collectives time out after `timeout_s`, so a lost rank ends the job instead of hanging it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from astra_ds.collectives import all_gather_objects, barrier
from astra_ds.errors import ConfigError, UserError
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
    device = cuda_device(local_rank, torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    _PEERS[:] = all_gather_objects((socket.gethostname(), _address_towards(os.environ.get("MASTER_ADDR"))))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cuda_device(local_rank: int, visible: int) -> torch.device:
    """A rank's GPU: cuda:LOCAL_RANK where every rank of a node sees all its GPUs (the deepspeed launcher,
    torchrun), cuda:0 where the launcher gives each rank its own (SLURM's --gpus-per-task, CUDA_VISIBLE_DEVICES
    set per rank). More ranks on a node than GPUs it shows them is refused: they would share a device."""
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise ConfigError(f"local rank {local_rank} but {visible} GPUs visible: start at most one rank a GPU "
                          f"(--num_gpus / --nproc_per_node {visible})")
    return torch.device("cuda", local_rank)


_PEERS: list[tuple[str, str | None]] = []  # (host name, address) of every rank, for naming a lost one


def _address_towards(master: str | None) -> str | None:
    """The address this host reaches rank 0's host from (the one its peers see), without sending anything."""
    if not master:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master, 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def lost_peer(err: BaseException) -> str | None:
    """For an error of a collective whose peer went away (its process or host ended, its link went down): which
    rank and host that was, as far as the error's peer address tells; None for any other error."""
    text = str(err)
    if not any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                         "Connection refused")):
        return None
    found = re.search(r"\[([0-9a-fA-F:.]+)\]:\d+", text)  # gloo: "Read error [10.1.2.3]:51234: Connection reset ..."
    address = found.group(1) if found else None
    ranks = [f"rank {rank} on {host}" for rank, (host, peer) in enumerate(_PEERS) if peer and peer == address]
    reason = re.sub(r"^\[[^\]]*\] ", "", text.strip().splitlines()[0]).split(". ")[0][:120]  # no source location
    return (", ".join(ranks) + f" ({address})" if ranks else "a peer rank") + f" ({reason})"


def check_shared(directories: dict[str, Path], rank: int) -> None:
    """Every rank sees the same `directories` (config key -> path): rank 0 writes a marker file into each, every
    rank looks for it. A rank that does not see one (a node-local path, a file system a node has not mounted) ends
    the run on every rank at start-up, in one line naming the rank, its host and the path: never a hang, or a
    checkpoint half written where the other nodes cannot see it. Collective."""
    if len(all_gather_objects(None)) == 1:
        return
    marker = all_gather_objects(f".shared-{secrets.token_hex(8)}")[0]  # rank 0's name, on every rank
    if rank == 0:
        for path in directories.values():
            path.mkdir(parents=True, exist_ok=True)
            (path / marker).write_text(socket.gethostname())
    barrier()
    seen = {key: (path / marker).is_file() for key, path in directories.items()}
    everyone = all_gather_objects((socket.gethostname(), seen))
    if rank == 0:
        for path in directories.values():
            (path / marker).unlink(missing_ok=True)
    for other, (host, seen) in enumerate(everyone):
        for key, shared in seen.items():
            if not shared:
                raise UserError(f"{key} {directories[key]} is not shared between the nodes: rank {other} on {host} "
                                "does not see what rank 0 wrote there (out_dir and checkpoint.dir must be on a file "
                                "system that every node mounts at the same path)")
