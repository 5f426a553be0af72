"""Cost of the TTT chunk step by shape, on one GPU: the record-size model (random weights; the cost does not depend on
them) scores synthetic batches with PhasedTTT.score_batch, after its warm-up. Prints per batch kind and mode
(TTT_CUDA_GRAPHS=0, launch: kernels launched per step; else graphs_first: capturing the kind's new shapes, and
graphs: replay only) the steps, row tokens as run (rounded shapes with graphs), seconds, ms per step, row tokens/s,
graphs compiled inside the timed part, the loss sum (graphs vs launch must agree to bf16 noise), then the top CUDA
kernels of two batches; these rates feed bench/ttt_cost_model.py.

Usage (one GPU): TTT_CUDA_GRAPHS=0 python bench/profile_ttt.py --json launch.json
                 python bench/profile_ttt.py --json graphs.json --compare launch.json
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
    parser.add_argument("--compare", default=None, help="an earlier run's --json (the other TTT_CUDA_GRAPHS mode)")
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
    results = {"warmup_s": warmup, "gpu": torch.cuda.get_device_name(device)}
    generator = torch.Generator().manual_seed(0)
    graphs = ttt.graphs
    for name, lengths in KINDS.items():
        data = tg.synthetic_ttt_data(lengths, model.tok_emb.num_embeddings, generator, device)
        docs = np.argsort(-np.asarray(lengths), kind="stable")
        step_tokens = tg.step_row_tokens(data.num_targets[docs], h, ttt.graphs is not None)  # as run
        steps, tokens = len(step_tokens), sum(step_tokens)
        # With graphs: the first pass captures this kind's new step shapes, the second only replays.
        modes = ["launch"] if graphs is None else ["graphs_first", "graphs"]
        for mode in modes:
            sums, compiled, captured = torch.zeros(4, dtype=torch.float64, device=device), tg.compiled_graph_count(), \
                ttt.capture_seconds
            tg.synchronize(device)
            start = time.perf_counter()
            ttt.score_batch(data, 1, docs, sums)
            tg.synchronize(device)
            seconds = time.perf_counter() - start
            results[f"{name}/{mode}"] = dict(
                steps=steps, row_tokens=tokens, seconds=seconds, ms_per_step=1000 * seconds / steps,
                row_tokens_per_s=tokens / seconds, new_graphs=tg.compiled_graph_count() - compiled,
                capture_s=ttt.capture_seconds - captured, loss_sum=float(sums[0]), count=float(sums[2]))
            print(f"{name}/{mode}: " + " ".join(f"{k}:{v:.4g}" if isinstance(v, float) else f"{k}:{v}"
                                                for k, v in results[f"{name}/{mode}"].items()), flush=True)
        other = json.loads(Path(args.compare).read_text()) if args.compare else {}
        mine, theirs = results[f"{name}/{modes[-1]}"], other.get(f"{name}/launch") or other.get(f"{name}/graphs")
        if theirs:
            print(f"{name}: vs {args.compare}: loss_sum rel diff "
                  f"{abs(mine['loss_sum'] - theirs['loss_sum']) / theirs['loss_sum']:.2e}, counts "
                  f"{mine['count']:.0f}/{theirs['count']:.0f}, time ratio {theirs['seconds'] / mine['seconds']:.2f}x")
    results["cuda_graphs"] = None if graphs is None else len(graphs)
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
