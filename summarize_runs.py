"""Per-seed run logs of train_gpt.py -> submission.json, a table, a plot, and significance against a baseline.

    python summarize_runs.py logs/run_seed42.txt logs/run_seed0.txt logs/run_seed314.txt \
        [--baseline OLD_LOGS... | --baseline-json old/submission.json] [--out submission.json] [--plot runs.png]

A run's score is its last final-eval line (`quantized_ttt_phased ...`), else `diagnostic quantized`, else the last
in-training val line; `score_source` says which. Against a baseline, the improvement (baseline - ours, in nats of
val_loss and in BPB) gets a paired t-test over the seeds both have and a Welch t-test, one-tailed, for H0 "no
improvement" and for the challenge's record rule H0 "improvement <= 0.005 nats" (a record must clear it at p < 0.01).
Not part of the artifact: it only reads logs. Needs numpy and scipy (t distribution); matplotlib for the plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np

RECORD_MARGIN_NATS = 0.005  # challenge rule: a new record beats the old by >= 0.005 nats at p < 0.01
ALPHA = 0.01
FLOAT = r"([-+0-9.eE]+|nan|inf)"
# Our lines are `step:i/N key:value`; the reference's (PR #2135 logs, spec 02 §6) are `i/N key: value` with
# train_time in minutes, so its published logs can be a --baseline too.
TRAIN_LINE = re.compile(rf"(?:step:)?(\d+)/\d+ train_loss: ?{FLOAT} train_time: ?([0-9.]+)(ms|m)\b")
VAL_LINE = re.compile(rf"(?:step:)?(\d+)/\d+ val_loss: ?{FLOAT} val_bpb: ?{FLOAT}")
SCORE_LINE = re.compile(rf"(quantized_\w+|diagnostic quantized|diagnostic pre-quantization post-ema) "
                        rf"val_loss:{FLOAT} val_bpb:{FLOAT}(?: eval_time:(\d+)ms)?")
INT_FIELDS = {"seed": re.compile(r"\s+seed: (\d+)"), "world_size": re.compile(r"(?:python:.* |\s+)world_size: ?(\d+)"),
              "model_params": re.compile(r"model_params:(\d+)"),
              "bytes_total": re.compile(r"Total submission size [^:]*: (\d+) bytes"),
              "bytes_model": re.compile(r"Serialized model quantized[^:]*: (\d+) bytes"),
              "bytes_code": re.compile(r"Code size(?: \(compressed\))?: (\d+) bytes")}
STOP_LINE = re.compile(r"stopping_early: ?\S+ train_time: ?(\d+)ms step: ?(\d+)/")
TOTAL_EVAL_LINE = re.compile(rf"total_eval_time:{FLOAT}s")


def last_run_lines(path: Path) -> list[str]:
    """The lines of the last run in the file (train_gpt.py appends, so a reused RUN_ID holds several runs)."""
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("log_file:")]
    if len(starts) > 1:
        warnings.warn(f"{path}: holds {len(starts)} runs (log_file: lines); summarizing the last one")
    return lines[starts[-1]:] if starts else lines


def parse_log(path: str | Path) -> dict:
    """One run's log -> its seed, final score (with score_source), sizes, steps, times and loss curves."""
    path = Path(path)
    run = {"log": str(path), "train_curve": [], "val_curve": []}
    scores, train_ms, total_eval_s = {}, None, None
    for line in last_run_lines(path):
        if m := TRAIN_LINE.match(line):
            run["train_curve"].append((int(m[1]), float(m[2]), float(m[3]) * (0.001 if m[4] == "ms" else 60.0)))
        elif m := VAL_LINE.match(line):
            run["val_curve"].append((int(m[1]), float(m[2]), float(m[3])))
        elif m := SCORE_LINE.match(line):
            scores[m[1]] = (float(m[2]), float(m[3]), int(m[4]) / 1000.0 if m[4] else None)
        elif m := STOP_LINE.match(line):
            train_ms = int(m[1])
        elif m := TOTAL_EVAL_LINE.match(line):
            total_eval_s = float(m[1])
        for field, pattern in INT_FIELDS.items():
            if m := pattern.match(line):
                run.setdefault(field, int(m[1]))
    if "seed" not in run:
        if not (m := re.search(r"seed(\d+)", path.name)):
            raise ValueError(f"{path}: no `seed:` line in the Hyperparameters block and no seedN in the file name")
        run["seed"] = int(m[1])
    if run["val_curve"]:
        scores["in-training val"] = (*run["val_curve"][-1][1:], None)
    final = [name for name in scores if name.startswith("quantized_")]
    source = next((name for name in (*final[-1:], "diagnostic quantized", "in-training val") if name in scores), None)
    if source is None:
        raise ValueError(f"{path}: no score line (neither `quantized_* val_loss:` nor `diagnostic quantized "
                         f"val_loss:` nor `step:i/N val_loss:`); did the run finish?")
    run["score_source"] = source
    run["val_loss"], run["val_bpb"], run["eval_seconds"] = scores[source]
    if final and total_eval_s is not None:
        run["eval_seconds"] = total_eval_s
    if pre := scores.get("diagnostic pre-quantization post-ema"):
        run["pre_quant_val_loss"], run["pre_quant_val_bpb"] = pre[:2]
    run["steps"] = max((s for s, _, _ in run["train_curve"]), default=None)
    last_s = run["train_curve"][-1][2] if run["train_curve"] else None
    run["train_seconds"] = train_ms / 1000.0 if train_ms is not None else last_s
    return run


