"""Token n-gram hints (spec 05 section 3) and the tilt (section 7): golden vectors of the reference,
a sequential re-statement of the state machine, causality with a planted leak, the native build."""
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import online_ngram_tilt as ngram  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "ngram"
STREAMS = sorted(p.stem for p in GOLDEN.glob("*.npz") if p.name != "tilt_cases.npz")
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Build into a fresh folder once per test module, leaving the user's cache alone."""
    before = os.environ.get("NGRAM_CACHE_DIR")
    os.environ["NGRAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("ngram_cache"))
    ngram._native = None
    yield
    ngram._native = None
    if before is None:
        del os.environ["NGRAM_CACHE_DIR"]
    else:
        os.environ["NGRAM_CACHE_DIR"] = before


def sequential_reference(tokens, order):
    """Spec 05 section 3.4 step by step in plain Python: (top, conf) per stream position."""
    targets = [int(t) for t in tokens[1:]]
    context_length = order - 1
    history = targets[:1]  # seeded with the first target, not with tokens[0]
    contexts, pairs = {}, {}
    top = np.zeros(len(tokens), np.uint16)
    conf = np.zeros(len(tokens), np.float32)
    for i, target in enumerate(targets):
        if len(history) >= context_length:
            key = 0
            for j, token in enumerate(history[-context_length:]):
                key ^= token * ngram.COEFFS[j] & MASK64
            pair = (key * ngram.PAIR_MULTIPLIER & MASK64) ^ (target * ngram.COEFFS[context_length % 32] & MASK64)
            entry = contexts.get(key)
            if entry is not None:
                top[i + 1], conf[i + 1] = entry[2], np.float32(entry[1]) / np.float32(entry[0])
            pairs[pair] = count = pairs.get(pair, 0) + 1
            if entry is None:
                contexts[key] = [1, count, target]
            else:
                entry[0] += 1
                if count > entry[1]:
                    entry[1:] = [count, target]
        history.append(target)
    return top, conf


def random_stream(rng, length, alphabet, repeat_templates=0):
    """BOS + random ids from a small alphabet (contexts repeat), optionally spliced repeated templates."""
    ids = rng.integers(0, alphabet, length) + 100
    for _ in range(repeat_templates):
        template = rng.integers(100, 100 + alphabet, 40)
        for start in rng.integers(1, max(length - 40, 2), 6):
            ids[start:start + 40] = template[:len(ids[start:start + 40])]
    ids[rng.random(length) < 0.01] = 1
    ids[0] = 1
    return ids.astype(np.uint16)


def noisy_periodic_stream(rng, length, period=50, noise=0.02):
    """A repeated random template with a few substitutions: most contexts recur and gate."""
    ids = np.resize(rng.integers(100, 140, period), length)
    flip = rng.random(length) < noise
    ids[flip] = rng.integers(100, 140, int(flip.sum()))
    ids[0] = 1
    return ids.astype(np.uint16)


def assert_bitwise_equal(got, expected, label):
    (top_a, conf_a), (top_b, conf_b) = got, expected
    assert np.array_equal(top_a, top_b), f"{label}: top differs at {np.flatnonzero(top_a != top_b)[:5]}"
    bits_a, bits_b = conf_a.view(np.uint32), conf_b.view(np.uint32)
    assert np.array_equal(bits_a, bits_b), f"{label}: conf differs at {np.flatnonzero(bits_a != bits_b)[:5]}"


# === golden vectors ===
@pytest.mark.parametrize("backend", ["c", "numpy"])
@pytest.mark.parametrize("name", STREAMS)
def test_golden_hints_and_gates(name, backend):
    data = np.load(GOLDEN / f"{name}.npz")
    hint, gate = ngram.token_hints(data["tokens"], order=16, threshold=0.8, backend=backend)
    assert hint.shape == gate.shape == data["tokens"].shape and not gate[0]
    assert np.array_equal(gate[1:].astype(np.uint8), data["gate"])
    assert np.array_equal(hint[1:], data["hint"].astype(np.int64))
    assert int(gate.sum()) == MANIFEST[name]["gated"]
    top, conf = ngram.token_channel(data["tokens"], order=16, backend=backend)
    assert_bitwise_equal((top[1:], conf[1:]), (data["top_token"], data["top_prob"]), name)


@pytest.mark.parametrize("threads", [1, 3, 64])
def test_thread_count_does_not_change_output(threads):
    data = np.load(GOLDEN / "english_docs0000_2999.npz")
    top, conf = ngram.token_channel(data["tokens"], backend="c", threads=threads)
    assert_bitwise_equal((top[1:], conf[1:]), (data["top_token"], data["top_prob"]), f"threads={threads}")


def test_threshold_integer_form_on_golden_positions():
    """Spec 05 section 3.5: float32(c/n) >= float32(0.8) is 5c >= 4n; 4/5 and 8/10 fire, 3/4 and 7/9 do not."""
    data = np.load(GOLDEN / "syn_threshold.npz")
    conf = ngram.token_channel(data["tokens"])[1]
    fired = set(conf[ngram.token_hints(data["tokens"])[1]].tolist())
    assert np.float32(0.8) in fired and np.float32(0.75) not in fired and np.float32(7 / 9) not in fired


# === the fast paths against a sequential re-statement ===
@pytest.mark.parametrize("seed, length, alphabet, order", [
    (0, 3000, 2, 3), (1, 3000, 3, 5), (2, 4000, 2, 16), (3, 2500, 4, 16), (4, 2000, 3, 33), (5, 200, 2, 2)])
def test_random_streams_match_sequential_reference(seed, length, alphabet, order):
    tokens = random_stream(np.random.default_rng(seed), length, alphabet, repeat_templates=6)
    expected = sequential_reference(tokens, order)
    found, gated = (expected[1] > 0).sum(), (expected[1] >= np.float32(0.8)).sum()
    assert found > length // 40 and gated > 0, "stream too random to exercise the tables"
    for threads in (1, 2):
        assert_bitwise_equal(ngram.token_channel(tokens, order, backend="c", threads=threads), expected, "c")
    assert_bitwise_equal(ngram.token_channel(tokens, order, backend="numpy"), expected, "numpy")


def test_large_stream_many_partitions_and_threads():
    """~100k positions: several hash partitions and up to 24 worker threads, against the numpy version."""
    tokens = random_stream(np.random.default_rng(9), 100_000, 3, repeat_templates=5)
    expected = ngram.token_channel(tokens, backend="numpy")
    for threads in (1, 24):
        assert_bitwise_equal(ngram.token_channel(tokens, backend="c", threads=threads), expected, str(threads))


@pytest.mark.parametrize("length", [0, 1, 2, 14, 15, 16, 17])
def test_short_streams(length):
    tokens = np.full(length, 777, np.uint16)
    if length:
        tokens[0] = 1
    for backend in ("c", "numpy"):
        hint, gate = ngram.token_hints(tokens, backend=backend)
        top, conf = sequential_reference(tokens, 16)
        assert hint.shape == gate.shape == (length,)
        assert np.array_equal(gate, conf >= np.float32(0.8)) and np.array_equal(hint, np.where(gate, top, 0))
    # constant stream: the first gate is target index 15 = stream entry 16 (seeding quirk, spec 05 section 3.2)
    assert gate.sum() == (1 if length == 17 else 0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="order must be in"):
        ngram.token_hints(np.ones(10, np.int64), order=34)
    with pytest.raises(ValueError, match=r"found \[-1, 5\]"):
        ngram.token_hints(np.array([1, 5, -1]))
    with pytest.raises(ValueError, match="1-D"):
        ngram.token_hints(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="backend"):
        ngram.token_hints(np.ones(20, np.int64), backend="fortran")


# === causality ===
def causality_violations(hints_fn, tokens, positions, rng):
    """(position, how) pairs where changing tokens[t] (or tokens[t:]) altered hint/gate at an entry <= t."""
    base_hint, base_gate = hints_fn(tokens)
    violations = []
    for t in positions:
        changed_one = tokens.copy()
        changed_one[t] = 100 if tokens[t] != 100 else 101
        changed_tail = tokens.copy()
        changed_tail[t:] = rng.integers(100, 140, len(tokens) - t)
        for how, variant in (("token", changed_one), ("suffix", changed_tail)):
            hint, gate = hints_fn(variant)
            same_hint = np.array_equal(hint[:t + 1], base_hint[:t + 1])
            if not (same_hint and np.array_equal(gate[:t + 1], base_gate[:t + 1])):
                violations.append((int(t), how))
    return violations


@pytest.mark.parametrize("order", [3, 16])
def test_hints_are_causal(order):
    rng = np.random.default_rng(order)
    tokens = noisy_periodic_stream(rng, 3000)
    positions = rng.choice(np.arange(1, len(tokens)), 12, replace=False)
    assert ngram.token_hints(tokens, order=order)[1].mean() > 0.5, "too few gates to expose a leak"
    for backend in ("c", "numpy"):
        hints_fn = lambda s: ngram.token_hints(s, order=order, backend=backend)  # noqa: E731
        assert causality_violations(hints_fn, tokens, positions, rng) == []


def test_causality_check_catches_a_planted_leak(monkeypatch):
    """A variant whose entry t is built after seeing tokens[t] (an off-by-one that peeks at the target)."""
    real = ngram._channel_native

    def peeking(targets, context_length, threads, top, conf):
        work = real(targets, context_length, threads, top, conf)
        top[:-1], conf[:-1] = top[1:].copy(), conf[1:].copy()
        return work

    monkeypatch.setattr(ngram, "_channel_native", peeking)
    rng = np.random.default_rng(0)
    tokens = noisy_periodic_stream(rng, 3000)
    positions = rng.choice(np.arange(100, len(tokens) - 1), 12, replace=False)
    violations = causality_violations(lambda s: ngram.token_hints(s, order=16, backend="c"), tokens, positions, rng)
    assert len(violations) >= 12, violations


# === tilt math ===
def test_tilt_cases_scalar_rows():
    cases = np.load(GOLDEN / "tilt_cases.npz")
    got = ngram.tilt_nll(*(torch.from_numpy(cases[k]) for k in ("ptl", "log_q_hint", "target", "hint", "gate")),
                         boost=torch.from_numpy(cases["boost"]))
    np.testing.assert_allclose(got.numpy(), cases["tilted_fp32"], rtol=1e-6, atol=2e-6)
    gate = cases["gate"].astype(bool)
    assert np.array_equal(got.numpy()[~gate], cases["ptl"][~gate])


def test_tilt_cases_full_rows():
    cases = np.load(GOLDEN / "tilt_cases.npz")
    log_probs = torch.log_softmax(torch.from_numpy(cases["logits"]), dim=-1)
    target, hint = torch.from_numpy(cases["logits_target"]), torch.from_numpy(cases["logits_hint"])
    gate = torch.from_numpy(cases["logits_gate"]).bool()
    got = ngram.tilted_nll(log_probs, target, hint, gate)  # the record's boost is the default
    np.testing.assert_allclose(got.numpy(), cases["logits_tilted_fp32"], rtol=1e-6, atol=2e-6)
    log_probs64 = torch.log_softmax(torch.from_numpy(cases["logits"]).double(), dim=-1)
    total = ngram.tilt_log_probs(log_probs64, hint, gate).exp().sum(-1)
    np.testing.assert_allclose(total.numpy(), cases["logits_tilted_dist_sum"], atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_tilted_distribution_sums_to_one(dtype, tol):
    generator = torch.Generator().manual_seed(0)
    logits = 30 * torch.tanh(torch.randn(64, 8192, generator=generator, dtype=dtype) * 8 / 30)
    log_probs = torch.log_softmax(logits, -1)
    hint = torch.randint(0, 8192, (64,), generator=generator)
    hint[:8] = logits[:8].argmax(-1)  # confident hints too
    gate = torch.rand(64, generator=generator) < 0.5
    tilted = ngram.tilt_log_probs(log_probs, hint, gate)
    assert torch.logsumexp(tilted, -1).abs().max().item() < tol
    assert torch.equal(tilted[~gate], log_probs[~gate])


def test_closed_form_equals_boosted_softmax():
    """-log p'(y) = -log_softmax(logits + beta onehot(hint))[y], for hits and misses; beta 0 or no gate = nll."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(256, 8192, generator=generator) * 3
    log_probs = torch.log_softmax(logits, -1)
    target = torch.randint(0, 8192, (256,), generator=generator)
    hint = torch.where(torch.arange(256) % 2 == 0, target, torch.randint(0, 8192, (256,), generator=generator))
    gate = torch.ones(256, dtype=torch.bool)
    boosted = logits + ngram.TOKEN_BOOST * torch.nn.functional.one_hot(hint, 8192)
    expected = -torch.log_softmax(boosted, -1).gather(-1, target[:, None])[:, 0]
    got = ngram.tilted_nll(log_probs, target, hint, gate)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    nll = -log_probs.gather(-1, target[:, None])[:, 0]
    hit = target == hint
    assert (got[hit] < nll[hit]).all() and (got[~hit] >= nll[~hit]).all()
    assert torch.equal(ngram.tilted_nll(log_probs, target, hint, ~gate), nll)
    assert torch.equal(ngram.tilted_nll(log_probs, target, hint, gate, boost=0.0), nll)


# === native build ===
def fresh_build_env(monkeypatch, tmp_path):
    monkeypatch.setattr(ngram, "_native", None)
    monkeypatch.setenv("NGRAM_CACHE_DIR", str(tmp_path / "cache"))


def test_missing_compiler_raises_and_falls_back(monkeypatch, tmp_path):
    fresh_build_env(monkeypatch, tmp_path)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # holds no compiler
    with pytest.raises(RuntimeError, match=r"no C compiler .*looked for cc, gcc, clang.*apt-get install gcc"):
        ngram.load_native()
    data = np.load(GOLDEN / "syn_binary.npz")
    with pytest.raises(RuntimeError, match="no C compiler"):
        ngram.token_hints(data["tokens"], backend="c")
    with pytest.warns(RuntimeWarning, match="numpy fallback"):
        hint, gate = ngram.token_hints(data["tokens"])
    assert np.array_equal(gate[1:].astype(np.uint8), data["gate"]) and np.array_equal(hint[1:], data["hint"])
    monkeypatch.setenv("CC", "/nonexistent/xcc -m64")
    with pytest.raises(RuntimeError, match=r"looked for \$CC='/nonexistent/xcc -m64'"):
        ngram.load_native()


def test_source_change_rebuilds_and_same_source_reuses(tmp_path):
    source = tmp_path / "online_ngram_state.c"
    source.write_text(ngram.C_SOURCE.read_text())
    first = ngram.build_native(source, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert ngram.build_native(source, tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp
    source.write_text(source.read_text() + "\n/* edited */\n")
    second = ngram.build_native(source, tmp_path / "cache")
    assert second != first and second.exists()
    lib = ngram._declare(__import__("ctypes").CDLL(str(second)), second)
    assert lib.ngram_abi_version() == ngram.ABI_VERSION
    compiler = ngram.find_compiler()
    paths = {ngram._library_path(tmp_path, "x", compiler, "v1", flags) for flags in (("-O2",), ("-O3",))}
    assert len(paths) == 2, "compiler flags must be part of the cache key"


def test_concurrent_builds_do_not_race(tmp_path):
    source = tmp_path / "online_ngram_state.c"
    source.write_text(ngram.C_SOURCE.read_text())
    results, errors = [], []

    def build():
        try:
            results.append(ngram.build_native(source, tmp_path / "cache"))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    workers = [threading.Thread(target=build) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(set(results)) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [results[0].name]
