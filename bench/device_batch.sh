#!/usr/bin/env bash
# One device call that measures the latest code on the lent GPU, most important first, each step capped so that the
# later ones still run and every log lands in $OUT (the tool caps the call at the session's device time left):
#   1. the whole pipeline in one process (bench/run_e2e_h100.sh train SECONDS, cold compile cache): train, GPTQ,
#      artifact, TTT + tilt eval;
#   2. bench/bench_eval.py on that artifact, first DOCS documents: tilt, record_order, neutral;
#   3. bench/bench_train.py: throughput before and after looping (warm compile cache by then).
# Carry: carry/ (english_mix_v2.jsonl.xz, the canonical tokenizer, wheels/ with brotli and constriction) and fa4b/
# after a call that ran `bash bench/fa4_carry.sh stage` with fa4a/ (FA4 is skipped when /tmp/fa4 is missing).
# Usage there: bash bench/device_batch.sh [SECONDS=60] [DOCS=1000]
set -uo pipefail
seconds=${1:-60} docs=${2:-1000} out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site carry/wheels/*.whl
export PYTHONPATH=/tmp/site
[ -f /tmp/fa4/cu13part.aa ] && bash bench/fa4_carry.sh install && export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import train_gpt as tg, torch; print('attention backend:', tg.resolve_attention_backend('auto', torch.device('cuda')))" \
    | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
RUN_ID=gpu_e2e_${seconds}s timeout 330 bash bench/run_e2e_h100.sh train "$seconds" 2>&1 | tee "$out/e2e_train.log" | grep -vE "^  [a-z_0-9]+: "
artifact=final_model.int6.ptz
if [ -f $artifact ]; then
    DATA_PATH=/tmp/v2 TOKENIZER_PATH=carry/caseops_v1_reserved_sp8192.model EMA_DECAY=0.99 \
        timeout 200 python3 bench/bench_eval.py --artifact $artifact --docs "$docs" --runs tilt,record_order,neutral \
        --json "$out/bench_eval.json" 2>&1 | tee "$out/bench_eval.log"
fi
DATA_PATH=/tmp/v2 timeout 170 python3 bench/bench_train.py --steps 5 --json "$out/bench_train.json" 2>&1 \
    | tee "$out/bench_train.log"
