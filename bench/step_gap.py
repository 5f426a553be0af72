"""Where a training micro-step's wall time exceeds its GPU kernel time (one GPU, record configuration).

bench_train.py's micro-step (H200, looped) takes 130.6 ms of wall time while bench/profile_step.py sums 117.5 ms of
kernels for forward and backward alone; this looks at the whole step. Per mode (unlooped, looped), after a compile
warm-up, it prints:
  - wall ms per micro-step of Trainer.step (loader, forward, backward, clipping, optimizer), and the host ms to issue
    it (the loop returns before the GPU is done when the host is ahead);
  - the same with Python's garbage collector off (a collection pause can starve the GPU);
  - from one profiled step: the GPU's busy ms (union of kernel intervals) against the step's span, the idle time in
    gaps > 20 us, and the largest gaps with the kernels on either side;
  - the host syncs torch sees in one step (torch.cuda.set_sync_debug_mode).
Usage (one GPU): DATA_PATH=/tmp/v2 python bench/step_gap.py [--steps 4] [--warmup-steps 12]
"""
import argparse
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from bench_train import synthetic_shards  # noqa: E402


def timed_steps(trainer: tg.Trainer, steps: int) -> tuple[float, float]:
    """(host ms, wall ms) per micro-step over `steps` optimizer steps."""
    tg.synchronize(trainer.device)
    start = time.perf_counter()
    for k in range(steps):
        trainer.step(k, 1.0)
    host = time.perf_counter() - start
    tg.synchronize(trainer.device)
    wall = time.perf_counter() - start
    return (1000 * host / (steps * tg.MICRO_BATCHES), 1000 * wall / (steps * tg.MICRO_BATCHES))


def gpu_gaps(trainer: tg.Trainer, top: int = 8) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trainer.step(0, 1.0)
        tg.synchronize(trainer.device)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == DeviceType.CUDA)
    busy, gaps, (end, previous) = 0.0, [], (kernels[0][0], kernels[0][2])
    for start, stop, name in kernels:
        if start > end + 20:  # us
            gaps.append((start - end, previous, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, previous = stop, name
    span = (end - kernels[0][0]) / 1000
    idle = sum(g for g, _, _ in gaps) / 1000
    print(f"  profiled step: span:{span:.1f}ms busy:{busy / 1000:.1f}ms ({100 * busy / 1000 / span:.1f}%) "
          f"idle_in_gaps>20us:{idle:.1f}ms gaps:{len(gaps)} kernels:{len(kernels)}")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"    gap {gap / 1000:.2f}ms after {before[:70]} before {after[:70]}")


def host_syncs(trainer: tg.Trainer) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(0, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno} {str(w.message)[:80]}"
            syncs[key] = syncs.get(key, 0) + 1
    print(f"  host syncs in one step: {sum(syncs.values())}")
    for key, count in sorted(syncs.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {count}x {key}")


def attention_cost(h: tg.Hyperparameters, device: torch.device, calls: int = 30) -> None:
    """Host and wall us per forward+backward of the attention kernel alone (one 98,304-token row, ~800-token
    documents): a kernel whose host side costs about its GPU time leaves the GPU waiting."""
    total, dim = h.train_batch_tokens // tg.MICRO_BATCHES, h.model_dim // h.num_heads
    q = torch.randn(total, h.num_heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, h.num_kv_heads, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    cu = torch.tensor(tg.build_cu_seqlens(list(range(0, total, 800)), total, h.train_seq_len)[0], device=device)
    for repeat in range(2):  # the first builds the kernels
        tg.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            tg.varlen_causal_attention(q, k, v, cu, h.train_seq_len, h.attn_backend).sum().backward()
        host = time.perf_counter() - start
        tg.synchronize(device)
        wall = time.perf_counter() - start
    print(f"attention fwd+bwd: host {1e6 * host / calls:.0f}us wall {1e6 * wall / calls:.0f}us per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=12)
    args = parser.parse_args()
    h = tg.Hyperparameters.from_env()
    files = tg.train_shard_files(os.environ.get("DATA_PATH") or synthetic_shards(h.vocab_size))
    device = torch.device("cuda", 0)
    tg.configure_torch(device)
    model = tg.build_model(h, device, print)
    trainer = tg.Trainer(h, model, files, 0, 1, device, log=print)
    print(f"step_gap torch:{torch.__version__} gpu:{torch.cuda.get_device_name(device)} "
          f"attention:{tg.resolve_attention_backend(h.attn_backend, device)}")
    attention_cost(h, device)
    for looping in (False, True):
        model.set_looping(looping)
        start = time.perf_counter()
        for k in range(args.warmup_steps):
            trainer.step(k, 1.0)
        tg.synchronize(device)
        print(f"looping:{int(looping)} warm-up {time.perf_counter() - start:.1f}s")
        host, wall = timed_steps(trainer, args.steps)
        print(f"  micro-step: wall {wall:.2f}ms host {host:.2f}ms")
        gc.collect()
        gc.disable()
        host, wall = timed_steps(trainer, args.steps)
        gc.enable()
        print(f"  micro-step, gc off: wall {wall:.2f}ms host {host:.2f}ms")
        gpu_gaps(trainer)
        host_syncs(trainer)


if __name__ == "__main__":
    main()
