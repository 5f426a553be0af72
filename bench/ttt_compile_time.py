"""Cold compile cost of the TTT eval's warm-up by torch.compile mode, one process per mode (run each with its own empty
TORCHINDUCTOR_CACHE_DIR): `marked` is train_gpt.py's (rows and window width marked dynamic before every call: one
compile per graph); `automatic` drops the marks (dynamic=None alone: a static compile first, then one more with the
sizes that changed symbolic); `dynamic` also passes dynamic=True (every input size symbolic). Prints the warm-up
seconds, the graphs compiled, dynamo's compile-time breakdown, then per profile_ttt batch kind the graphs compiled
after the warm-up (must be 0) and the replay seconds.

Usage (one GPU): TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/ttt_compile_time.py --mode marked
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from profile_ttt import KINDS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["marked", "automatic", "dynamic"], default="marked")
    args = parser.parse_args()
    if args.mode != "marked":
        tg.with_dynamic_sizes = lambda fn, dims: fn
    if args.mode == "dynamic":  # only PhasedTTT passes dynamic=None; build_model passes False
        compile_ = torch.compile
        torch.compile = lambda fn, dynamic=None, **kw: compile_(fn, dynamic=True if dynamic is None else dynamic, **kw)
    device = torch.device("cuda", 0)
    tg.configure_torch(device)
    h = tg.Hyperparameters.from_env()
    model = tg.build_model(h, device, log=lambda message: None)
    ttt = tg.PhasedTTT(model, h, 0, 1, device, print)
    start = time.perf_counter()
    ttt.warm_up()
    print(f"mode:{args.mode} warmup:{time.perf_counter() - start:.1f}s graphs:{tg.compiled_graph_count()}", flush=True)
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    generator = torch.Generator().manual_seed(0)
    for name, lengths in KINDS.items():
        data = tg.synthetic_ttt_data(lengths, model.tok_emb.num_embeddings, generator, device)
        docs = np.argsort(-np.asarray(lengths), kind="stable")
        for attempt in ("first", "replay"):
            graphs, sums = tg.compiled_graph_count(), torch.zeros(4, dtype=torch.float64, device=device)
            tg.synchronize(device)
            start = time.perf_counter()
            ttt.score_batch(data, 1, docs, sums)
            tg.synchronize(device)
            print(f"mode:{args.mode} {name}/{attempt}: {time.perf_counter() - start:.2f}s new_graphs:"
                  f"{tg.compiled_graph_count() - graphs} loss_sum:{float(sums[0]):.6e}", flush=True)


if __name__ == "__main__":
    main()
