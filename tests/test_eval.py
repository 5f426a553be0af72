"""The scored eval: phased score-first LoRA TTT with the causal n-gram tilt (spec 04). One causal order (every score
and every hint depends only on tokens scored before it), each target scored once, the tilt normalized, the neutral
settings equal a plain per-document pass, the eval reads no training file and validation only through read_shard,
2 ranks give the 1-process result. Each property is also shown to fail on a planted leak."""
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import online_ngram_tilt as ngram
import train_gpt as tg
from conftest import end_spawned_worker

VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_h(**overrides) -> tg.Hyperparameters:
    """4 layers with looping (6 block visits) and a parallel layer; windows of 40 sliding by 8, batches of 4."""
    base = dict(vocab_size=VOCAB, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, xsa_last_n=4, loop_start=1,
                loop_end=2, num_loops=1, parallel_start_layer=3, rope_dims=8, gate_window=8, eval_seq_len=64,
                train_seq_len=32, ttt_eval_seq_len=40, ttt_chunk_size=8, ttt_batch_size=4, ttt_lora_rank=4,
                ttt_lora_lr=1e-2, phased_ttt_prefix_docs=5, global_ttt_lr=1e-2, global_ttt_chunk_tokens=128,
                token_order=4)
    return tg.Hyperparameters(**{**base, **overrides})


def doc_stream(num_targets: int, seed: int = 0) -> np.ndarray:
    """BOS-led documents of 1..120 tokens (some longer than a window) whose next token mostly follows from the
    current one, so the n-gram gates fire; the stream holds num_targets + 1 tokens."""
    rng, out = np.random.default_rng(seed), []
    while len(out) <= num_targets:
        t = int(rng.integers(8, VOCAB))
        out.append(tg.BOS_ID)
        for _ in range(int(rng.choice([1, rng.integers(2, 40), rng.integers(40, 120)]))):
            out.append(t)
            t = (5 * t + 3) % (VOCAB - 8) + 8 if rng.random() < 0.8 else int(rng.integers(8, VOCAB))
    return np.asarray(out[:num_targets + 1])


def validation(tokens: np.ndarray) -> tg.ValidationData:
    sizes = np.where(tokens == tg.BOS_ID, 0, 1 + tokens % 4)
    return tg.ValidationData(torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(sizes.astype(np.int32)))


def tiny_model(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():  # leave the zero init: every matrix and gate carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def run_eval(h, tokens) -> tuple[float, np.ndarray, list[dict]]:
    """(bpb, score per stream position (nan where unscored), trace records) of one whole eval."""
    records = []
    _, bpb = tg.PhasedTTT(tiny_model(h), h).run(validation(tokens), trace=records.append)
    return bpb, per_position(records, len(tokens)), records


def per_position(records: list[dict], size: int) -> np.ndarray:
    scores = np.full(size, np.nan)
    for r in records:
        scores[r["position"].numpy()] = r["score"].numpy()
    return scores


def scoring_order(starts, num_targets, docs) -> np.ndarray:
    """Stream positions of the targets of documents `docs`, in that order."""
    positions, is_target = tg.ordered_stream(starts, num_targets, docs)
    return positions[is_target]


def order_of(tokens, h) -> np.ndarray:
    """Stream positions of the targets in the eval's scoring order."""
    starts, num_targets = tg.find_documents(tokens)
    batches, _ = tg.ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)
    return scoring_order(starts, num_targets, np.concatenate(batches))


def altered_from(tokens, order, k, seed=1) -> np.ndarray:
    """tokens with every non-BOS target at scoring positions >= k replaced by another non-BOS id."""
    out = tokens.copy()
    at = order[k:][tokens[order[k:]] != tg.BOS_ID]
    out[at] = 8 + (tokens[at] - 8 + np.random.default_rng(seed).integers(1, VOCAB - 8, at.size)) % (VOCAB - 8)
    return out


TOKENS = doc_stream(1200)


# --- (a) one causal order for everything ----------------------------------------------------------------------


def changed_before(h, tokens, k) -> tuple[int, int]:
    """(#targets scored before k whose score changed, #targets from k on that changed) when every target from
    scoring position k on is altered; the whole eval (per-doc TTT, global phase, hints, tilt) runs twice."""
    order = order_of(tokens, h)
    base, altered = run_eval(h, tokens)[1], run_eval(h, altered_from(tokens, order, k))[1]
    before, after = order[:k], order[k:]
    return int((base[before] != altered[before]).sum()), int((base[after] != altered[after]).sum())


