#!/usr/bin/env bash
# NPROC ranks on this node under the deepspeed launcher (one per GPU; on a CPU-only node, gloo ranks).
#   NPROC=2 launchers/deepspeed_local.sh --config configs/synthetic.yaml [--set key=value ...]
# Several nodes: a hostfile (launchers/hostfile.example) and rank 0's address, from the first node:
#   deepspeed --hostfile launchers/hostfile --master_addr node1 --master_port 29500 \
#       --module astra_ds train --config ...
set -euo pipefail
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
exec deepspeed --num_accelerators "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" --module astra_ds train "$@"
