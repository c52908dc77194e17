#!/usr/bin/env bash
# NPROC ranks with mpirun (MPICH or Open MPI); each rank learns its rank from MPI (mpi4py) and rank 0
# broadcasts the rendezvous address. Several nodes: add your MPI's host options (e.g. -hosts n1,n2 or
# --hostfile), and MASTER_ADDR=<first node> if its host name does not resolve from the others.
#   NPROC=2 launchers/mpirun.sh --config configs/synthetic.yaml [--set key=value ...]
set -euo pipefail
exec mpirun -np "${NPROC:-2}" python -m astra_ds train "$@"