def test_no_score_depends_on_a_token_scored_later(monkeypatch):
    h = tiny_h()
    order = order_of(TOKENS, h)
    num_targets = tg.find_documents(TOKENS)[1]
    prefix_targets = int(num_targets[:h.phased_ttt_prefix_docs].sum())
    for k in (prefix_targets // 2, prefix_targets + (len(order) - prefix_targets) // 2):  # in the prefix, the suffix
        before, after = changed_before(h, TOKENS, k)
        assert before == 0 and after > 0, (k, before, after)
    # Planted leak: the global phase trains on the whole stream, suffix documents too (not yet scored).
    original = tg.PhasedTTT.global_phase
    monkeypatch.setattr(tg.PhasedTTT, "global_phase",
                        lambda self, tokens, n, log=None: original(self, tokens, tokens.numel() - 1, log))
    assert changed_before(h, TOKENS, prefix_targets + (len(order) - prefix_targets) // 2)[0] > 0


# --- (b) the tilt is a normalized distribution ----------------------------------------------------------------


def tilt_mass_error(records, boost) -> float:
    """max |log sum_a p'(a)| over the eval's gated rows, p'(a) = exp(-tilt_nll as if a were the target), with the
    tilt the eval calls; raises if the eval's score is not that tilt at the real target."""
    worst, gated = 0.0, 0
    for r in records:
        gate = r["hint"] >= 0
        logp, hint = r["log_probs"][gate], r["hint"][gate]
        vocab = torch.arange(logp.size(1))
        all_targets = ngram.tilt_nll(-logp, logp.gather(1, hint[:, None]).expand_as(logp), vocab[None],
                                     hint[:, None], torch.ones_like(logp, dtype=torch.bool), boost)
        torch.testing.assert_close(all_targets.gather(1, r["target"][gate][:, None])[:, 0], r["score"][gate])
        if gate.any():
            worst = max(worst, float(torch.logsumexp(-all_targets.double(), dim=1).abs().max()))
        gated += int(gate.sum())
    assert gated > 20, gated
    return worst


def test_tilted_distribution_sums_to_one_on_the_eval_rows(monkeypatch):
    h = tiny_h()
    records = run_eval(h, TOKENS)[2]
    assert tilt_mass_error(records, h.token_boost) < 1e-5
    # Each target is tilted with its own hint (ordered_hints' entry at its scoring position).
    starts, num_targets = tg.find_documents(TOKENS)
    docs = np.concatenate(tg.ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)[0])
    hints = np.full(len(TOKENS), -2)
    hints[scoring_order(starts, num_targets, docs)] = tg.ordered_hints(TOKENS, starts, num_targets, docs, h)
    assert all(np.array_equal(r["hint"].numpy(), hints[r["position"].numpy()]) for r in records)
    # Planted leak: a tilt that adds beta at the hint without renormalizing.
    monkeypatch.setattr(ngram, "tilt_nll", lambda nll, log_q, target, hint, gate, boost:
                        torch.where(gate.bool(), nll - boost * (target == hint).to(nll.dtype), nll))
    assert tilt_mass_error(run_eval(h, TOKENS)[2], h.token_boost) > 0.1


# --- (c) neutral settings = a plain per-document pass ---------------------------------------------------------


def plain_per_document_bpb(model, tokens, h) -> float:
    """Each document from its BOS, windows of <= ttt_eval_seq_len sliding by ttt_chunk_size, scored by the plain
    forward_logits of the looped model (as every eval model), one window at a time."""
    model.set_looping(True)
    val = validation(tokens)
    loss, nbytes = 0.0, 0.0
    for start, count in zip(*tg.find_documents(tokens)):
        for first in range(0, count, h.ttt_chunk_size):
            end = min(first + h.ttt_chunk_size, count)
            window = max(0, end - h.ttt_eval_seq_len)
            with torch.no_grad():
                logits = model.forward_logits(val.tokens[None, start + window:start + end])[0]
            targets = val.tokens[start + window + 1:start + end + 1]
            nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            loss += float(nll[first - window:].double().sum())
            nbytes += float(val.token_bytes[start + first + 1:start + end + 1].double().sum())
    return tg.bits_per_byte(loss, nbytes)


def test_neutral_settings_equal_a_plain_per_document_pass(monkeypatch):
    h = tiny_h(ttt_lora_lr=0.0, phased_ttt_prefix_docs=0, ngram_tilt_enabled=False)
    assert tg.find_documents(TOKENS)[1].max() > h.ttt_eval_seq_len  # some windows slide
    expected = plain_per_document_bpb(tiny_model(h), TOKENS, h)
    assert abs(run_eval(h, TOKENS)[0] - expected) < 1e-6
    # Planted leak-like fault: sliding windows lose 4 tokens of context.
    window = tg.chunk_window
    monkeypatch.setattr(tg, "chunk_window", lambda count, c, chunk, max_len: (
        (window(count, c, chunk, max_len)[1] - max_len + 4).clamp(min=0), *window(count, c, chunk, max_len)[1:]))
    assert abs(run_eval(h, TOKENS)[0] - expected) > 1e-6


# --- (d) hints ------------------------------------------------------------------------------------------------


def hint_changes(tokens, h) -> int:
    """#targets at scoring positions <= k whose hint changes when the targets from k on are altered, over 4 k."""
    starts, num_targets = tg.find_documents(tokens)
    batches, _ = tg.ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)
    docs = np.concatenate(batches)
    order = scoring_order(starts, num_targets, docs)
    base = tg.ordered_hints(tokens, starts, num_targets, docs, h)
    assert (base >= 0).sum() > 50
    changes = 0
    for k in np.linspace(100, len(order) - 100, 4).astype(int):
        altered = tg.ordered_hints(altered_from(tokens, order, k), starts, num_targets, docs, h)
        changes += int((altered[:k + 1] != base[:k + 1]).sum())
    return changes


