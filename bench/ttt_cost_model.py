"""Extrapolate the TTT eval to FineWeb on 8 GPUs from measured step costs (CPU only, no GPU needed).

Fits seconds = a * chunk_steps + b * row_tokens (a: per-step host and launch cost; b: per row-token GPU cost) by
least squares to bench/profile_ttt.py's batch kinds, checks the fit on a measured whole-eval run, and applies it to
the TTT plan of a FineWeb-like document set split over 8 ranks (FineWeb's own lengths are not here: log-normal with
its mean of ~957 targets per document, 50,000 documents, the record's 2,500 prefix documents).

Usage: python bench/ttt_cost_model.py [--profile bench/results/2026-11-25-h100-ttt/profile_ttt.json]
           [--check-steps 1116 --check-row-tokens 29341328 --check-seconds 124.4]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from bench_eval import RECORD_DOCS, RECORD_PREFIX_DOCS, batch_work, fineweb_like_lengths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "2026-11-25-h100-ttt" / "profile_ttt.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(RESULTS))
    parser.add_argument("--check-steps", type=int, default=1116, help="a measured eval: its chunk steps")
    parser.add_argument("--check-row-tokens", type=int, default=29_341_328)
    parser.add_argument("--check-seconds", type=float, default=124.4, help="its scoring seconds (both phases)")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    kinds = {k: v for k, v in json.loads(Path(args.profile).read_text()).items() if isinstance(v, dict)}
    design = np.array([[v["steps"], v["row_tokens"]] for v in kinds.values()], dtype=float)
    seconds = np.array([v["seconds"] for v in kinds.values()])
    (a, b), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    print(f"fit: {1000 * a:.1f} ms per chunk step + {1e6 * b:.3f} s per million row tokens "
          f"({1 / b / 1e3:.0f}k row tokens/s)")
    for (name, v), predicted in zip(kinds.items(), design @ [a, b]):
        print(f"  {name:14s} measured {v['seconds']:6.2f}s  model {predicted:6.2f}s")
    check = a * args.check_steps + b * args.check_row_tokens
    print(f"check: {args.check_steps} steps, {args.check_row_tokens} row tokens -> model {check:.1f}s, "
          f"measured {args.check_seconds:.1f}s")
    h = tg.Hyperparameters(phased_ttt_prefix_docs=RECORD_PREFIX_DOCS)
    lengths = fineweb_like_lengths(RECORD_DOCS, np.random.default_rng(0))
    work = batch_work(lengths, h)
    costs = [a * steps + b * tokens for steps, tokens in work]
    shares = tg.assign_batches(range(len(work)), [int(1e6 * c) for c in costs], args.gpus)
    per_rank = [sum(costs[i] for i in share) for share in shares]
    print(f"fineweb-like: {len(lengths)} docs, {lengths.sum()} targets, {sum(s for s, _ in work)} steps, "
          f"{sum(t for _, t in work)} row tokens; on {args.gpus} GPUs the slowest rank scores for "
          f"{max(per_rank):.0f}s (mean {np.mean(per_rank):.0f}s, longest single batch {max(costs):.0f}s)")


if __name__ == "__main__":
    main()
