#!/usr/bin/env bash
# The GPU paths on a GPU host, in one go (under 8 minutes on one H100-class GPU), with one summary at the end:
#   1. the tests that need CUDA (tests/test_gpu.py, the pinned table and side-stream prefetch of
#      tests/test_table.py), which skip on machines without one;
#   2. the README's main run (MiniLM on the synthetic data), on the GPU;
#   3. tools/bench_pager.py: paging throughput, in order and one step ahead, beside the memcpy bandwidth.
#     tools/gpu_check.sh [OUT_DIR]      (default runs/gpu_check; its logs and results stay there)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device here")' || exit 2
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME COMMAND...: run it, its output in $OUT/NAME.log, its status and time remembered
    local name=$1 started=$SECONDS
    shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    STATUS[$name]=$?
    SECONDS_TAKEN[$name]=$((SECONDS - started))
    tail -3 "$OUT/$name.log"
}

step tests python -m pytest -q -rs tests/test_gpu.py tests/test_table.py -k "gpu or faiss or nccl or prefetch or rank_takes"
step readme_run bash -c "astra-ds data synth --out data/synthetic --exist-ok && \
    astra-ds train --config configs/synthetic.yaml --set out_dir=$OUT/synthetic --overwrite"
step bench_pager python tools/bench_pager.py --labels 1e7 --dim 64 --rows 4096 16384 65536

echo
echo "gpu_check summary ($(python -c 'import torch; print(torch.cuda.get_device_name(0))'), $(date -u +%F)):"
for name in tests readme_run bench_pager; do
    printf '  %-12s %s in %4d s   (%s)\n' "$name" "$([[ ${STATUS[$name]} == 0 ]] && echo ok || echo FAILED)" \
        "${SECONDS_TAKEN[$name]}" "$OUT/$name.log"
done
grep -E "passed|failed|skipped" "$OUT/tests.log" | tail -1 | sed 's/^/  tests: /'
grep -A1 "@1" "$OUT/readme_run.log" | grep "astra_ds" | sed 's/^/  README run: /'
grep -E "memcpy|sync|prefetch" "$OUT/bench_pager.log" | head -12 | sed "s/^/  /"
for name in tests readme_run bench_pager; do [[ ${STATUS[$name]} == 0 ]] || exit 1; done
