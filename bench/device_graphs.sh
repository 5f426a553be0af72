#!/usr/bin/env bash
# One device call for the training micro-steps replayed from CUDA graphs (session 9): the GPU tests of the graphs
# and of the fused MLP, bench/ab_train.py --compare graphs (graphs against op-by-op issue, alternated in one
# process), bench/step_gap.py (the GPU's idle time with graphs) and bench/bench_train.py, on english_mix_v2 as
# tokenized by bench/run_e2e_h100.sh (prepared in the background while the tests run).
# Carry: carry/ and fa4b/, right after a call that ran `bash bench/fa4_carry.sh stage` with fa4a/.
# Usage there: bash bench/device_graphs.sh [ROUNDS=3] [STEPS=5]
set -uo pipefail
rounds=${1:-3} steps=${2:-5} out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
[ -f /tmp/fa4/cu13part.aa ] && bash bench/fa4_carry.sh install && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import train_gpt as tg, torch; print('attention backend:', tg.resolve_attention_backend('auto', torch.device('cuda')))" \
    | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
[ -d /tmp/v2 ] || (python3 prepare_caseops_data.py --docs carry/english_mix_v2.jsonl.xz --out /tmp/v2 --val-docs 2000 \
    --tokenizer carry/caseops_v1_reserved_sp8192.model > "$out/prepare.log" 2>&1 &)
timeout 240 python3 -m pytest -q -p no:warnings -p no:logging --tb=short tests/test_train_graphs.py tests/test_fused_mlp.py 2>&1 | tail -60 \
    | tee "$out/pytest_gpu.log"
while [ ! -f /tmp/v2/manifest.json ] && pgrep -f prepare_caseops_data >/dev/null; do sleep 2; done
DATA_PATH=/tmp/v2 timeout 260 python3 bench/ab_train.py --compare graphs --rounds "$rounds" --steps "$steps" \
    --json "$out/ab_graphs.json" 2>&1 | tee "$out/ab_graphs.log"
DATA_PATH=/tmp/v2 timeout 150 python3 bench/step_gap.py --steps 3 --warmup-steps 6 2>&1 | tee "$out/step_gap.log"
