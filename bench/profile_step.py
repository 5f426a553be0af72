"""Where the time of one training micro-step goes: the record model (compiled as training compiles it) runs
forward+backward on one packed 98,304-token row under torch.profiler; prints the top CUDA kernels by their own GPU
time and a per-micro-step summary: attention kernels, GEMMs, Triton (inductor's fused elementwise) and the rest.

Usage (one GPU): python bench/profile_step.py [--looping] [--rows 20] [--trace out.json]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def packed_row(tokens: int, mean_doc: int, vocab: int, device):
    rng = np.random.default_rng(0)
    ids = rng.integers(8, vocab, tokens + 1)
    starts = np.unique(np.concatenate([[0], np.cumsum(rng.geometric(1 / mean_doc, tokens // 100))]))
    starts = starts[starts < tokens]
    ids[starts] = tg.BOS_ID
    cu, _ = tg.build_cu_seqlens(starts, tokens, 2048)
    cu = tg.fit_cu_seqlens(torch.from_numpy(cu).to(device), tokens)
    row = torch.from_numpy(ids).to(device)
    return row[:-1].unsqueeze(0), row[1:].unsqueeze(0), cu


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered:
        return "attention"
    if "nvjet" in lowered or "gemm" in lowered or "xmma" in lowered or lowered.startswith("aten::mm"):
        return "gemm"
    return "triton" if lowered.startswith("triton_") else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--looping", action="store_true")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--trace")
    args = parser.parse_args()
    device = torch.device("cuda")
    h = tg.Hyperparameters()
    tg.configure_torch(device)
    model = tg.build_model(h, device, print)
    model.set_looping(args.looping)
    x, y, cu = packed_row(h.train_batch_tokens // tg.MICRO_BATCHES, 800, h.vocab_size, device)

    def step():
        with tg.autocast(device):
            loss = model(x, y, cu, h.train_seq_len)
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"looping:{int(args.looping)} (times are totals over 5 micro-steps)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    kinds = {}
    for e in events:
        ms = e.self_device_time_total / 1e3 / 5
        if e.device_type == torch.autograd.DeviceType.CUDA and ms > 0:  # kernels, not the ops that launch them
            kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + ms
    print("per micro-step GPU ms: " + " ".join(f"{k}:{v:.1f}" for k, v in sorted(kinds.items())) +
          f" total:{sum(kinds.values()):.1f}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
