"""GPU benchmark of the attention backends, one transformer block and the whole training micro-step.

Usage (from the repo root, on a CUDA machine):
    python bench/bench_attention.py                          # every backend, then block + model with ATTN_BACKEND=auto
    python bench/bench_attention.py --model-backends varlen,flex --iters 20

1. Attention alone: one 98,304-token row of documents of ~800 tokens (exponential lengths, cut every 2,048 like the
   loader), cu_seqlens right-padded with T to 256 entries (the training shape), 8 query / 4 KV heads of 64, bf16.
   Each backend runs compiled (dynamic=False, fullgraph=True), forward+backward; its output and q/k/v gradients
   are compared with the exact reference (the padded-segment SDPA path in fp32): max |difference| next to
   max |reference| (bf16 inputs: expect ~1e-2 relative).
2. One transformer block (record config, layer 4, random weights) forward+backward under bf16 autocast.
3. The whole micro-step `model(ids, targets, cu_seqlens, 2048)` + backward at the record config, looping off and
   on, compiled as training compiles it (train_gpt.compile_model).
Prints milliseconds per call (median over --iters after warm-up) and compile seconds. A failing piece prints
its error and the script goes on.
"""
import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

TOKENS, HEADS, KV_HEADS, HEAD_DIM, MAX_SEQLEN, CU_ENTRIES = 98_304, 8, 4, 64, 2048, 256


def packed_documents(total: int, mean_len: int, device, seed: int = 0):
    """ids [1, total] with BOS at each document start, and cu_seqlens (docs cut every MAX_SEQLEN, padded)."""
    g = torch.Generator().manual_seed(seed)
    bounds, pos = [0], 0
    while pos < total:
        length = max(1, int(torch.empty(1).exponential_(1.0 / mean_len, generator=g).item()))
        doc_end = min(total, pos + length)
        starts = list(range(pos, doc_end, MAX_SEQLEN))
        bounds += starts[1:] + [doc_end]
        pos = doc_end
    cu = torch.tensor(bounds + [total] * max(0, CU_ENTRIES - len(bounds)), dtype=torch.int32)
    ids = torch.randint(8, 8192, (1, total), generator=g)
    ids[0, torch.tensor(bounds[:-1])] = tg.BOS_ID
    return ids.to(device), cu.to(device), len(bounds) - 1


def error_summary(e: Exception) -> str:
    """First line of the error, plus the exception dynamo saw when it wrapped one (its first line is generic)."""
    lines = str(e).splitlines() or [""]
    inner = [line.strip() for line in lines if "raised exception" in line]
    return f"{type(e).__name__}: {lines[0][:200]}" + (f" [{inner[0][:300]}]" if inner else "")


def timed(fn, iters: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds of the first call, which includes compilation; median ms of `iters` later calls)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return first, statistics.median(times)


