"""summarize_runs.py: log parsing (our format and the reference's), the score-source fallback, mean/std, the paired
and Welch t-tests (against scipy.stats and against the figures published with PR #2135), the CLI, and the plot."""
import json
import sys

import numpy as np
import pytest

import summarize_runs as sr

# The record's three seeds (shared/spec/04 §10.2, spec/03 §8.1): final val_loss and val_bpb, train stop (ms, step),
# timed eval (s), artifact bytes.
RECORD = {42: (2.31115900, 1.05610947, 599672, 5001, 540.1, 15947490),
          0: (2.31265572, 1.05679341, 599608, 4997, 567.1, 15942822),
          314: (2.31227656, 1.05662016, 599593, 4983, 567.1, 15945305)}


@pytest.fixture
def stats():
    """scipy.stats: the t distribution behind every p-value (and the reference t-tests)."""
    return pytest.importorskip("scipy.stats")


def our_log(seed: int, final=(2.31115900, 1.05610947), stop_ms=599672, steps=5001, eval_s=540.1,
            total_bytes=15947490, ttt=True, diagnostic=True, val_every=4000) -> str:
    """A run log in train_gpt.py's formats (make_logger, log_hyperparameters, Trainer, write_artifact, evals)."""
    lines = [f"log_file:logs/run_seed{seed}.txt", "python:3.12.3 torch:2.11.0 device:cuda:0 world_size:8",
             "Hyperparameters:", "  eval_only: False", "  matrix_lr: 0.028", f"  seed: {seed}  (env)",
             "  train_log_every: 500", "train_shards:80", "val_tokens:47851520", "model_params:35945673",
             "gptq:reserving 0.5s effective:599500ms", "warmup looping:0 steps:20 first_step:30.1s total:40.2s graphs:4"]
    per_step_ms = stop_ms / steps
    for step in [*range(1, 6), *range(500, steps, 500), steps]:
        if step % val_every == 0 or step == 1:
            val_step = 0 if step == 1 else step
            lines.append(f"step:{val_step}/20000 val_loss:{2.4 + 7 / (1 + val_step):.4f} "
                         f"val_bpb:{1.1 + 3 / (1 + val_step):.4f}")
        train_ms = step * per_step_ms
        lines.append(f"step:{step}/20000 train_loss:{2.3 + 7 / step:.4f} train_time:{train_ms:.0f}ms "
                     f"step_avg:{train_ms / step:.2f}ms tok/s:{step * 786432 / (train_ms / 1000):.0f}")
    lines += [f"step:{steps}/20000 val_loss:2.3466 val_bpb:1.0722",
              f"stopping_early:wallclock_cap train_time:{stop_ms}ms step:{steps}/20000",
              "peak memory allocated:41697MiB reserved:41720MiB", "ema:applying EMA weights",
              "diagnostic pre-quantization post-ema val_loss:2.32046400 val_bpb:1.06026908 eval_time:9368ms",
              "GPTQ:collecting Hessians from calibration data...",
              "Serialized model: 135418111 bytes (unquantized state)",
              "pergroup:Q 35913728 raw → 15677694 (rans) (43.7%)", f"pergroup:total frame {total_bytes - 37155} bytes",
              "Code size: 37155 bytes (train_gpt.py:30000 online_ngram_tilt.py:7155)",
              f"Serialized model quantized+pergroup: {total_bytes - 37155} bytes",
              f"Total submission size quantized+pergroup: {total_bytes} bytes"]
    if diagnostic:
        lines.append("diagnostic quantized val_loss:2.33886991 val_bpb:1.06867913 eval_time:10347ms")
    if ttt:
        lines += ["", "beginning TTT eval timer",
                  f"quantized_ttt_phased val_loss:{final[0]:.8f} val_bpb:{final[1]:.8f} eval_time:{eval_s * 1000:.0f}ms",
                  f"total_eval_time:{eval_s:.1f}s"]
    return "\n".join(lines) + "\n"


def record_logs(tmp_path, prefix="run", shift=0.0):
    """The record's seeds, with val_loss raised by `shift` nats plus a zero-mean per-seed jitter when shift != 0."""
    paths = []
    for (seed, (loss, bpb, stop_ms, steps, eval_s, total)), jitter in zip(RECORD.items(), (3e-4, -2e-4, -1e-4)):
        delta = shift + jitter if shift else 0.0
        path = tmp_path / f"{prefix}_seed{seed}.txt"
        path.write_text(our_log(seed, (loss + delta, bpb + delta * bpb / loss), stop_ms, steps, eval_s, total))
        paths.append(path)
    return paths