def test_hint_never_depends_on_its_target_or_later_tokens(monkeypatch):
    h = tiny_h()
    assert hint_changes(TOKENS, h) == 0
    # Planted leak: hints built in stream order (the reference), then read in scoring order.
    def stream_order_hints(tokens, starts, num_targets, docs, h):
        hint, gate = ngram.token_hints(tokens, h.token_order, h.token_threshold)
        return np.where(gate, hint, -1)[scoring_order(starts, num_targets, docs)].astype(np.int32)
    monkeypatch.setattr(tg, "ordered_hints", stream_order_hints)
    assert hint_changes(TOKENS, h) > 0


# --- (e) file reads -------------------------------------------------------------------------------------------

OPENED: list = []
_READING_SHARD = [False]
_AUDIT = {"hooked": False, "active": False}


def audit(event, args):
    if _AUDIT["active"] and event == "open" and isinstance(args[0], (str, os.PathLike)):
        OPENED.append((os.fspath(args[0]), _READING_SHARD[0]))


def file_read_violations(h, log) -> list[str]:
    """Load validation and run the scored eval with every file open recorded: training files opened, and
    validation files opened outside read_shard."""
    if not _AUDIT["hooked"]:
        sys.addaudithook(audit)  # audit hooks cannot be removed; this one records only while active
        _AUDIT["hooked"] = True
    OPENED.clear()
    _AUDIT["active"] = True
    try:
        val = tg.load_validation(h.data_path, h.eval_seq_len, h.vocab_size)
        tg.evaluate_ttt_phased(h, val, 0, 1, torch.device("cpu"), log)
    finally:
        _AUDIT["active"] = False
    assert any("fineweb_val_" in path and inside for path, inside in OPENED)
    assert any(path == h.quantized_model_path for path, _ in OPENED)
    return ([f"training file {path}" for path, _ in OPENED if "fineweb_train_" in path] +
            [f"{path} outside read_shard" for path, inside in OPENED if "fineweb_val" in path and not inside])