def load_baseline_json(path: str | Path) -> list[dict]:
    """Per-seed {seed, val_loss, val_bpb} from a submission.json: `seed_results` (a dict keyed by seed, or a list
    of dicts with `seed`), or one run's file (top-level `seed` and `val_bpb`, as train_gpt.py writes)."""
    data = json.loads(Path(path).read_text())
    results = data.get("seed_results")
    if isinstance(results, dict):
        results = [{"seed": seed, **values} for seed, values in results.items()]
    elif results is None and "seed" in data and "val_bpb" in data:
        results = [data]
    if not isinstance(results, list) or not results:
        raise ValueError(f"{path}: no per-seed values (expected `seed_results` or top-level `seed` + `val_bpb`)")
    return [{"seed": int(r["seed"]), "val_loss": r.get("val_loss"), "val_bpb": r.get("val_bpb")} for r in results]


def check_unique_seeds(runs: list[dict], what: str) -> None:
    seen = {}
    for run in runs:
        if run["seed"] in seen:
            raise ValueError(f"{what}: seed {run['seed']} appears twice "
                             f"({seen[run['seed']]} and {run.get('log', '?')})")
        seen[run["seed"]] = run.get("log", "?")


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else None


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        raise ImportError("summarize_runs: the t-test p-values need scipy.stats (pip install scipy)") from None
    return float(student_t.sf(t, df))


def finite(x) -> float | None:
    """JSON has no inf/nan: a zero-variance t (or its 0/0 df) is reported as null."""
    return float(x) if np.isfinite(x) else None


def t_result(improvement: float, se: float, df: float, margin: float, n) -> dict:
    """One-tailed p-values of t = (improvement - h0) / se for h0 = 0 and h0 = margin."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t0, t1 = np.float64(improvement) / se, np.float64(improvement - margin) / se
    p0, p1 = t_sf(t0, df), t_sf(t1, df)
    return {"n": n, "t": finite(t0), "df": finite(df), "p_no_improvement": finite(p0), "significant": bool(p0 < ALPHA),
            "t_margin": finite(t1), "p_margin": finite(p1), "significant_margin": bool(p1 < ALPHA)}


def paired_test(ours: dict[int, float], base: dict[int, float], margin: float) -> dict | None:
    """Paired t-test on d_i = base_i - ours_i over the seeds both have (df = n - 1)."""
    seeds = sorted(set(ours) & set(base))
    if len(seeds) < 2:
        return None
    d = np.array([base[s] - ours[s] for s in seeds])
    return {"seeds": seeds, **t_result(d.mean(), d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1, margin, len(d))}


def welch_test(ours, base, margin: float) -> dict | None:
    """Welch's t-test on mean(base) - mean(ours), Welch-Satterthwaite degrees of freedom; n = [ours, base]."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(ours, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return None
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return t_result(a.mean() - b.mean(), math.sqrt(va + vb), df, margin, [int(b.size), int(a.size)])


def compare(runs: list[dict], baseline: list[dict], margin_nats: float = RECORD_MARGIN_NATS) -> dict:
    """Improvement of `runs` over `baseline` in val_loss (nats) and val_bpb; the nat margin is converted to BPB at
    our runs' bits-per-nat ratio (bpb / loss, the same for every run on one tokenizer and val set)."""
    bpb_per_nat = np.mean([r["val_bpb"] for r in runs]) / np.mean([r["val_loss"] for r in runs])
    out = {"baseline_seeds": sorted(r["seed"] for r in baseline), "alpha": ALPHA}
    for metric, margin in (("val_loss", margin_nats), ("val_bpb", margin_nats * bpb_per_nat)):
        base = {r["seed"]: r[metric] for r in baseline if r.get(metric) is not None}
        if len(base) < len(baseline):
            out[metric] = {"skipped": f"the baseline lacks per-seed {metric}"}
            continue
        ours = {r["seed"]: r[metric] for r in runs}
        out[metric] = {"baseline_mean": float(np.mean(list(base.values()))), "margin": float(margin),
                       "improvement_mean": float(np.mean(list(base.values())) - np.mean(list(ours.values()))),
                       "paired": paired_test(ours, base, margin),
                       "welch": welch_test(list(ours.values()), list(base.values()), margin)}
    return out


