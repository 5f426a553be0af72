"""A/B of two training-step variants in one process, alternated over several rounds of timed optimizer steps, so that
drift between runs does not decide it.

  --compare graphs: micro-steps replayed from CUDA graphs (train_gpt's default) against issued op by op;
  --compare mlp:    the MLP's fused Triton epilogues (train_gpt.MLP.fused) against the plain ops (both from graphs).

Usage (repo root, one GPU): python bench/ab_train.py --compare graphs [--rounds 3] [--steps 5] [--json out.json]
Data and settings as bench/bench_train.py (DATA_PATH's shards or synthetic ones, every Hyperparameters env var).
Each variant is compiled and captured before round 1 (MLP.fused is a guard of the compiled blocks: one graph set each).
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402
from bench_train import tg  # noqa: E402


def variant_setters(trainer: tg.Trainer, compare: str) -> dict:
    """name -> function that switches the trainer to that variant; each variant keeps graphs of its own."""
    def setter(fused: bool, graphed: bool):
        graphs, settled = {}, set()

        def use():
            tg.MLP.fused = fused
            trainer.graphs, trainer.settled_keys = (graphs if graphed else None), settled
        return use
    if compare == "graphs":
        return {"graphs": setter(True, True), "eager": setter(True, False)}
    return {"fused": setter(True, True), "plain": setter(False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", choices=("graphs", "mlp"), required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant and round")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps per variant before round 1")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ab_train.py: no CUDA device")
    h = tg.Hyperparameters.from_env()
    files = tg.train_shard_files(os.environ.get("DATA_PATH") or bt.synthetic_shards(h.vocab_size))
    device = torch.device("cuda", 0)
    tg.configure_torch(device)
    model = tg.build_model(h, device, print)
    trainer = tg.Trainer(h, model, files, 0, 1, device, log=print)
    variants = variant_setters(trainer, args.compare)
    (a, b), results = variants, {"gpu": torch.cuda.get_device_name(device), "compare": args.compare}
    for looping in (False, True):
        model.set_looping(looping)
        times = {name: [] for name in variants}
        for use in variants.values():
            use()
            bt.time_steps(trainer, 1, args.warmup_steps)
        for r in range(args.rounds):
            for name in ((a, b) if r % 2 == 0 else (b, a)):
                variants[name]()
                t = bt.time_steps(trainer, args.steps, 1)
                times[name].append(t["micro_step_ms"])
                print(f"ab_train looping:{int(looping)} round:{r} {name}: {t['micro_step_ms']:.2f} ms/micro-step "
                      f"graphs_compiled_in_timed_steps:{t['graphs_compiled_in_timed_steps']} "
                      f"peak_alloc:{t['peak_allocated_mib']}MiB", flush=True)
        med = {name: statistics.median(v) for name, v in times.items()}
        key = "looped" if looping else "unlooped"
        results[key] = {"micro_step_ms": times, "median_ms": med,
                        "tokens_per_s": {n: h.train_batch_tokens / tg.MICRO_BATCHES / (m / 1000) for n, m in med.items()}}
        print(f"ab_train {key}: {a} {med[a]:.2f} ms vs {b} {med[b]:.2f} ms per micro-step "
              f"({100 * (med[b] / med[a] - 1):+.2f}% throughput for {a})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
