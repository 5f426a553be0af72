"""Throughput and gains of the scored eval (phased score-first TTT + n-gram tilt) on one GPU, extrapolated to the
record: 47,851,520 targets on 8 GPUs.

Usage (from the repo root, one GPU):
    DATA_PATH=./data/english_mix_v2 python bench/bench_eval.py [--artifact final_model.int6.ptz] [--docs 1000]
        [--runs tilt,notilt,neutral,record_order] [--json out.json]
Data: DATA_PATH's fineweb_val_*.bin + fineweb_val_bytes_*.bin (e.g. prepare_caseops_data.py --val-docs 2000 on
../shared/data/english_mix_v2.jsonl.xz), cut to its first --docs documents. Without DATA_PATH: synthetic documents
(uniform ids, log-normal lengths with FineWeb's mean of ~957 tokens), for throughput only.
Model: the artifact when given (BPB meaningful), else a randomly initialized model of the configured size
(throughput only). Every Hyperparameters env var applies; PHASED_TTT_PREFIX_DOCS defaults here to 5% of the
documents (the record: 2,500 of 50,000).
Runs (each from the same weights): tilt = the scored eval; notilt = NGRAM_TILT_ENABLED=0; neutral = TTT lr 0, no
global phase, no tilt (the TTT path's sliding-window context alone); record_order = the reference's order (its
global-phase set and stream-order hints, see record_order), to measure what our single causal order costs.
Reports: the plain diagnostic eval's targets/s; the n-gram hint precompute's targets/s (this machine's cores); per
run: warm-up seconds, hints / scoring before and after the global phase / global phase seconds, scoring targets/s,
peak memory, BPB; the extrapolation (scoring and global phase split over 8 GPUs, hints on one CPU, all linear in
tokens); the TTT gain (diagnostic quantized BPB - final BPB) and the tilt's share (notilt BPB - tilt BPB).
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

RECORD_TARGETS = 47_851_520
RECORD_DOCS = 50_000
RECORD_PREFIX_DOCS = 2_500
RECORD_GPUS = 8
RECORD_SCORED_BEFORE_PAUSE = 2_960  # the record's global set: the 2,500 shortest of its 2,960 longest docs (spec 04 Q4)
VARIANTS = {"tilt": {}, "notilt": {"ngram_tilt_enabled": False},
            "neutral": {"ngram_tilt_enabled": False, "ttt_lora_lr": 0.0, "phased_ttt_prefix_docs": 0},
            "record_order": {}}


def first_documents(val: tg.ValidationData, docs: int, seq_len: int) -> tg.ValidationData:
    """The stream up to the BOS that starts document `docs` (the last document's final target), then truncated to
    whole seq_len windows of targets like load_validation (the diagnostic eval needs that)."""
    starts = np.flatnonzero(val.tokens.numpy() == tg.BOS_ID)
    end = int(starts[docs]) + 1 if docs < len(starts) else val.tokens.numel()
    keep = (end - 1) // seq_len * seq_len + 1
    return tg.ValidationData(val.tokens[:keep].clone(), val.token_bytes[:keep].clone())


def fineweb_like_lengths(docs: int, rng: np.random.Generator, minimum: int = 1) -> np.ndarray:
    """FineWeb's documents are not here: their lengths modelled as log-normal (sigma 1) with its mean of ~957."""
    return np.maximum(minimum, rng.lognormal(np.log(957) - 0.5, 1.0, docs).astype(np.int64))


def synthetic_validation(docs: int, h: tg.Hyperparameters) -> tg.ValidationData:
    rng = np.random.default_rng(0)
    lengths = fineweb_like_lengths(docs, rng, minimum=2)
    tokens = rng.integers(2, h.vocab_size, int(lengths.sum()) + 1)
    tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = tg.BOS_ID
    keep = (tokens.size - 1) // h.eval_seq_len * h.eval_seq_len + 1
    tokens = torch.from_numpy(tokens[:keep])
    return tg.ValidationData(tokens, torch.where(tokens == tg.BOS_ID, 0, 3).int())


def record_order(val: tg.ValidationData, h: tg.Hyperparameters):
    """The reference's order (spec 04 §2.2, Q4, Q8) in our pipeline: its global phase trains on the shortest
    prefix_docs of the 2,960/2,500 x prefix_docs longest documents, in ascending length, and its n-gram hints follow
    the stream, not the scoring order. -> (the stream with that set moved to the front in that order, the rest in
    stream order, so that our phased prefix is that set; ordered_hints giving each target its original stream-order
    hint). Each moved document keeps its targets (its last one is a BOS, which starts the next document)."""
    tokens, token_bytes = val.tokens.numpy(), val.token_bytes.numpy()
    starts, num_targets = tg.find_documents(tokens)
    last = len(starts) - 1  # stays last: its final target ends the stream, it is not a BOS
    pool = round(h.phased_ttt_prefix_docs * RECORD_SCORED_BEFORE_PAUSE / RECORD_PREFIX_DOCS)
    longest = np.argsort(-num_targets[:last], kind="stable")[:pool]
    chosen = longest[np.argsort(num_targets[longest], kind="stable")[:h.phased_ttt_prefix_docs]]
    order = np.concatenate([chosen, np.setdiff1d(np.arange(len(starts)), chosen)])
    keep = np.concatenate([[starts[order[0]]]] + [np.arange(starts[d] + 1, starts[d] + 1 + num_targets[d])
                                                  for d in order])
    hint, gate = tg.ngram.token_hints(tokens, h.token_order, h.token_threshold)
    stream_hints = np.where(gate, hint, -1).astype(np.int32)[keep]

    def hints_in_stream_order(tokens, starts, num_targets, docs, h):
        positions, is_target = tg.ordered_stream(starts, num_targets, docs)
        return stream_hints[positions[is_target]]
    moved = tg.ValidationData(torch.from_numpy(tokens[keep]), torch.from_numpy(token_bytes[keep]))
    return moved, hints_in_stream_order


def timed(device):
    """Decorator factory: wrap fn so that each call adds its synchronized seconds to totals[key(...)]."""
    totals = {}

    def wrap(fn, key):
        def call(*args, **kwargs):
            tg.synchronize(device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            tg.synchronize(device)
            name = key() if callable(key) else key
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return result
        return call
    return totals, wrap


def run_variant(name, overrides, model, weights, val, h, device, log) -> dict:
    h = dataclasses.replace(h, **overrides)
    model.load_state_dict(weights)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttt = tg.PhasedTTT(model, h, 0, 1, device, log)
    warmup = ttt.warm_up()
    totals, wrap = timed(device)
    ttt.hints = wrap(ttt.hints, "hints")
    ttt.global_phase = wrap(ttt.global_phase, "global")
    ttt.score_batch = wrap(ttt.score_batch,
                           lambda: "score_after_global" if "global" in totals else "score_before_global")
    start, graphs = time.perf_counter(), tg.compiled_graph_count()
    loss, bpb = ttt.run(val)
    tg.synchronize(device)
    total = time.perf_counter() - start
    totals["graphs_compiled_in_timed_eval"] = tg.compiled_graph_count() - graphs
    scoring = totals.get("score_before_global", 0.0) + totals.get("score_after_global", 0.0)
    result = dict(variant=name, val_loss=loss, val_bpb=bpb, warmup_s=warmup, total_s=total, **totals,
                  score_targets_per_s=val.num_targets / max(scoring, 1e-9),
                  peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    print(f"run {name}: " + " ".join(f"{k}:{v:.4f}" if isinstance(v, float) else f"{k}:{v}"
                                     for k, v in result.items() if k != "variant"), flush=True)
    # Free this variant's CUDA-graph pool before the next reserves its own (two runs on the H200, 2026-12-03, ran out
    # of memory with 2 x 45 GiB still held after a gc.collect alone): drop the graphs, then the cuBLAS workspaces
    # allocated inside the captures, which pin the pool's one block.
    if ttt.graphs is not None:
        ttt.graphs.clear()
        ttt.__dict__.pop("pool_holder", None)
    del ttt, wrap
    gc.collect()
    if device.type == "cuda":
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        print(f"run {name}: released, {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB still reserved", flush=True)
    return result


def batch_work(num_targets: np.ndarray, h: tg.Hyperparameters, graphed: bool = False) -> list[tuple[int, int]]:
    """(chunk steps, row tokens through the model) per batch of the TTT schedule over documents of these lengths,
    counting the step shapes score_batch runs (graphed: CUDA graphs' rounded shapes)."""
    batches, _ = tg.ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)
    steps = [tg.step_row_tokens(num_targets[b], h, graphed) for b in batches]
    return [(len(tokens), sum(tokens)) for tokens in steps]


def ttt_work(num_targets: np.ndarray, h: tg.Hyperparameters, graphed: bool) -> tuple[int, int]:
    """(row tokens through the model, chunk steps) of the whole TTT pass."""
    work = batch_work(num_targets, h, graphed)
    return sum(tokens for _, tokens in work), sum(steps for steps, _ in work)


def extrapolate(result: dict, hints_rate: float, global_rate: float | None, load_s: float, targets_per_doc: float,
                work_scale: float):
    """Seconds of the timed eval at the record's size on 8 GPUs: artifact load + hints (one CPU) + scoring and the
    global phase (split over 8 GPUs; the global phase trains on the record's 2,500 prefix documents). Scoring
    scales with the row tokens per target: work_scale = (FineWeb-like work per target) / (this set's)."""
    hints = RECORD_TARGETS / hints_rate if VARIANTS[result["variant"]].get("ngram_tilt_enabled", True) else 0.0
    scoring = RECORD_TARGETS * work_scale / (RECORD_GPUS * result["score_targets_per_s"])
    global_s = (RECORD_PREFIX_DOCS * targets_per_doc / (RECORD_GPUS * global_rate)) if global_rate else 0.0
    return dict(load_s=load_s, hints_s=hints, scoring_s=scoring, global_s=global_s,
                total_s=load_s + hints + scoring + global_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default=None, help="quantized model artifact (default: random weights)")
    parser.add_argument("--docs", type=int, default=1000, help="validation documents to use")
    parser.add_argument("--runs", default="tilt,notilt,neutral", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    tg.configure_torch(device)
    h = tg.Hyperparameters.from_env()
    data_path = os.environ.get("DATA_PATH")
    if data_path:
        val = first_documents(tg.load_validation(data_path, h.eval_seq_len, h.vocab_size), args.docs, h.eval_seq_len)
    else:
        val = synthetic_validation(args.docs, h)
    tokens = val.tokens.numpy()
    starts, num_targets = tg.find_documents(tokens)
    if "PHASED_TTT_PREFIX_DOCS" not in os.environ:
        h = dataclasses.replace(h, phased_ttt_prefix_docs=-(-len(starts) * RECORD_PREFIX_DOCS // RECORD_DOCS))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_eval torch:{torch.__version__} device:{gpu} data:{data_path or 'synthetic'} "
          f"artifact:{args.artifact or 'random weights'} docs:{len(starts)} targets:{val.num_targets} "
          f"mean_targets_per_doc:{num_targets.mean():.1f} prefix_docs:{h.phased_ttt_prefix_docs} "
          f"cpu_cores:{len(os.sched_getaffinity(0))}", flush=True)
    start = time.perf_counter()
    if args.artifact:
        h = dataclasses.replace(h, quantized_model_path=args.artifact)
        model = tg.load_quantized_model(args.artifact, h, device)
    else:
        model = tg.build_model(h, device, log=lambda message: None)
        model.set_looping(True)
    load_s = time.perf_counter() - start
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {"load_s": load_s, "docs": len(starts), "targets": val.num_targets}

    for attempt in ("compile", "timed"):
        tg.synchronize(device)
        start = time.perf_counter()
        diag_loss, diag_bpb = tg.evaluate_bpb(model, val, h, 0, 1, device)
        tg.synchronize(device)
        results[f"plain_{attempt}_s"] = time.perf_counter() - start
    results.update(plain_bpb=diag_bpb, plain_targets_per_s=val.num_targets / results["plain_timed_s"])
    print(f"plain eval: bpb:{diag_bpb:.6f} targets/s:{results['plain_targets_per_s']:.0f} "
          f"first_call:{results['plain_compile_s']:.1f}s", flush=True)

    batches, _ = tg.ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)
    with contextlib.suppress(RuntimeError):  # no compiler: the numpy fallback is what runs, and is timed
        tg.ngram.load_native()  # its first call builds the C helper: not part of the precompute's rate
    start = time.perf_counter()
    hints = tg.ordered_hints(tokens, starts, num_targets, np.concatenate(batches), h)
    hints_s = time.perf_counter() - start
    results.update(hints_targets_per_s=val.num_targets / hints_s, gated=int((hints >= 0).sum()))
    print(f"ngram hints: {hints_s:.2f}s targets/s:{results['hints_targets_per_s']:.0f} gated:{results['gated']} "
          f"extrapolated_to_record:{RECORD_TARGETS / results['hints_targets_per_s']:.1f}s", flush=True)

    def log(line: str) -> None:  # the eval's warm-up, pool, capture and count lines; not its progress
        if line.startswith(("ttt_eval:", "ttt_eval scored")):
            print(line, flush=True)
    runs = []
    for name in args.runs.split(","):
        if name == "record_order":
            moved, hints_fn = record_order(val, h)
            with mock.patch.object(tg, "ordered_hints", hints_fn):
                runs.append(run_variant(name, {}, model, weights, moved, h, device, log))
        else:
            runs.append(run_variant(name, VARIANTS[name], model, weights, val, h, device, log))
    results["runs"] = runs
    prefix_targets = int(num_targets[:h.phased_ttt_prefix_docs].sum())
    graphed = device.type == "cuda" and h.ttt_cuda_graphs
    work, steps = ttt_work(num_targets, h, graphed)
    like = fineweb_like_lengths(RECORD_DOCS, np.random.default_rng(0))
    like_work, like_steps = ttt_work(like, dataclasses.replace(h, phased_ttt_prefix_docs=RECORD_PREFIX_DOCS), graphed)
    work_scale = (like_work / like.sum()) / (work / val.num_targets)
    results.update(row_tokens=work, chunk_steps=steps, fineweb_like_row_tokens_per_target=like_work / like.sum(),
                   fineweb_like_chunk_steps=like_steps, work_scale=work_scale)
    print(f"ttt work: row_tokens:{work} per_target:{work / val.num_targets:.2f} chunk_steps:{steps}; fineweb-like "
          f"(log-normal, mean 957): per_target:{like_work / like.sum():.2f} chunk_steps:{like_steps} "
          f"scale:{work_scale:.3f}", flush=True)
    for run in runs:
        scoring = run.get("score_before_global", 0.0) + run.get("score_after_global", 0.0)
        run["row_tokens_per_s"] = work / max(scoring, 1e-9)
    for run in runs:
        global_rate = prefix_targets / run["global"] if run.get("global") else None
        run["record_8gpu"] = extrapolate(run, results["hints_targets_per_s"], global_rate, load_s,
                                         RECORD_TARGETS / RECORD_DOCS, work_scale)
        print(f"per-target scaling of {run['variant']} to {RECORD_TARGETS} targets on {RECORD_GPUS} GPUs (this set's "
              "steps and captures per target, no load balancing; bench/ttt_cost_model.py models the steps): " +
              " ".join(f"{k}:{v:.1f}" for k, v in run["record_8gpu"].items()), flush=True)
    by_name = {run["variant"]: run for run in runs}
    if "tilt" in by_name:
        results["ttt_gain_bpb"] = diag_bpb - by_name["tilt"]["val_bpb"]
        print(f"TTT gain (diagnostic - final): {results['ttt_gain_bpb']:.5f} BPB", flush=True)
        if "notilt" in by_name:
            results["tilt_share_bpb"] = by_name["notilt"]["val_bpb"] - by_name["tilt"]["val_bpb"]
            print(f"tilt share (notilt - tilt): {results['tilt_share_bpb']:.5f} BPB", flush=True)
        if "neutral" in by_name:
            results["context_share_bpb"] = diag_bpb - by_name["neutral"]["val_bpb"]
            print(f"context regime alone (diagnostic - neutral): {results['context_share_bpb']:.5f} BPB", flush=True)
    if "tilt" in by_name and "record_order" in by_name:
        ours, theirs = by_name["tilt"], by_name["record_order"]
        results["record_order_cost"] = dict(bpb=ours["val_bpb"] - theirs["val_bpb"],
                                            seconds=ours["total_s"] - theirs["total_s"])
        print(f"our causal order vs the record's: {results['record_order_cost']['bpb']:+.5f} BPB, "
              f"{results['record_order_cost']['seconds']:+.1f} s of timed eval (global phase "
              f"{ours.get('global', 0):.1f} s vs {theirs.get('global', 0):.1f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
