"""Cost of the TTT chunk step by shape, on one GPU: the record-size model (random weights; the cost does not depend
on them) scores synthetic batches with PhasedTTT.score_batch, after its warm-up. Prints per batch kind the steps,
row tokens, seconds, ms per step and row tokens/s, whether anything compiled inside the timed part, and the top CUDA
kernels of one long-document batch; these rates feed the eval extrapolation in bench_eval.py.

Usage (one GPU): python bench/profile_ttt.py [--json out.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

# Batches of 64 documents (target counts): short, medium, window-sized, sliding, and a long one nearly alone.
KINDS = {"64x480": [480] * 64, "64x1200": [1200] * 64, "64x2560": [2560] * 64, "16x4000": [4000] * 16,
         "1x6000+63x48": [6000] + [48] * 63}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-cudnn-attention", action="store_true", help="keep SDPA off its cuDNN backend")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    tg.configure_torch(device)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    h = tg.Hyperparameters.from_env()
    model = tg.build_model(h, device, log=lambda message: None)
    ttt = tg.PhasedTTT(model, h, 0, 1, device, print)
    warmup = ttt.warm_up()
    results, generator = {"warmup_s": warmup, "gpu": torch.cuda.get_device_name(device)}, torch.Generator().manual_seed(0)
    for name, lengths in KINDS.items():
        data = tg.synthetic_ttt_data(lengths, model.tok_emb.num_embeddings, generator, device)
        docs = np.argsort(-np.asarray(lengths), kind="stable")
        plan = tg.chunk_plan(data.num_targets[docs], h)
        sums, graphs = torch.zeros(4, dtype=torch.float64, device=device), tg.compiled_graph_count()
        tg.synchronize(device)
        start = time.perf_counter()
        ttt.score_batch(data, 1, docs, sums)
        tg.synchronize(device)
        seconds = time.perf_counter() - start
        tokens = sum(max(r, tg.TTT_MIN_ROWS) * w for r, _, w in plan)
        results[name] = dict(steps=len(plan), row_tokens=tokens, seconds=seconds, ms_per_step=1000 * seconds / len(plan),
                             row_tokens_per_s=tokens / seconds, new_graphs=tg.compiled_graph_count() - graphs)
        print(f"{name}: " + " ".join(f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}"
                                     for k, v in results[name].items()), flush=True)
    for name, sort in (("64x2560", "cuda_time_total"), ("1x6000+63x48", "self_cpu_time_total")):
        data = tg.synthetic_ttt_data(KINDS[name], model.tok_emb.num_embeddings, generator, device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            ttt.score_batch(data, 2, np.arange(len(KINDS[name])), torch.zeros(4, dtype=torch.float64, device=device))
            tg.synchronize(device)
        print(f"profile {name} by {sort}")
        print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    print(f"peak_memory_gib:{torch.cuda.max_memory_allocated(device) / 2**30:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
