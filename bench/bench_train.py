"""Training throughput of train_gpt.py on one GPU at the record configuration, before and after looping.

Usage (from the repo root, one GPU):
    python bench/bench_train.py [--steps 10] [--warmup-steps 20] [--peak-tflops 989] [--plain-mlp]
        [--activation-memory-budget 1.0] [--json out.json]
Data: DATA_PATH's fineweb_train_*.bin shards when DATA_PATH is set, else synthetic random-document shards
written to /tmp/bench_train_data (token ids uniform, document lengths exponential with mean 700 tokens).
Every Hyperparameters env var applies (e.g. NUM_LAYERS=..., TRAIN_CUDA_GRAPHS=0 for micro-steps issued op by op);
the step is the record's 786,432 tokens as 8 micro-steps of 98,304 on this one GPU (spec 02 §5.4).

Reported per mode (unlooped, looped): first-step seconds (compile included), ms per optimizer step and per
98,304-token micro-step, tok/s, peak memory, and MFU = model FLOPs per token x tok/s / peak, where
    FLOPs/token = 6 * (A * P_layer + V * d)  +  6 * A * d * sum_i(n_i^2) / T
A = layer applications (11 unlooped, 17 looped), P_layer = matmul parameters of one layer (Wq, Wk, Wv, Wo,
Wup, Wdown: 2,883,584 at the record size), V * d = the tied output head (the embedding lookup is no matmul);
the second term is causal attention (QK^T and AV: 2 * n^2 * d forward per segment of n tokens, x3 for
forward + backward) over the packed segments n_i of a T-token micro-batch, averaged over 64 micro-batches.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

SYNTHETIC_DIR = Path("/tmp/bench_train_data")


def synthetic_shards(vocab_size: int, tokens: int = 20_000_000) -> str:
    """One training shard of random documents (BOS + ids in 8..V-1), written once."""
    path = SYNTHETIC_DIR / "fineweb_train_000000.bin"
    if not path.exists():
        rng = np.random.default_rng(0)
        stream = rng.integers(8, vocab_size, tokens, dtype=np.uint16)
        stream[np.cumsum(rng.geometric(1 / 700, tokens // 300)) % tokens] = tg.BOS_ID
        stream[0] = tg.BOS_ID
        header = np.zeros(256, dtype="<i4")
        header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, tokens
        SYNTHETIC_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(header.tobytes() + stream.astype("<u2").tobytes())
    return str(SYNTHETIC_DIR)


def attention_sum_sq(files: list[str], h: tg.Hyperparameters, batches: int = 64) -> float:
    """Mean over micro-batches of sum_i n_i^2 over the attention segments (from cu_seqlens)."""
    loader = tg.DocumentPackingLoader(files, 0, 1, h.train_batch_tokens // tg.MICRO_BATCHES, h.train_seq_len,
                                      torch.device("cpu"))
    total = 0.0
    for _ in range(batches):
        lengths = np.diff(loader.next_batch()[2].numpy().astype(np.int64))
        total += float((lengths ** 2).sum())
    return total / batches


def flops_per_token(model: tg.GPT, h: tg.Hyperparameters, sum_sq: float) -> float:
    banks = (model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank)
    per_layer = sum(bank.numel() for bank in banks) / h.num_layers
    applications = sum(len(layers) for layers in model.schedule())
    tokens = h.train_batch_tokens // tg.MICRO_BATCHES
    return (6 * (applications * per_layer + h.vocab_size * h.model_dim)
            + 6 * applications * h.model_dim * sum_sq / tokens)


def time_steps(trainer: tg.Trainer, steps: int, warmup_steps: int) -> dict:
    device = trainer.device
    torch.cuda.reset_peak_memory_stats(device)
    tg.synchronize(device)
    start = time.perf_counter()
    for k in range(warmup_steps):
        trainer.step(k, 1.0)
        tg.synchronize(device)
        if k == 0:
            first = time.perf_counter() - start
    start, graphs = time.perf_counter(), tg.compiled_graph_count()
    for k in range(steps):
        trainer.step(warmup_steps + k, 1.0)
    tg.synchronize(device)
    step_ms = 1000 * (time.perf_counter() - start) / steps
    return dict(first_step_s=first, graphs_compiled_in_timed_steps=tg.compiled_graph_count() - graphs,
                step_ms=step_ms, micro_step_ms=step_ms / tg.MICRO_BATCHES,
                tokens_per_s=trainer.h.train_batch_tokens / (step_ms / 1000),
                peak_allocated_mib=torch.cuda.max_memory_allocated(device) >> 20,
                peak_reserved_mib=torch.cuda.max_memory_reserved(device) >> 20)


def optimizer_ms(trainer: tg.Trainer, repeats: int = 5) -> float:
    """AdamW + Muon step time alone, on random gradients."""
    for p in trainer.grad_sum.params:
        p.grad = torch.randn_like(p) * 1e-3
    tg.synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(repeats):
        trainer.adamw.step()
        trainer.muon.step()
    tg.synchronize(trainer.device)
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="untimed steps per mode, as train_gpt.py's WARMUP_STEPS: micro-batches with another "
                             "cu_seqlens bucket compile a graph of their own, so a short warm-up leaves compiles in "
                             "the timed steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--plain-mlp", action="store_true",
                        help="the MLP as plain ops (compiled) instead of the fused Triton GEMM epilogues")
    parser.add_argument("--activation-memory-budget", type=float, default=1.0,
                        help="torch._functorch.config.activation_memory_budget for every compile (bench/saved_tensors.py)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    tg.MLP.fused = not args.plain_mlp
    torch._functorch.config.activation_memory_budget = args.activation_memory_budget
    if not torch.cuda.is_available():
        sys.exit("bench_train.py: no CUDA device; this benchmark measures GPU training throughput")
    if args.steps < 1 or args.warmup_steps < 1:
        sys.exit("bench_train.py: --steps and --warmup-steps must be >= 1")
    h = tg.Hyperparameters.from_env()
    data = os.environ.get("DATA_PATH") or synthetic_shards(h.vocab_size)
    files = tg.train_shard_files(data)
    device = torch.device("cuda", 0)
    tg.configure_torch(device)
    print(f"bench_train torch:{torch.__version__} gpu:{torch.cuda.get_device_name(device)} data:{data} "
          f"shards:{len(files)} mlp:{'fused' if tg.MLP.fused else 'plain'} "
          f"activation_memory_budget:{args.activation_memory_budget}")
    model = tg.build_model(h, device, print)
    trainer = tg.Trainer(h, model, files, 0, 1, device, log=print)
    sum_sq = attention_sum_sq(files, h)
    results = {}
    for looping in (False, True):
        model.set_looping(looping)
        r = time_steps(trainer, args.steps, args.warmup_steps)
        r["flops_per_token"] = flops_per_token(model, h, sum_sq)
        r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / (args.peak_tflops * 1e12)
        results["looped" if looping else "unlooped"] = r
        print(f"bench_train looping:{int(looping)} first_step:{r['first_step_s']:.1f}s step:{r['step_ms']:.1f}ms "
              f"graphs_compiled_in_timed_steps:{r['graphs_compiled_in_timed_steps']} "
              f"micro_step:{r['micro_step_ms']:.2f}ms tok/s:{r['tokens_per_s']:.0f} "
              f"gflop_per_token:{r['flops_per_token'] / 1e9:.3f} mfu:{100 * r['mfu']:.1f}% "
              f"peak_alloc:{r['peak_allocated_mib']}MiB peak_reserved:{r['peak_reserved_mib']}MiB")
    results["optimizer_ms"] = optimizer_ms(trainer)
    results["compiled_graphs"] = tg.compiled_graph_count()
    print(f"bench_train optimizer_step:{results['optimizer_ms']:.2f}ms graphs:{results['compiled_graphs']} "
          f"attention_sum_sq_per_micro_batch:{sum_sq:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