def test_parse_our_log(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(our_log(42))
    run = sr.parse_log(path)
    assert (run["seed"], run["score_source"], run["val_loss"], run["val_bpb"]) == (
        42, "quantized_ttt_phased", 2.31115900, 1.05610947)
    assert (run["pre_quant_val_loss"], run["pre_quant_val_bpb"]) == (2.32046400, 1.06026908)
    assert (run["bytes_total"], run["bytes_model"], run["bytes_code"]) == (15947490, 15947490 - 37155, 37155)
    assert (run["steps"], run["train_seconds"], run["eval_seconds"]) == (5001, 599.672, 540.1)
    assert (run["world_size"], run["model_params"]) == (8, 35945673)
    assert [s for s, _, _ in run["train_curve"]] == [1, 2, 3, 4, 5, *range(500, 5001, 500), 5001]
    assert run["train_curve"][-1] == (5001, round(2.3 + 7 / 5001, 4), 599.672)
    assert [s for s, _, _ in run["val_curve"]] == [0, 4000, 5001]


def test_score_source_falls_back(tmp_path):
    path = tmp_path / "seed7.txt"
    path.write_text(our_log(7, ttt=False))
    run = sr.parse_log(path)
    assert (run["score_source"], run["val_loss"], run["val_bpb"], run["eval_seconds"]) == (
        "diagnostic quantized", 2.33886991, 1.06867913, 10.347)
    path.write_text(our_log(7, ttt=False, diagnostic=False))
    run = sr.parse_log(path)
    assert (run["score_source"], run["val_loss"], run["val_bpb"], run["eval_seconds"]) == (
        "in-training val", 2.3466, 1.0722, None)


def test_log_without_score_line_names_the_file(tmp_path):
    path = tmp_path / "crashed_seed1.txt"
    path.write_text("log_file:logs/x.txt\n  seed: 1\nstep:1/20000 train_loss:9.0000 train_time:120ms step_avg:120.00ms\n")
    with pytest.raises(ValueError, match="crashed_seed1.txt: no score line"):
        sr.parse_log(path)
    path = tmp_path / "noseed.txt"
    path.write_text(our_log(3).replace("  seed: 3  (env)\n", ""))
    with pytest.raises(ValueError, match="noseed.txt: no `seed:` line"):
        sr.parse_log(path)


def test_appended_runs_use_the_last(tmp_path):
    path = tmp_path / "reused.txt"
    path.write_text(our_log(5, final=(3.0, 1.4)) + our_log(5, final=(2.5, 1.1)))
    with pytest.warns(UserWarning, match="holds 2 runs"):
        run = sr.parse_log(path)
    assert (run["val_loss"], run["val_bpb"], len(run["val_curve"])) == (2.5, 1.1, 3)


def test_reference_log_format(tmp_path):
    """PR #2135's published logs (spec 02 §6 formats): no `step:` prefix, `key: value`, train_time in minutes."""
    path = tmp_path / "train_seed42.log"
    path.write_text("  seed: 42\n  world_size: 8\n0/20000 val_loss: 9.0076 val_bpb: 4.1158\n"
                    "500/20000 train_loss: 2.5705 train_time: 0.8m tok/s: 8341171\n"
                    "5001/20000 val_loss: 2.3466 val_bpb: 1.0722\n"
                    "stopping_early: wallclock_cap train_time: 599672ms step: 5001/20000\n"
                    "Code size (uncompressed): 191274 bytes\nCode size (compressed): 37155 bytes\n"
                    "Total submission size quantized+pergroup: 15947490 bytes\n"
                    "quantized_ttt_phased val_loss:2.31115900 val_bpb:1.05610947 eval_time:540111ms\n")
    run = sr.parse_log(path)
    assert run["train_curve"] == [(500, 2.5705, 48.0)]
    assert [v[0] for v in run["val_curve"]] == [0, 5001]
    assert (run["seed"], run["world_size"], run["bytes_code"], run["bytes_total"]) == (42, 8, 37155, 15947490)
    assert (run["train_seconds"], run["eval_seconds"], run["val_bpb"]) == (599.672, 540.111, 1.05610947)


def test_record_mean_and_std(tmp_path):
    """The record's 3-seed mean/std (spec 04 §10.2: 2.31203043 +- 0.00077813 nats, 1.05650768 +- 0.00035557 BPB)."""
    summary = sr.summarize([sr.parse_log(p) for p in record_logs(tmp_path)])
    assert summary["val_loss"] == pytest.approx(2.31203043, abs=5e-9)
    assert summary["val_loss_std"] == pytest.approx(0.00077813, abs=5e-9)
    assert summary["val_bpb"] == pytest.approx(1.05650768, abs=5e-9)
    assert summary["val_bpb_std"] == pytest.approx(0.00035557, abs=5e-9)
    assert (summary["seeds"], summary["bytes_total"], summary["eval_seconds_max"]) == ([42, 0, 314], 15947490, 567.1)
    assert summary["train_seconds_max"] == 599.672 and summary["hardware"] == "8x GPU"
    assert sr.mean_std([1.0]) == (1.0, None)


def scipy_one_tailed(result) -> tuple[float, float]:
    return float(result.statistic), float(result.pvalue)


@pytest.mark.parametrize("n_ours,n_base,shared", [(3, 3, 3), (5, 4, 3), (2, 6, 2)])
@pytest.mark.parametrize("margin", [0.0, sr.RECORD_MARGIN_NATS])
def test_t_tests_match_scipy(stats, n_ours, n_base, shared, margin):
    rng = np.random.default_rng(n_ours * 10 + n_base)
    seeds_ours = list(range(n_ours))
    seeds_base = list(range(shared)) + list(range(100, 100 + n_base - shared))
    ours = {s: 2.30 + 0.002 * rng.standard_normal() for s in seeds_ours}
    base = {s: 2.31 + 0.003 * rng.standard_normal() for s in seeds_base}
    paired = sr.paired_test(ours, base, margin)
    common = sorted(set(ours) & set(base))
    assert paired["seeds"] == common and paired["df"] == len(common) - 1
    ref = stats.ttest_rel([base[s] - margin for s in common], [ours[s] for s in common], alternative="greater")
    assert (paired["t_margin" if margin else "t"], paired["p_margin" if margin else "p_no_improvement"]) == \
        pytest.approx(scipy_one_tailed(ref), rel=1e-9)
    welch = sr.welch_test(list(ours.values()), list(base.values()), margin)
    ref = stats.ttest_ind(np.array(list(base.values())) - margin, list(ours.values()), equal_var=False,
                          alternative="greater")
    assert (welch["t_margin" if margin else "t"], welch["p_margin" if margin else "p_no_improvement"]) == \
        pytest.approx(scipy_one_tailed(ref), rel=1e-9)
    assert welch["df"] == pytest.approx(float(ref.df), rel=1e-12) and welch["n"] == [n_ours, n_base]
    for result in (paired, welch):
        assert result["significant"] == (result["p_no_improvement"] < 0.01)
        assert result["significant_margin"] == (result["p_margin"] < 0.01)


def test_published_pr2135_vs_pr2130(stats):
    """PR #2135's README (BPB, seeds 0/42/314 vs PR #2130): paired t 1.48, df 2, p 0.138; Welch t 0.82, df 2.96,
    p 0.238 (it reports new - old, so its t is negative)."""
    ours = {0: 1.05679341, 42: 1.05610947, 314: 1.05662016}
    base = {0: 1.05689587, 42: 1.05654656, 314: 1.05664400}
    paired = sr.paired_test(ours, base, 0.0)
    welch = sr.welch_test(list(ours.values()), list(base.values()), 0.0)
    assert (paired["t"], paired["df"], paired["p_no_improvement"]) == pytest.approx((1.48, 2, 0.138), abs=5e-3)
    # 0.238 there, 0.23748 here and in scipy's ttest_ind: a rounding difference in the README
    assert (welch["t"], welch["df"], welch["p_no_improvement"]) == pytest.approx((0.82, 2.96, 0.238), abs=5e-3)


def test_record_rule_flags(stats):
    """A 0.02-nat gain with 0.0005 noise clears both nulls; a 0.003-nat gain clears 'no gain' but not the margin."""
    base = {s: 2.31 + d for s, d in zip(range(4), (0.0004, -0.0003, 0.0001, -0.0002))}
    for gain, margin_ok in ((0.02, True), (0.003, False)):
        ours = {s: v - gain + 0.0002 * (-1) ** s for s, v in base.items()}
        for result in (sr.paired_test(ours, base, 0.005), sr.welch_test(list(ours.values()), list(base.values()), 0.005)):
            assert result["significant"] and result["significant_margin"] == margin_ok
    assert sr.paired_test({1: 2.3}, {1: 2.31}, 0.005) is None and sr.welch_test([2.3], [2.31, 2.32], 0.0) is None


def test_cli_with_baseline_logs_and_plot(stats, tmp_path, capsys):
    ours = record_logs(tmp_path)
    base = record_logs(tmp_path, prefix="base", shift=0.01)
    out = tmp_path / "sub" / "submission.json"
    out.parent.mkdir()
    sr.main([*map(str, ours), "--baseline", *map(str, base), "--out", str(out), "--name", "test"])
    summary = json.loads(out.read_text())
    assert summary["name"] == "test" and summary["seed_results"]["314"]["score_source"] == "quantized_ttt_phased"
    loss = summary["comparison"]["val_loss"]
    assert loss["improvement_mean"] == pytest.approx(0.01, abs=1e-9) and loss["margin"] == 0.005
    assert loss["paired"]["seeds"] == [0, 42, 314] and loss["paired"]["significant_margin"]
    bpb = summary["comparison"]["val_bpb"]
    assert bpb["margin"] == pytest.approx(0.005 * summary["val_bpb"] / summary["val_loss"], rel=1e-12)
    printed = capsys.readouterr().out
    assert "quantized_ttt_phased" in printed and "paired" in printed and "welch" in printed
    pytest.importorskip("matplotlib")
    assert (out.parent / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_results_block_is_generated_from_the_summary(stats, tmp_path):
    ours = record_logs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{sr.README_BEGIN}\nold table\n{sr.README_END}\n\n## after\n")
    out = tmp_path / "submission.json"
    sr.main([*map(str, ours), "--out", str(out), "--plot", "", "--readme", str(readme)])
    text, summary = readme.read_text(), json.loads(out.read_text())
    assert text.startswith("# title\n\n") and text.endswith(f"{sr.README_END}\n\n## after\n")
    assert "old table" not in text and f"mean val_bpb {summary['val_bpb']:.5f}" in text
    for seed, (loss, bpb, *_) in RECORD.items():
        assert f"| {seed} | quantized_ttt_phased | {bpb:.5f} | {loss:.5f} |" in text
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="README.md: needs one"):
        sr.update_readme(readme, "x")


def test_baseline_json(stats, tmp_path):
    ours = [sr.parse_log(p) for p in record_logs(tmp_path)]
    bpb_only = tmp_path / "old.json"
    bpb_only.write_text(json.dumps({"val_bpb": 1.06, "seed_results": {"42": {"val_bpb": 1.0661}, "0": {"val_bpb": 1.0669},
                                                                      "314": {"val_bpb": 1.0665}}}))
    comparison = sr.summarize(ours, sr.load_baseline_json(bpb_only))["comparison"]
    assert "skipped" in comparison["val_loss"] and comparison["val_bpb"]["paired"]["seeds"] == [0, 42, 314]
    one_run = tmp_path / "run.json"
    one_run.write_text(json.dumps({"seed": 42, "val_bpb": 1.07, "val_loss": 2.34, "hardware": "8x H100"}))
    assert sr.load_baseline_json(one_run) == [{"seed": 42, "val_loss": 2.34, "val_bpb": 1.07}]
    one_run.write_text("{}")
    with pytest.raises(ValueError, match="run.json: no per-seed values"):
        sr.load_baseline_json(one_run)


def test_duplicate_seed_raises(tmp_path):
    paths = record_logs(tmp_path)
    with pytest.raises(ValueError, match="seed 42 appears twice"):
        sr.summarize([sr.parse_log(paths[0]), sr.parse_log(paths[0])])


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = sr.parse_log(record_logs(tmp_path)[0])
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert sr.plot_runs([run], [], tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_p_values_without_scipy_raise(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match="need scipy.stats"):
        sr.paired_test({1: 2.30, 2: 2.31}, {1: 2.32, 2: 2.34}, 0.0)
