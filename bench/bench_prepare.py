"""Time prepare_caseops_data.py end to end (process start, reading .xz, CaseOps, tokenizing, sidecar, writing).

Default workload: every document of shared/data/english_mix_v1.jsonl.xz as validation (so each one gets the
byte sidecar, the slow path), with the reference tokenizer; once with all cores, once with one worker.

The machine may be shared: cpu_s (CPU seconds of all its processes) moves less with other load than wall_s.

Usage: python bench/bench_prepare.py [--docs DOCS] [--tokenizer MODEL] [--workers N ...] [--repeats R]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def time_prepare(docs: Path, tokenizer: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(REPO / "prepare_caseops_data.py"), "--docs", str(docs), "--out", tmp,
                   "--tokenizer", str(tokenizer), "--val-docs", str(10**9), "--workers", str(workers)]
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
    docs_done = manifest["val"]["docs"] + manifest["train"]["docs"]
    tokens = manifest["val"]["tokens"] + manifest["train"]["tokens"]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)  # all processes, all cores
    return {"workers": workers, "docs": docs_done, "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
            "docs_per_s": docs_done / wall, "tokens_per_s": tokens / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, default=SHARED / "data" / "english_mix_v1.jsonl.xz")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "golden" / "caseops_v1_reserved_sp8192.model")
    p.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count(), 1])
    p.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest is reported")
    args = p.parse_args()
    for workers in args.workers:
        best = min((time_prepare(args.docs, args.tokenizer, workers) for _ in range(args.repeats)),
                   key=lambda r: r["wall_s"])
        print(f"bench_prepare workers:{best['workers']} docs:{best['docs']} tokens:{best['tokens']} "
              f"wall_s:{best['wall_s']:.2f} cpu_s:{best['cpu_s']:.2f} docs_per_s:{best['docs_per_s']:.0f} "
              f"tokens_per_s:{best['tokens_per_s']:.0f}", flush=True)


if __name__ == "__main__":
    main()
