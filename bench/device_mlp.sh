#!/usr/bin/env bash
# One device call for the fused MLP epilogues (session 8): the GPU tests of the kernel, bench/bench_mlp.py, then
# bench/bench_train.py with the fused MLP and with the plain one, on english_mix_v2 as tokenized by
# bench/run_e2e_h100.sh (prepared in the background while the kernel benchmarks run).
# Carry: carry/ and fa4b/, right after a call that ran `bash bench/fa4_carry.sh stage` with fa4a/.
# Usage there: bash bench/device_mlp.sh [STEPS=5]
set -uo pipefail
steps=${1:-5} out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
[ -f /tmp/fa4/cu13part.aa ] && bash bench/fa4_carry.sh install && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import train_gpt as tg, torch; print('attention backend:', tg.resolve_attention_backend('auto', torch.device('cuda')))" \
    | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
[ -d /tmp/v2 ] || (python3 prepare_caseops_data.py --docs carry/english_mix_v2.jsonl.xz --out /tmp/v2 --val-docs 2000 \
    --tokenizer carry/caseops_v1_reserved_sp8192.model > "$out/prepare.log" 2>&1 &)
timeout 120 python3 -m pytest -q tests/test_fused_mlp.py 2>&1 | tail -3 | tee "$out/pytest_gpu.log"
timeout 200 python3 bench/bench_mlp.py --json "$out/bench_mlp.json" 2>&1 | tee "$out/bench_mlp.log"
while [ ! -f /tmp/v2/manifest.json ] && pgrep -f prepare_caseops_data >/dev/null; do sleep 2; done
for variant in fused plain; do
    flag=$([ $variant = plain ] && echo --plain-mlp)
    DATA_PATH=/tmp/v2 timeout 170 python3 bench/bench_train.py --steps "$steps" $flag --json "$out/bench_train_$variant.json" \
        2>&1 | tee "$out/bench_train_$variant.log"
done
