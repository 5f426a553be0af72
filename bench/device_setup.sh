# Shared start of the device-call scripts (sourced, not run): $out, the GPU's name in $out/gpu.txt, FA4 installed
# when `bash bench/fa4_carry.sh stage` ran in the call before (carry fa4b/ now), the attention backend auto picks,
# and english_mix_v2 tokenized into /tmp/v2 in the background (carry carry/); wait_for_data blocks until it is there.
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/gpu.txt"
[ -f /tmp/fa4/cu13part.aa ] && bash bench/fa4_carry.sh install && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import train_gpt as tg, torch; print('attention backend:', tg.resolve_attention_backend('auto', torch.device('cuda')))" \
    | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
[ -d /tmp/v2 ] || (python3 prepare_caseops_data.py --docs carry/english_mix_v2.jsonl.xz --out /tmp/v2 --val-docs 2000 \
    --tokenizer carry/caseops_v1_reserved_sp8192.model > "$out/prepare.log" 2>&1 &)

wait_for_data() {
    while [ ! -f /tmp/v2/manifest.json ] && pgrep -f prepare_caseops_data >/dev/null; do sleep 2; done
}