def summarize(runs: list[dict], baseline: list[dict] | None = None, name: str = "", author: str = "",
              github_id: str = "", hardware: str = "") -> dict:
    """The submission.json content: challenge fields (means, max sizes) plus every seed's values."""
    check_unique_seeds(runs, "runs")
    first = ("seed", "score_source", "val_loss", "val_bpb")
    per_seed = {str(r["seed"]): {**{k: r[k] for k in first}, **{k: v for k, v in r.items()
                                                                if k not in first and not k.endswith("_curve")}}
                for r in runs}
    loss_mean, loss_std = mean_std([r["val_loss"] for r in runs])
    bpb_mean, bpb_std = mean_std([r["val_bpb"] for r in runs])
    largest = lambda key: max((r[key] for r in runs if r.get(key) is not None), default=None)  # noqa: E731
    summary = {"name": name, "author": author, "github_id": github_id, "date": datetime.date.today().isoformat(),
               "track": "10min_16mb", "val_loss": loss_mean, "val_loss_std": loss_std, "val_bpb": bpb_mean,
               "val_bpb_std": bpb_std, "seeds": [r["seed"] for r in runs], "bytes_total": largest("bytes_total"),
               "bytes_model": largest("bytes_model"), "bytes_code": largest("bytes_code"),
               "train_seconds_max": largest("train_seconds"), "eval_seconds_max": largest("eval_seconds"),
               "hardware": hardware or f"{largest('world_size') or '?'}x GPU", "seed_results": per_seed}
    if baseline:
        check_unique_seeds(baseline, "baseline")
        summary["comparison"] = compare(runs, baseline)
    return summary


