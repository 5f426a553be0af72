"""Where the time of one training micro-step goes: the record model (compiled as training compiles it) runs
forward+backward on one packed 98,304-token row under torch.profiler; prints the top CUDA kernels.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--looping", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
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
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)
    print(f"looping:{int(args.looping)} (times are totals over 5 micro-steps)")
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