def test_eval_opens_no_training_file_and_validation_only_through_read_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)  # quantize the tiny model's matrices too
    tokens = doc_stream(3 * 64)
    for name, values in (("train_000000", doc_stream(8000, 1)), ("val_000000", tokens),
                         ("val_bytes_000000", np.where(tokens == tg.BOS_ID, 0, 1))):
        header = np.zeros(256, dtype="<i4")
        header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(values)
        (tmp_path / f"fineweb_{name}.bin").write_bytes(header.tobytes() + values.astype("<u2").tobytes())
    h = tiny_h(data_path=str(tmp_path), quantized_model_path=str(tmp_path / "model.ptz"), train_batch_tokens=8 * 64,
               gptq_calibration_batches=1, max_wallclock_seconds=0.0, global_ttt_chunk_tokens=64)
    tg.quantize_and_write_artifact(tiny_model(h), h, 0, 1, torch.device("cpu"), lambda message: None)
    read_shard = tg.read_shard

    def recorded_read_shard(path, vocab_size=None):
        _READING_SHARD[0] = True
        try:
            return read_shard(path, vocab_size)
        finally:
            _READING_SHARD[0] = False

    monkeypatch.setattr(tg, "read_shard", recorded_read_shard)
    lines = []
    assert file_read_violations(h, lines.append) == []
    final = [line for line in lines if line.startswith("quantized_ttt_phased")]
    assert len(final) == 1 and re.search(r"val_bpb:\d+\.\d{8} eval_time:\d+ms$", final[0])
    assert any(line.startswith("total_eval_time:") for line in lines)
    assert any(line.startswith("ngram_tilt:precompute_done") for line in lines)
    # Planted leak: the eval peeks at a training shard (as a calibration during eval would).
    load = tg.load_quantized_model
    monkeypatch.setattr(tg, "load_quantized_model", lambda path, h, device: (
        tg.read_shard(tg.train_shard_files(h.data_path)[0]), load(path, h, device))[1])
    assert any(v.startswith("training file") for v in file_read_violations(h, lines.append))


# --- (f) coverage ---------------------------------------------------------------------------------------------


def coverage_error(records, num_targets) -> str:
    positions = np.concatenate([r["position"].numpy() for r in records])
    if len(positions) != num_targets:
        return f"{len(positions)} scores for {num_targets} targets"
    if not np.array_equal(np.sort(positions), np.arange(1, num_targets + 1)):
        return "scored positions are not 1..N"
    return ""


def test_every_target_scored_exactly_once(monkeypatch):
    h = tiny_h()
    records = run_eval(h, TOKENS)[2]
    assert coverage_error(records, len(TOKENS) - 1) == ""
    # Planted fault: each chunk after the first also rescores the previous chunk's last target.
    window = tg.chunk_window
    monkeypatch.setattr(tg, "chunk_window", lambda count, c, chunk, max_len: (
        *window(count, c, chunk, max_len)[:2], max(chunk * c - 1, 0)))
    records = []
    with pytest.raises(RuntimeError, match="expected each of 1..1200 once"):
        tg.PhasedTTT(tiny_model(h), h).run(validation(TOKENS), trace=records.append)
    assert coverage_error(records, len(TOKENS) - 1) != ""


# --- phases, padding, ranks -----------------------------------------------------------------------------------


