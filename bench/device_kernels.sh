#!/usr/bin/env bash
# One device call that shows where the training step's fused elementwise time goes (session 9): the looped micro-step
# under bench/profile_step.py, then again with the generated code of every Inductor graph logged (output_code.log.xz),
# plus the fused-MLP GPU tests and bench_mlp.py without the tile sweep. ATTN_BACKEND defaults to varlen here (no FA4
# staging call needed: the elementwise kernels around attention are the same graphs). Inductor's per-kernel bandwidth
# report (TORCHINDUCTOR_PROFILE=1) fails in torch 2.11 (benchmark_compiled_module() missing an argument), so it is
# not used.
# Usage there: bash bench/device_kernels.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache ATTN_BACKEND=${ATTN_BACKEND:-varlen}
timeout 150 python3 -m pytest -q -p no:warnings -p no:logging tests/test_fused_mlp.py 2>&1 | tail -3 | tee "$out/pytest_gpu.log"
timeout 100 python3 bench/bench_mlp.py --no-sweep 2>&1 | tee "$out/bench_mlp.log"
timeout 200 python3 bench/profile_step.py --looping 2>&1 | tee "$out/profile_step_looped.txt"
TORCH_LOGS=output_code TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache_code timeout 200 python3 bench/profile_step.py \
    --looping > "$out/profile_step_looped_2.txt" 2> "$out/output_code.log"
xz -6 "$out/output_code.log"
ls -la "$out"
