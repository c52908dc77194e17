"""Where this process stands in a job: rank, world size and rendezvous address, from whatever started it.

In this order:
  - the environment a launcher set (`deepspeed`, torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
  - MPI (`mpirun -np N`, MPICH or Open MPI): mpi4py gives the rank, rank 0 broadcasts its host and a free port;
  - SLURM (`srun`): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR exported by the batch script;
  - nothing: a single process, which makes its own one-rank group.
Nothing here imports torch: the CLI knows the rank of its log lines before the heavy libraries load.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from astra_ds.errors import ConfigError

MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def free_port() -> int:
    """A port to listen on, below the kernel's range of ephemeral ports: a port the kernel hands out (bind to port
    0) may meanwhile become the local end of some outgoing connection, and the rendezvous then fails to listen
    (EADDRINUSE); ports below that range are only ever taken by those who bind them."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    for port in random.sample(range(10_000, max(first_ephemeral, 10_100)), 50):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # each one taken: any free port
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_mpi() -> dict[str, str]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("started by mpirun, but mpi4py is not installed: pip install mpi4py") from None
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    single_node = node.Get_size() == world.Get_size()
    rendezvous = None
    if world.Get_rank() == 0:
        host = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else socket.gethostname())
        rendezvous = (host, os.environ.get("MASTER_PORT") or str(free_port()))
    host, port = world.bcast(rendezvous, root=0)
    return {"RANK": str(world.Get_rank()), "WORLD_SIZE": str(world.Get_size()), "LOCAL_RANK": str(node.Get_rank()),
            "MASTER_ADDR": host, "MASTER_PORT": port}


def _from_slurm() -> dict[str, str]:
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError("under srun, MASTER_ADDR must name the first node (launchers/slurm.sbatch exports it)")
    return {"RANK": os.environ["SLURM_PROCID"], "WORLD_SIZE": os.environ["SLURM_NTASKS"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"), "MASTER_PORT": os.environ.get("MASTER_PORT", "29500")}


# (rank, number of tasks) variables of each launcher: the deepspeed launcher and torchrun, MPICH, Open MPI, SLURM
TASK_VARIABLES = (("RANK", "WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                  ("SLURM_PROCID", "SLURM_NTASKS"))


def task_of_job() -> tuple[int, int] | None:
    """(this task's rank, the job's number of tasks) as the launcher that started it says in the environment, with
    no process group or MPI call; None without a launcher."""
    for rank, size in TASK_VARIABLES:
        if rank in os.environ and size in os.environ:
            return int(os.environ[rank]), int(os.environ[size])
    return None


def end_mpi_job(code: int) -> None:
    """Under mpirun, end every rank of the job now (MPI_Abort): the launcher is told explicitly rather than left to
    notice that a rank exited without finalizing MPI, which MPICH's hydra does not always do. Returns where MPI is
    not in use."""
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(code)


def discover_launch() -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from whatever started this process; returns
    the launch path's name."""
    if "RANK" in os.environ:
        return "launcher"
    if any(v in os.environ for v in MPI_RANK_VARIABLES):
        os.environ.update(_from_mpi())
        return "mpi"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(_from_slurm())
        return "slurm"
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return "single"