def attention_grads(backend: str, q, k, v, cu, grad_out, compiled: bool = True):
    """(fwd+bwd closure, [out, dq, dk, dv] in fp32). flex gets its block mask built outside, as GPT does."""
    segments = tg.document_block_mask(cu, len(q)) if backend == "flex" else cu

    def run(q, k, v, segments):
        return tg.varlen_causal_attention(q, k, v, segments, MAX_SEQLEN, backend)

    fn = torch.compile(run, dynamic=False, fullgraph=True) if compiled else run
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        out = fn(q, k, v, segments)
        out.backward(grad_out)
        return out

    out = step()
    return step, [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


def bench_attention(args, device) -> None:
    ids, cu, docs = packed_documents(TOKENS, args.doc_len, device)
    print(f"attention: T={TOKENS} docs={docs} cu_entries={cu.numel()} heads={HEADS}/{KV_HEADS}x{HEAD_DIM} bf16")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(TOKENS, HEADS, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16)
    k = torch.randn(TOKENS, KV_HEADS, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(TOKENS, KV_HEADS, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16)
    q = tg.rms_norm(q) * 5.0  # the model's scores: unit-RMS q and k, gain 5
    k = tg.rms_norm(k)
    grad_out = torch.randn(TOKENS, HEADS, HEAD_DIM, device=device, generator=g, dtype=torch.bfloat16)
    _, reference = attention_grads("sdpa", q.float(), k.float(), v.float(), cu, grad_out.float(), compiled=False)
    for backend in args.backends.split(","):
        try:
            start = time.perf_counter()
            step, got = attention_grads(backend, q, k, v, cu, grad_out)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            _, ms = timed(step, args.iters)
            diffs = " ".join(f"{name}:{(a - b).abs().max().item():.1e}/{b.abs().max().item():.1e}"
                             for name, a, b in zip(("out", "dq", "dk", "dv"), got, reference))
            print(f"  {backend:7s} fwd+bwd {ms:7.2f} ms  compile+first {compile_s:6.1f} s  "
                  f"max|diff|/max|ref| {diffs}")
            if backend == "flex":
                _, mask_ms = timed(lambda: tg.document_block_mask(cu, TOKENS), args.iters)
                print(f"  flex    block mask build (once per forward, eager) {mask_ms:7.2f} ms")
        except Exception as e:  # noqa: BLE001 - report and go on to the next backend
            print(f"  {backend:7s} FAILED: {error_summary(e)}")
            if args.verbose:
                traceback.print_exc()


def record_model(backend: str, device) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(tg.Hyperparameters(attn_backend=backend)).to(device)
    with torch.no_grad():  # trained-looking weights: no zero projections, gates away from init
        for name, p in model.named_parameters():
            if name not in ("softcap_pos", "softcap_neg"):
                p.add_(0.02 * torch.randn_like(p))
    model.tok_emb.bfloat16()  # as in training (spec 02 §2.11): only the embedding is stored bf16
    tg.compile_model(model)
    return model


def bench_block(model: tg.GPT, args, device) -> None:
    _, cu, _ = packed_documents(TOKENS, args.doc_len, device)
    rope, scales = model.constants(TOKENS, device)
    backend = tg.resolve_attention_backend(model.attn_backend, device)
    x = torch.randn(1, TOKENS, 512, device=device, dtype=torch.bfloat16, requires_grad=True)
    x0 = torch.randn(1, TOKENS, 512, device=device, dtype=torch.bfloat16)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            weights = model.layer_weights()[4]
            out = model.blocks[4](x, x0, weights, scales[4], (rope, cu, MAX_SEQLEN, backend))
        out.float().square().mean().backward()

    first, ms = timed(step, args.iters)
    print(f"  block (layer 4, {backend}) fwd+bwd {ms:7.2f} ms  compile+first {first:6.1f} s")


def bench_model(model: tg.GPT, args, device) -> None:
    ids, cu, _ = packed_documents(TOKENS, args.doc_len, device)
    targets = torch.roll(ids, -1, dims=1)
    torch.cuda.reset_peak_memory_stats()
    for looping in (False, True):
        model.set_looping(looping)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, targets, cu, MAX_SEQLEN)
            loss.backward()

        first, ms = timed(step, args.iters)
        model.zero_grad(set_to_none=True)
        tokens_per_s = TOKENS / ms * 1000
        print(f"  model micro-step looping={int(looping)} fwd+bwd {ms:7.2f} ms ({tokens_per_s / 1e6:.2f} M tok/s)"
              f"  compile+first {first:6.1f} s  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    model.set_looping(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="fa3,fa4,varlen,flex,sdpa")
    parser.add_argument("--model-backends", default="auto", help="comma list; '' skips block and model")
    parser.add_argument("--doc-len", type=int, default=800)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64
    kernels = tg.load_attention_kernels()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; importable: fa3 {kernels['fa3'] is not None}"
          f" fa4 {kernels['fa4'] is not None}; varlen kwargs: {(kernels['varlen'] or [None, None])[1]}")
    bench_attention(args, device)
    for backend in filter(None, args.model_backends.split(",")):
        print(f"record config, ATTN_BACKEND={backend}:")
        try:
            model = record_model(backend, device)
            bench_block(model, args, device)
            bench_model(model, args, device)
            del model
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            print(f"  FAILED: {error_summary(e)}")
            if args.verbose:
                traceback.print_exc()


if __name__ == "__main__":
    main()
