#!/usr/bin/env bash
# One device call for the training micro-steps replayed from CUDA graphs (session 9): the GPU tests of the graphs
# and of the fused MLP, bench/ab_train.py --compare graphs (graphs against op-by-op issue, alternated in one
# process), bench/step_gap.py (the GPU's idle time with graphs) and bench/bench_train.py, on english_mix_v2 as
# tokenized by bench/run_e2e_h100.sh (prepared in the background while the tests run).
# Carry: carry/ and fa4b/, right after a call that ran `bash bench/fa4_carry.sh stage` with fa4a/.
# Usage there: bash bench/device_graphs.sh [ROUNDS=3] [STEPS=5]
set -uo pipefail
rounds=${1:-3} steps=${2:-5}
source bench/device_setup.sh
timeout 240 python3 -m pytest -q -p no:warnings -p no:logging --tb=short tests/test_train_graphs.py tests/test_fused_mlp.py 2>&1 | tail -60 \
    | tee "$out/pytest_gpu.log"
wait_for_data
DATA_PATH=/tmp/v2 timeout 260 python3 bench/ab_train.py --compare graphs --rounds "$rounds" --steps "$steps" \
    --json "$out/ab_graphs.json" 2>&1 | tee "$out/ab_graphs.log"
DATA_PATH=/tmp/v2 timeout 150 python3 bench/step_gap.py --steps 3 --warmup-steps 6 2>&1 | tee "$out/step_gap.log"
