"""Extrapolate the TTT eval to FineWeb on 8 GPUs from measured step costs (CPU only, no GPU needed).

Fits seconds = a * chunk_steps + b * row_tokens (a: per-step host and launch cost; b: per row-token GPU cost; row
tokens as run, i.e. the CUDA graphs' rounded shapes in graphs mode) by
least squares to bench/profile_ttt.py's batch kinds, checks the fit on a measured whole-eval run, and applies it to
the TTT plan of a FineWeb-like document set split over 8 ranks (FineWeb's own lengths are not here: log-normal with
its mean of ~957 targets per document, 50,000 documents, the record's 2,500 prefix documents).

Usage: python bench/ttt_cost_model.py [--profile bench/results/2026-11-25-h100-fa4/profile_ttt_fa4.json]
           [--mode graphs] [--check-docs /tmp/v2 --check-seconds 64.3 --capture-seconds 0.12]
       python bench/ttt_cost_model.py --profile bench/results/2026-11-25-h100-ttt/profile_ttt.json --mode launch
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

from profile_ttt import KINDS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "2026-11-25-h100-fa4" / "profile_ttt_fa4.json"


def kind_work(lengths: list[int], h: tg.Hyperparameters, graphed: bool) -> tuple[int, int]:
    """(chunk steps, row tokens as run) of one profile_ttt batch kind."""
    steps = tg.step_row_tokens(np.sort(np.asarray(lengths))[::-1], h, graphed)
    return len(steps), sum(steps)


def graph_shapes(lengths: np.ndarray, batch_ids, h: tg.Hyperparameters) -> int:
    """Distinct CUDA graphs (rows, width, update) that these batches of the TTT schedule capture."""
    batches, _ = tg.ttt_schedule(lengths, h.phased_ttt_prefix_docs, h.ttt_batch_size)
    return len({(*tg.step_shape(r, w, h, True), t > 0) for i in batch_ids for r, t, w in tg.chunk_plan(
        lengths[batches[i]], h)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(RESULTS))
    parser.add_argument("--mode", default="graphs", choices=["graphs", "launch"],
                        help="which of profile_ttt's modes to fit (graphs: replay-only passes)")
    parser.add_argument("--check-docs", default=None, help="a shard folder whose validation documents a measured "
                        "eval scored (with --check-count first documents)")
    parser.add_argument("--check-count", type=int, default=2000)
    parser.add_argument("--check-prefix", type=int, default=100, help="that eval's PHASED_TTT_PREFIX_DOCS")
    parser.add_argument("--check-seconds", type=float, default=64.3, help="its scoring seconds (both phases and the "
                        "captures: 2026-11-25 FA4 run, 66.1 s timed less 1.7 s of artifact loading)")
    parser.add_argument("--capture-seconds", type=float, default=0.12, help="seconds per CUDA-graph capture inside "
                        "the timer (2026-11-25 FA4 run: 90 captures in 10.7 s)")
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    h, graphed = tg.Hyperparameters(phased_ttt_prefix_docs=RECORD_PREFIX_DOCS), args.mode == "graphs"
    profile = json.loads(Path(args.profile).read_text())
    # The first profile (2026-11-25-h100-ttt) has one entry per kind, launched; later ones `kind/mode`.
    kinds = {k: profile.get(f"{k}/{args.mode}") or profile[k] for k in KINDS if f"{k}/{args.mode}" in profile or k
             in profile}
    design = np.array([kind_work(KINDS[k], h, graphed) for k in kinds], dtype=float)
    seconds = np.array([v["seconds"] for v in kinds.values()])
    (a, b), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    print(f"fit ({args.mode}): {1000 * a:.1f} ms per chunk step + {1e6 * b:.3f} s per million row tokens as run "
          f"({1 / b / 1e3:.0f}k row tokens/s)")
    for (name, v), predicted in zip(kinds.items(), design @ [a, b]):
        print(f"  {name:14s} measured {v['seconds']:6.2f}s  model {predicted:6.2f}s")
    if args.check_docs:
        tokens = tg.load_validation(args.check_docs, h.eval_seq_len, h.vocab_size).tokens.numpy()
        lengths = tg.find_documents(tokens)[1][:args.check_count]
        check_h = tg.Hyperparameters(phased_ttt_prefix_docs=args.check_prefix)
        work = batch_work(lengths, check_h, graphed)
        steps, row_tokens = sum(s for s, _ in work), sum(t for _, t in work)
        captures = graph_shapes(lengths, range(len(work)), check_h) if graphed else 0
        print(f"check: {args.check_count} documents, {steps} steps, {row_tokens} row tokens as run, {captures} "
              f"graph captures -> model {a * steps + b * row_tokens + args.capture_seconds * captures:.1f}s, measured "
              f"{args.check_seconds:.1f}s")
    lengths = fineweb_like_lengths(RECORD_DOCS, np.random.default_rng(0))
    work = batch_work(lengths, h, graphed)
    costs = [a * steps + b * tokens for steps, tokens in work]
    shares = tg.assign_batches(range(len(work)), [int(1e6 * c) for c in costs], args.gpus)
    per_rank = [sum(costs[i] for i in share) for share in shares]
    captures = [graph_shapes(lengths, share, h) if graphed else 0 for share in shares]
    total = [cost + args.capture_seconds * n for cost, n in zip(per_rank, captures)]
    print(f"fineweb-like: {len(lengths)} docs, {lengths.sum()} targets, {sum(s for s, _ in work)} steps, "
          f"{sum(t for _, t in work)} row tokens as run; on {args.gpus} GPUs the slowest rank scores for "
          f"{max(per_rank):.0f}s (mean {np.mean(per_rank):.0f}s, longest single batch {max(costs):.0f}s)"
          + (f", plus {max(captures)} graph captures at most ({args.capture_seconds} s each): {max(total):.0f}s"
             if graphed else ""))


if __name__ == "__main__":
    main()