def test_schedule_prefix_is_the_stream_start_and_finished_rows_drop_out():
    h = tiny_h()
    starts, num_targets = tg.find_documents(TOKENS)
    assert num_targets.sum() == len(TOKENS) - 1 and (num_targets >= 1).all()
    batches, num_prefix = tg.ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)
    assert sorted(np.concatenate(batches[:num_prefix])) == list(range(h.phased_ttt_prefix_docs))
    assert sorted(np.concatenate(batches)) == list(range(len(starts)))
    assert all((np.diff(num_targets[b]) <= 0).all() for b in batches)  # longest first: live rows are a prefix
    record = tg.Hyperparameters()
    plan = tg.chunk_plan(np.array([10_000, 2600, 480, 48, 1]), record)
    assert len(plan) == 209  # the longest document's chunk steps: windows of 48, 96, ..., 2544, then 2560
    assert [w for _, _, w in plan] == [min(48 * (c + 1), 2560) for c in range(209)]  # exact widths, no rounding
    rows, trained = [r for r, _, _ in plan], [t for _, t, _ in plan]
    assert rows[:2] == [5, 3] and rows[9] == 3 and rows[10] == rows[54] == 2 and rows[55] == rows[-1] == 1
    assert trained == rows[1:] + [0]  # a row trains on every chunk but its last
    assert sum(r * w for r, _, w in plan) == sum(sum(min(48 * (c + 1), 2560) for c in range(-(-n // 48)))
                                                 for n in (10_000, 2600, 480, 48, 1))
    costs = [tg.batch_cost(num_targets[b], h) for b in batches]
    shares = tg.assign_batches(range(len(batches)), costs, 3)
    assert sorted(sum(shares, [])) == list(range(len(batches)))
    assert max(sum(costs[i] for i in s) for s in shares) <= sum(costs) / 3 + max(costs)


def graphed_on_cpu(h) -> tg.PhasedTTT:
    """A PhasedTTT that runs the CUDA-graph path's rounded step shapes and all-row AdamW updates, with each
    would-be graph replay run directly (the capture itself needs a GPU)."""
    ttt = tg.PhasedTTT(tiny_model(h), h)
    ttt.graphs = {}
    ttt.graphed_step = lambda args, update: ttt.step(*args, args[0].size(0) if update else 0)
    return ttt


def test_rounded_step_shapes_of_the_cuda_graphs_change_no_score(monkeypatch):
    """CUDA graphs run each chunk step with rows and width rounded up (extra rows unscored, extra columns after
    every scored position) and the AdamW update on all rows: the same BPB as the exact shapes."""
    # Rows round 3 -> 4, 5 -> 8 capped at the batch's 7; widths 8..40 -> 40. At lr 1e-3 TTT moves the BPB by 0.0085
    # (at 1e-2, AdamW's normalized steps amplify the float noise of the longer reductions to ~1e-4).
    h = tiny_h(ttt_batch_size=7, ttt_lora_lr=1e-3)
    ttt = graphed_on_cpu(h)
    assert ttt.step_shape(3, 8) == (4, 40) and ttt.step_shape(5, 16) == (7, 40)
    exact = tg.PhasedTTT(tiny_model(h), h).run(validation(TOKENS))[1]
    assert abs(graphed_on_cpu(h).run(validation(TOKENS))[1] - exact) < 1e-6
    # Planted fault: the rounding's extra rows are scored too (as row 0 is).
    original = tg.PhasedTTT.step
    monkeypatch.setattr(tg.PhasedTTT, "step", lambda self, x, cols, y, hints, scored, *rest: original(
        self, x, cols, y, hints, scored | scored[:1], *rest))
    with pytest.raises(RuntimeError, match="expected each of"):
        graphed_on_cpu(h).run(validation(TOKENS))


def test_lora_adamw_matches_torch_adamw_on_the_training_rows():
    """BatchedLoRA.set_step + update: torch's AdamW (decoupled decay, bias corrections) on the rows still training."""
    h = tiny_h(ttt_lora_lr=3e-3, ttt_weight_decay=0.5)
    for beta1 in (0.0, 0.9):
        h.ttt_beta1 = beta1
        lora = tg.BatchedLoRA(tiny_model(h), 4, h, torch.device("cpu"))
        lora.reset(0)
        reference = [t.clone().requires_grad_() for t in lora.tensors]
        adamw = torch.optim.AdamW(reference, lr=h.ttt_lora_lr, betas=(beta1, h.ttt_beta2), eps=1e-10,
                                  weight_decay=h.ttt_weight_decay)
        frozen = [t[3:].clone() for t in lora.tensors]
        for step in (1, 2, 3):
            lora.adapters(4)
            for leaf, ref in zip(lora.leaves, reference):
                ref.grad = torch.zeros_like(ref)
                leaf.grad = torch.randn_like(leaf)
                ref.grad[:3] = leaf.grad[:3]
            lora.set_step(step)
            lora.update(3)  # row 3 has ended: untouched
            adamw.step()
            for ours, ref, still in zip(lora.tensors, reference, frozen):
                torch.testing.assert_close(ours[:3], ref.detach()[:3], rtol=1e-6, atol=1e-7)
                assert torch.equal(ours[3:], still)


def test_ttt_step_graph_kinds_and_gradient_layouts(monkeypatch):
    """What keeps the compiled TTT step cheap: every block visit gets an input that requires grad (the first block
    compiles no graph of its own), and each adapter's gradient arrives in the adapter's own layout (autograd then
    keeps it; another layout is copied, 136 copies a step at the record's size)."""
    h = tiny_h()
    ttt = tg.PhasedTTT(tiny_model(h), h)
    inputs, layouts = [], []
    for block in ttt.model.blocks:
        monkeypatch.setattr(block, "forward", lambda x, *args, _forward=block.forward, **kwargs: (
            inputs.append(x.requires_grad), _forward(x, *args, **kwargs))[1])
    adapters = ttt.lora.adapters
    def hooked(rows):
        visits, head = adapters(rows)
        for leaf in ttt.lora.leaves:
            leaf.register_hook(lambda grad, leaf=leaf: layouts.append(grad.stride() == leaf.stride()))
        return visits, head
    monkeypatch.setattr(ttt.lora, "adapters", hooked)
    data = tg.synthetic_ttt_data([20, 9], VOCAB, torch.Generator().manual_seed(0), torch.device("cpu"))
    ttt.score_batch(data, 0, np.arange(2), torch.zeros(4, dtype=torch.float64))
    assert len(inputs) == 6 * 3 and all(inputs)  # 6 block visits x 3 chunks
    assert len(layouts) == 2 * len(ttt.lora.tensors) and all(layouts)  # 2 chunks train
    # Planted fault: x A^T computed as (A x^T)^T, the same values with A's gradient transposed.
    def transposed_product(y, x, lora, name):
        if lora is None or name not in lora:
            return y
        a_t, b_t, scale = lora[name]
        return y + scale * torch.bmm(torch.bmm(a_t.mT.to(x.dtype), x.mT).mT, b_t.to(x.dtype))
    monkeypatch.setattr(tg, "add_lora", transposed_product)
    layouts.clear()
    ttt.score_batch(data, 0, np.arange(2), torch.zeros(4, dtype=torch.float64))
    assert not all(layouts)


def test_global_phase_moves_the_weights_but_not_the_asymlogit_scales():
    h = tiny_h()
    ttt = tg.PhasedTTT(tiny_model(h), h)
    before = {name: p.detach().clone() for name, p in ttt.model.named_parameters()}
    lines = []
    ttt.global_phase(torch.from_numpy(TOKENS.astype(np.int64)), 300, lines.append)
    after = dict(ttt.model.named_parameters())
    assert torch.equal(after["softcap_pos"], before["softcap_pos"]) and torch.equal(after["softcap_neg"],
                                                                                    before["softcap_neg"])
    assert all(not torch.equal(after[n], before[n]) for n in ("qo_bank", "kv_bank", "mlp_up_bank", "tok_emb.weight"))
    assert lines[-1].startswith("ttt_global step:3/3") and not any(p.requires_grad for p in after.values())


def test_global_loss_never_attends_across_a_document():
    """A global-phase row holding several documents gives their losses run alone (the SmearGate off: with the
    record's BOS fix off it reads the previous token across a BOS)."""
    h = tiny_h()
    ttt = tg.PhasedTTT(tiny_model(h), h)
    ttt.model.smear_lambda.data.zero_()
    row = torch.from_numpy(TOKENS[:h.ttt_eval_seq_len + 1].astype(np.int64))
    cuts = [*np.flatnonzero(row[:-1].numpy() == tg.BOS_ID), row.numel() - 1]
    assert len(cuts) >= 3, "the row must hold several documents"
    total = 0.0
    for a, b in zip([0, *cuts], cuts):
        if b > a:  # a document, or the row's head before its first BOS
            hidden = ttt.model.forward_hidden(row[None, a:b])
            total += float(ttt.model.training_loss(hidden, row[None, a + 1:b + 1])) * (b - a)
    assert float(ttt.global_loss(row)) == pytest.approx(total / (row.numel() - 1), rel=1e-6)


def ranks_result(rank: int = 0, world_size: int = 1, rendezvous: str = "", out: str = ""):
    """(loss, bpb) of the eval without the global phase, and the weights after a global phase of 3 steps."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    h = tiny_h(phased_ttt_prefix_docs=0)
    scores = tg.PhasedTTT(tiny_model(h), h, rank, world_size).run(validation(TOKENS))
    ttt = tg.PhasedTTT(tiny_model(h), h, rank, world_size)
    ttt.global_phase(torch.from_numpy(TOKENS.astype(np.int64)), 300)
    if rank == 0 and out:
        torch.save((scores, ttt.model.state_dict()), out)
    if world_size > 1:
        dist.destroy_process_group()
        end_spawned_worker()
    return scores, ttt.model.state_dict()


def test_two_ranks_give_the_one_process_result(tmp_path):
    one = ranks_result()
    mp.spawn(ranks_result, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    # Batches split over ranks: bit-identical (fresh adapters seeded by batch index, hints broadcast from rank 0).
    assert two[0] == one[0]
    # The global phase: the same rows, only the gradient sum order differs. (After it, AdamW's sign-like first
    # steps on near-zero gradients make per-document TTT amplify such rounding differences.)
    for name, value in one[1].items():
        torch.testing.assert_close(two[1][name], value, rtol=0, atol=1e-6, msg=name)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
