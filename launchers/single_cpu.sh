#!/usr/bin/env bash
# Single process on CPU (no launcher): astra-ds sets up a one-rank gloo process group itself.
#   launchers/single_cpu.sh --config configs/synthetic.yaml [--set key=value ...]
set -euo pipefail
export DS_ACCELERATOR=cpu
exec python -m astra_ds train "$@"