def fmt(value, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec asks for None."""
    return format(value, spec) if value is not None else "-".rjust(int(re.match(r"\+?(\d*)", spec)[1] or 0))


def format_test(t: dict | None) -> str:
    if t is None:
        return "n/a (fewer than 2 seeds)"
    star = lambda flag: "*" if flag else " "  # noqa: E731
    return (f"n={t['n']} df={fmt(t['df'], '.2f')}  H0 no gain: t={fmt(t['t'], '+.3f')} "
            f"p={fmt(t['p_no_improvement'], '.4g')}{star(t['significant'])}  "
            f"H0 gain<=margin: t={fmt(t['t_margin'], '+.3f')} "
            f"p={fmt(t['p_margin'], '.4g')}{star(t['significant_margin'])}")


def format_table(summary: dict) -> str:
    rows = [f"{'seed':>6} {'score_source':<22} {'val_loss':>11} {'val_bpb':>11} {'bytes_total':>11} {'steps':>6} "
            f"{'train_s':>8} {'eval_s':>7}"]
    for seed, r in summary["seed_results"].items():
        rows.append(f"{seed:>6} {r['score_source']:<22} {fmt(r['val_loss'], '11.8f')} {fmt(r['val_bpb'], '11.8f')} "
                    f"{fmt(r.get('bytes_total'), '11d')} {fmt(r['steps'], '6d')} {fmt(r['train_seconds'], '8.1f')} "
                    f"{fmt(r['eval_seconds'], '7.1f')}")
    for label, suffix in (("mean", ""), ("std", "_std")):
        rows.append(f"{label:>6} {'':<22} {fmt(summary['val_loss' + suffix], '11.8f')} "
                    f"{fmt(summary['val_bpb' + suffix], '11.8f')}")
    if comparison := summary.get("comparison"):
        rows.append(f"\nvs baseline seeds {comparison['baseline_seeds']}: gain = baseline - ours; one-tailed p, "
                    f"* = p < {ALPHA}")
        for metric in ("val_loss", "val_bpb"):
            c = comparison[metric]
            if "skipped" in c:
                rows.append(f"  {metric}: skipped ({c['skipped']})")
                continue
            rows.append(f"  {metric}: gain {c['improvement_mean']:+.8f}, margin {c['margin']:.6f}")
            rows += [f"    {test:<6} {format_test(c[test])}" for test in ("paired", "welch")]
    return "\n".join(rows)


def plot_runs(runs: list[dict], baseline_runs: list[dict], path: str | Path) -> bool:
    """Train loss and val BPB against training seconds, one colour per seed, baseline dashed; False without
    matplotlib. The y range follows the curves after the first 10% of training (step 0-5 losses dwarf the rest)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    seeds = sorted({r["seed"] for r in runs + baseline_runs})
    for runs_, style, prefix in ((runs, "-", ""), (baseline_runs, "--", "baseline ")):
        for r in runs_:
            colour = plt.cm.tab10(seeds.index(r["seed"]) % 10)
            steps, loss, secs = (np.array(c) for c in zip(*r["train_curve"])) if r["train_curve"] else ([],) * 3
            axes[0].plot(secs, loss, style, color=colour, label=f"{prefix}seed {r['seed']}")
            val = np.array(r["val_curve"]).reshape(-1, 3)
            val_secs = np.interp(val[:, 0], np.r_[0, steps], np.r_[0, secs]) if len(steps) else val[:, 0] * 0
            axes[1].plot(val_secs, val[:, 2], style + "o", color=colour, ms=3, label=f"{prefix}seed {r['seed']}")
            if r["score_source"] != "in-training val":
                axes[1].plot([r["train_seconds"] or 0], [r["val_bpb"]], "*", color=colour, ms=11,
                             mfc="none" if prefix else colour)
    for ax, ylabel in zip(axes, ("train loss (nats/token)", "val BPB (dots: in training; stars: final score)")):
        points = np.concatenate([line.get_xydata() for line in ax.get_lines()] or [np.zeros((0, 2))])
        points = points[np.isfinite(points).all(axis=1)]  # a diverged run logs nan
        late = points[points[:, 0] >= 0.1 * points[:, 0].max()] if len(points) else points
        if len(late):
            lo, hi = late[:, 1].min(), late[:, 1].max()
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
        ax.set(xlabel="training time (s)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return True


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def results_markdown(summary: dict, source: str) -> str:
    """The README's results block: one row per seed and the mean (std), from a submission.json summary."""
    rows = ["| seed | score | val_bpb | val_loss | bytes_total | steps | train s | eval s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in summary["seed_results"].values():
        rows.append(f"| {run['seed']} | {run['score_source']} | {run['val_bpb']:.5f} | {run['val_loss']:.5f} | "
                    f"{fmt(run.get('bytes_total'), ',d')} | {fmt(run.get('steps'), 'd')} | "
                    f"{fmt(run.get('train_seconds'), '.1f')} | {fmt(run.get('eval_seconds'), '.1f')} |")
    spread = lambda key: f" (std {summary[key + '_std']:.5f})" if summary.get(key + "_std") is not None else ""
    return "\n".join([f"Generated by `summarize_runs.py --readme` from `{source}` ({summary['date']}, "
                      f"{summary['hardware']}, {len(summary['seed_results'])} seed(s)): mean val_bpb "
                      f"{summary['val_bpb']:.5f}{spread('val_bpb')}, val_loss {summary['val_loss']:.5f}"
                      f"{spread('val_loss')}, largest artifact {fmt(summary.get('bytes_total'), ',d')} bytes.",
                      "", *rows])


def update_readme(path: str | Path, block: str) -> None:
    """Replace the text between the results markers of the README at path."""
    path = Path(path)
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"{path}: needs one '{README_BEGIN}' line followed by one '{README_END}' line")
    head, rest = text.split(README_BEGIN)
    path.write_text(f"{head}{README_BEGIN}\n{block}\n{README_END}{rest.split(README_END, 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="one train_gpt.py log per seed")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--baseline", nargs="+", default=[], help="the baseline's per-seed logs")
    group.add_argument("--baseline-json", help="a submission.json with the baseline's per-seed values")
    parser.add_argument("--out", default="submission.json", help="output JSON (default: submission.json)")
    parser.add_argument("--plot", help="output PNG (default: runs.png beside --out; '' for none)")
    parser.add_argument("--name", default="", help="submission name")
    parser.add_argument("--author", default="")
    parser.add_argument("--github-id", default="")
    parser.add_argument("--hardware", default="", help="e.g. '8xH100 80GB SXM' (default: '<world_size>x GPU')")
    parser.add_argument("--readme", help="also rewrite this README's results block (between its markers)")
    args = parser.parse_args(argv)
    runs = [parse_log(path) for path in args.logs]
    baseline_runs = [parse_log(path) for path in args.baseline]
    baseline = load_baseline_json(args.baseline_json) if args.baseline_json else baseline_runs
    summary = summarize(runs, baseline or None, args.name, args.author, args.github_id, args.hardware)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"\nwrote {out}")
    if args.readme:
        update_readme(args.readme, results_markdown(summary, str(out)))
        print(f"updated {args.readme}")
    plot = out.with_name("runs.png") if args.plot is None else Path(args.plot) if args.plot else None
    if plot and plot_runs(runs, baseline_runs, plot):
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
