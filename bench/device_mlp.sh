#!/usr/bin/env bash
# One device call for the fused MLP epilogues (session 8): the GPU tests of the kernel, bench/bench_mlp.py, then
# bench/bench_train.py with the fused MLP and with the plain one, on english_mix_v2 as tokenized by
# bench/run_e2e_h100.sh (prepared in the background while the kernel benchmarks run).
# Carry: carry/ and fa4b/, right after a call that ran `bash bench/fa4_carry.sh stage` with fa4a/.
# Usage there: bash bench/device_mlp.sh [STEPS=5]
set -uo pipefail
steps=${1:-5}
source bench/device_setup.sh
timeout 120 python3 -m pytest -q tests/test_fused_mlp.py 2>&1 | tail -3 | tee "$out/pytest_gpu.log"
timeout 200 python3 bench/bench_mlp.py --json "$out/bench_mlp.json" 2>&1 | tee "$out/bench_mlp.log"
wait_for_data
for variant in fused plain; do
    flag=$([ $variant = plain ] && echo --plain-mlp)
    DATA_PATH=/tmp/v2 timeout 170 python3 bench/bench_train.py --steps "$steps" $flag --json "$out/bench_train_$variant.json" \
        2>&1 | tee "$out/bench_train_$variant.log"
done
