#!/usr/bin/env bash
# Issue 7's one-GPU protocol on english_mix_v2 (validation = its first 2,000 documents, training = the rest,
# canonical tokenizer from ../shared/golden carried as carry/caseops_v1_reserved_sp8192.model).
# Run from the repo root on the GPU host; carry/ holds the data, the tokenizer and the brotli/constriction wheels.
#   bash bench/run_e2e_h100.sh train SECONDS   train + GPTQ + artifact + the whole eval in one process
#   bash bench/run_e2e_h100.sh eval ARTIFACT   EVAL_ONLY from an artifact, in a fresh process
set -euo pipefail
mode=${1:?train|eval} arg=${2:?seconds or artifact}
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site carry/wheels/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # FA4 adds its dsl_packages (bench/fa4_carry.sh)
[ -d /tmp/v2 ] || python3 prepare_caseops_data.py --docs carry/english_mix_v2.jsonl.xz --out /tmp/v2 \
    --val-docs 2000 --tokenizer carry/caseops_v1_reserved_sp8192.model
export DATA_PATH=/tmp/v2 TOKENIZER_PATH=carry/caseops_v1_reserved_sp8192.model PHASED_TTT_PREFIX_DOCS=100
export SEED=${SEED:-42} EMA_DECAY=${EMA_DECAY:-0.99} ALLOW_OVERSIZE_ARTIFACT=1
if [ "$mode" = train ]; then
    MAX_WALLCLOCK_SECONDS=$arg VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=25 RUN_ID=${RUN_ID:-h100_e2e_${arg}s_seed$SEED} \
        python3 train_gpt.py
else
    EVAL_ONLY=1 QUANTIZED_MODEL_PATH=$arg RUN_ID=${RUN_ID:-h100_eval_seed$SEED} python3 train_gpt.py
fi
