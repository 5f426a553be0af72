#!/usr/bin/env bash
# One device call that shows where the training step's fused elementwise time goes (session 9): the looped micro-step
# under bench/profile_step.py with Inductor's per-kernel bandwidth report (TORCHINDUCTOR_PROFILE: each generated kernel
# timed once, with the bytes it moves) and the generated code of every graph; plus the fused-MLP GPU tests and
# bench_mlp.py without the tile sweep. ATTN_BACKEND defaults to varlen here (no FA4 staging call needed: the
# elementwise kernels around attention are the same graphs).
# Usage there: bash bench/device_kernels.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache ATTN_BACKEND=${ATTN_BACKEND:-varlen}
timeout 150 python3 -m pytest -q tests/test_fused_mlp.py 2>&1 | tail -3 | tee "$out/pytest_gpu.log"
timeout 100 python3 bench/bench_mlp.py --no-sweep 2>&1 | tee "$out/bench_mlp.log"
timeout 200 python3 bench/profile_step.py --looping 2>&1 | tee "$out/profile_step_looped.txt"
TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT="$out/kernel_bandwidth.txt" TORCH_LOGS=output_code \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache_bw timeout 200 python3 bench/profile_step.py --looping \
    > "$out/profile_bw.txt" 2> "$out/output_code.log"
tail -5 "$out/profile_bw.txt"
xz -6 "$out/output_code.log"
ls -la "$out"
