"""The network of spec 02 §2-3 on CPU: parameter table, init, schedules, causality, document isolation, RoPE,
XSA, softcaps, dtypes, and the exact attention reference that every GPU backend is compared against."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

MODEL_FIELDS = [f.name for f in dataclasses.fields(tg.Hyperparameters)]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Hyperparameters() reads the environment: keep this process's env out of the tests."""
    for name in MODEL_FIELDS:
        monkeypatch.delenv(name.upper(), raising=False)


def tiny_h(**overrides) -> tg.Hyperparameters:
    """The record's 11 layers, loop and parallel layout at width 64 (4 query / 2 KV heads of 16)."""
    return tg.Hyperparameters(**{**dict(vocab_size=512, model_dim=64, num_heads=4, num_kv_heads=2,
                                        train_seq_len=64, eval_seq_len=64), **overrides})


def randomized(model: tg.GPT, seed: int = 0, scale: float = 0.1) -> tg.GPT:
    """Perturb every parameter (the AsymLogit scales excepted) so that no gate, lambda or zero-init projection
    hides a dependency: at init the blocks are the identity and most properties would hold trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("softcap_pos", "softcap_neg"):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_model(seed: int = 0, looping: bool = False, **overrides) -> tg.GPT:
    torch.manual_seed(seed)
    model = randomized(tg.GPT(tiny_h(**overrides)), seed).eval()
    model.set_looping(looping)
    return model


def packed_row(seed: int, lengths=(20, 25, 19), vocab: int = 512):
    """[1, T] ids of documents that each start with BOS, and their int32 cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (1, sum(lengths)), generator=g)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    ids[0, starts[:-1]] = tg.BOS_ID
    return ids, torch.tensor(starts, dtype=torch.int32)


def logits_of(model, ids, cu=None):
    with torch.no_grad():
        return model.forward_logits(ids, cu)


# ---- parameters and init --------------------------------------------------------------------------------------

def test_record_parameter_table():
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 35_945_673
    shapes = {"tok_emb.weight": (8192, 512), "qo_bank": (22, 512, 512), "kv_bank": (22, 256, 512),
              "mlp_up_bank": (11, 2048, 512), "mlp_down_bank": (11, 512, 2048), "skip_weights": (8, 512),
              "skip_gates": (8, 512), "parallel_post_lambdas": (11, 2, 2), "parallel_resid_lambdas": (11, 2),
              "smear_gate.weight": (1, 12), "smear_lambda": (1,), "softcap_pos": (), "softcap_neg": ()}
    for i in range(11):
        shapes |= {f"blocks.{i}.attn_scale": (512,), f"blocks.{i}.mlp_scale": (512,),
                   f"blocks.{i}.resid_mix": (2, 512), f"blocks.{i}.attn.q_gain": (8,),
                   f"blocks.{i}.attn.attn_gate_w": (8, 12)}
    assert {name: tuple(p.shape) for name, p in params.items()} == shapes
    assert list(model.state_dict()) == list(params) and len(params) == 68  # no persistent buffers
    banks = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
    frozen = ("softcap_pos", "softcap_neg")
    group = {name: "muon" if name in banks else "tok" if name == "tok_emb.weight" else
             "none" if name in frozen else "scalar" for name in params}
    totals = {k: sum(p.numel() for n, p in params.items() if group[n] == k) for k in ("muon", "tok", "scalar", "none")}
    assert totals == {"muon": 31_719_424, "tok": 4_194_304, "scalar": 31_943, "none": 2}
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 2_152


def test_init_follows_spec():
    model = tg.GPT(tiny_h())
    L = 11

    def orthonormal(w):
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return torch.allclose(small, torch.eye(small.shape[0]), atol=1e-5)

    for i in range(L):
        assert orthonormal(model.qo_bank[i]) and orthonormal(model.kv_bank[i]) and orthonormal(model.kv_bank[L + i])
        assert orthonormal(model.mlp_up_bank[i])
    for name, zero in (("Wo", model.qo_bank[L:]), ("Wdown", model.mlp_down_bank), ("smear", model.smear_gate.weight),
                       ("smear_lambda", model.smear_lambda), ("skip_gates", model.skip_gates)):
        assert not zero.any(), name
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 5e-4
    block = model.blocks[4]
    assert (block.attn.q_gain == 5.0).all() and not block.attn.attn_gate_w.any()
    assert (block.attn_scale == 1).all() and (block.mlp_scale == 1).all() and (model.skip_weights == 1).all()
    assert (block.resid_mix[0] == 1).all() and not block.resid_mix[1].any()
    assert (model.parallel_post_lambdas == 1).all() and torch.allclose(model.parallel_resid_lambdas, torch.tensor(1.1))
    assert model.softcap_pos.item() == model.softcap_neg.item() == 30.0
    assert [round(b.norm_scale, 4) for b in model.blocks] == [
        1.0, 0.7071, 0.5774, 0.5, 0.4472, 0.4082, 0.378, 0.3536, 0.3333, 0.3162, 0.3015]
    assert not model.looping


def test_at_init_each_position_sees_only_its_token_and_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = tg.GPT(tiny_h(smear_gate_bos_fix=False))
    ids, cu = packed_row(1)
    base = logits_of(model, ids, cu)
    changed = ids.clone()
    changed[0, 10] = 300
    diff = (logits_of(model, changed, cu) - base)[0].abs().amax(-1)
    assert diff[10] > 0 and diff[torch.arange(ids.size(1)) != 10].max() == 0
    targets = torch.randint(0, 512, ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert abs(model(ids, targets, cu).item() - math.log(512)) < 0.02


# ---- schedule, skips, looping ---------------------------------------------------------------------------------

def test_layer_schedules_match_the_log():
    assert tg.layer_schedule(11, 0, 3, 5) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert tg.layer_schedule(11, 2, 3, 5) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    model = tg.GPT(tiny_h())
    assert model.schedule() == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    model.set_looping(True)
    assert model.schedule() == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])


@pytest.mark.parametrize("looping", [False, True])
def test_skip_pairing_and_parallel_lanes(looping, monkeypatch):
    """§2.7 table: decoder position j takes encoder output #(n_enc-1-j) (LIFO) with skip row j; lanes from layer 8."""
    model = tiny_model(looping=looping)
    encoder_outputs, pairs, calls = [], [], []
    original_mix = model.skip_mix
    row = lambda w: next(j for j, r in enumerate(model.skip_weights) if torch.equal(r, w))  # noqa: E731
    monkeypatch.setattr(model, "skip_mix", lambda x, s, w, g: pairs.append(
        (row(w), next(k for k, e in enumerate(encoder_outputs) if e is s))) or original_mix(x, s, w, g))
    n_enc = len(model.schedule()[0])

    def record(module, args, kwargs, out):
        calls.append((list(model.blocks).index(module), kwargs.get("lane1") is not None))
        if len(calls) <= n_enc:
            encoder_outputs.append(out)

    for block in model.blocks:
        block.register_forward_hook(record, with_kwargs=True)
    ids, cu = packed_row(3)
    logits_of(model, ids, cu)
    skips = 8 if looping else 5
    assert pairs == [(j, n_enc - 1 - j) for j in range(skips)]
    assert [i for i, _ in calls] == sum(model.schedule(), [])
    assert all(parallel == (i >= 8) for i, parallel in calls[n_enc:])


# ---- causality, isolation, RoPE -------------------------------------------------------------------------------

@pytest.mark.parametrize("looping", [False, True])
def test_causal(looping):
    model = tiny_model(looping=looping)
    ids, cu = packed_row(4)
    base = logits_of(model, ids, cu)
    for t in (1, 19, 20, 33, 63):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % 500 + 8
        diff = (logits_of(model, changed, cu) - base)[0]
        assert diff[:t].abs().max() == 0 and diff[t].abs().max() > 0


def test_documents_isolated_with_bos_fix():
    model = tiny_model(looping=True, smear_gate_bos_fix=True)
    ids, cu = packed_row(5)  # docs [0, 20), [20, 45), [45, 64)
    base = logits_of(model, ids, cu)
    for t in (1, 10, 19, 21, 44):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % 500 + 8
        doc_end = 20 if t < 20 else 45
        diff = (logits_of(model, changed, cu) - base)[0]
        assert diff[doc_end:].abs().max() == 0 and diff[t].abs().max() > 0


def test_documents_leak_only_the_last_token_without_bos_fix():
    """The record's setting (Q1): a BOS absorbs the previous document's last token, nothing else crosses."""
    model = tiny_model(looping=True, smear_gate_bos_fix=False)
    ids, cu = packed_row(6)
    base = logits_of(model, ids, cu)
    for t, leaks in ((1, False), (10, False), (18, False), (19, True), (44, True)):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % 500 + 8
        doc_end, next_end = (20, 45) if t < 20 else (45, 64)
        diff = (logits_of(model, changed, cu) - base)[0].abs().amax(-1)
        if leaks:  # every position of the next document changes, none after it
            assert diff[doc_end:next_end].min() > 0 and diff[next_end:].sum() == 0
        else:
            assert diff[doc_end:].max() == 0


def test_rope_relativity_same_document_at_two_offsets():
    model = tiny_model(looping=True, smear_gate_bos_fix=True).double()
    doc, _ = packed_row(7, lengths=(30,))
    first, _ = packed_row(8, lengths=(13,))
    second, _ = packed_row(9, lengths=(40,))
    row_a = torch.cat((doc, second), dim=1)
    row_b = torch.cat((first, doc, second[:, :27]), dim=1)
    a = logits_of(model, row_a, torch.tensor([0, 30, 70], dtype=torch.int32))[0, :30]
    b = logits_of(model, row_b, torch.tensor([0, 13, 43, 70], dtype=torch.int32))[0, 13:43]
    assert (a - b).abs().max() < 1e-5  # fp32 angles, otherwise fp64


def test_rope_frequencies_pairs_and_sign():
    cos, sin = tg.rope_tables(5, 16, 10000.0, "cpu")
    inv_freq = torch.atan2(sin[1, 0], cos[1, 0])
    expected = torch.tensor([1, 0.316228, 0.1, 0.0316228, 0.01, 0.00316228, 0.001, 0.000316228])
    assert torch.allclose(inv_freq, expected, rtol=1e-5)
    x = torch.randn(5, 3, 64, dtype=torch.float64)
    y = tg.apply_rope(x, cos.double(), sin.double())
    assert torch.equal(y[..., 16:], x[..., 16:])
    p, j = 3, 2
    c, s = math.cos(p * expected[j].item()), math.sin(p * expected[j].item())
    assert torch.allclose(y[p, :, j], x[p, :, j] * c + x[p, :, j + 8] * s, atol=1e-6)
    assert torch.allclose(y[p, :, j + 8], -x[p, :, j] * s + x[p, :, j + 8] * c, atol=1e-6)


# ---- segments and the attention reference ---------------------------------------------------------------------

def test_padded_cu_seqlens_and_none_match():
    model = tiny_model(looping=True)
    ids, cu = packed_row(10)
    padded = torch.cat((cu, torch.full((60,), ids.size(1), dtype=torch.int32)))
    assert torch.equal(logits_of(model, ids, cu), logits_of(model, ids, padded))
    whole = torch.tensor([0, ids.size(1)], dtype=torch.int32)
    assert torch.equal(logits_of(model, ids, None), logits_of(model, ids, whole))


def test_batched_rows_without_cu_seqlens_equal_single_rows():
    model = tiny_model()
    rows = torch.cat([packed_row(s, lengths=(32,))[0] for s in (11, 12, 13)])
    batched = logits_of(model, rows)
    for r in range(3):
        assert torch.allclose(batched[r], logits_of(model, rows[r:r + 1])[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"cu_seqlens needs input_ids of shape \[1, T\]"):
        logits_of(model, rows, torch.tensor([0, 96], dtype=torch.int32))


def naive_attention(q, k, v, cu):
    out, group = torch.zeros_like(q), q.size(1) // k.size(1)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        for h in range(q.size(1)):
            scores = q[a:b, h] @ k[a:b, h // group].T / math.sqrt(q.size(-1))
            scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
            out[a:b, h] = scores.softmax(-1) @ v[a:b, h // group]
    return out


def test_sdpa_reference_is_exact_segment_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(90, heads, 16, generator=g, dtype=torch.float64) for heads in (4, 2, 2))
    cu = torch.tensor([0, 1, 30, 30, 77, 90, 90, 90], dtype=torch.int32)  # a 1-token, an empty and pad segments
    got = tg.varlen_causal_attention(q, k, v, cu, 47, "sdpa")
    assert torch.allclose(got, naive_attention(q, k, v, cu), atol=1e-12)


def fa4_stand_ins(calls):
    """CPU kernels with flash-attn-4's calling convention (the real ones need SM90/SM100): forward -> (out, lse [H, T],
    ...) of exact segment attention; backward recomputes P from lse, as flash kernels do, and returns dq, dk, dv.
    `calls` records the keywords each one got."""
    def probabilities(q, k, cu, lse=None):
        scale, group = q.size(-1) ** -0.5, q.size(1) // k.size(1)
        seg = tg._segment_ids(cu.long(), q.size(0))
        allowed = (seg[:, None] == seg[None, :]) & torch.ones(q.size(0), q.size(0), dtype=torch.bool).tril()
        scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, 1)) * scale
        scores = scores.masked_fill(~allowed, -math.inf)
        lse = scores.logsumexp(-1) if lse is None else lse
        return (scores - lse[..., None]).exp(), lse, scale, group

    def forward(q, k, v, **kw):
        calls.append(("forward", kw))
        p, lse, _, group = probabilities(q, k, kw["cu_seqlens_q"])
        return torch.einsum("hts,shd->thd", p, v.repeat_interleave(group, 1)), lse.float(), None, None, None

    def backward(q, k, v, out, dout, lse, **kw):
        calls.append(("backward", kw))
        p, _, scale, group = probabilities(q, k, kw["cu_seqlens_q"], lse.to(q.dtype))
        dp = torch.einsum("thd,shd->hts", dout, v.repeat_interleave(group, 1))
        ds = p * (dp - (dout * out).sum(-1).T[..., None]) * scale
        dq = torch.einsum("hts,shd->thd", ds, k.repeat_interleave(group, 1))
        per_head = (torch.einsum("hts,thd->shd", ds, q), torch.einsum("hts,thd->shd", p, dout))
        dk, dv = (t.view(t.size(0), k.size(1), group, -1).sum(2) for t in per_head)
        return dq, dk, dv

    return forward, backward


def test_fa4_op_traces_and_matches_exact_attention():
    """FA4 enters the compiled blocks as a torch.library op: fullgraph compile traces it, its gradients reach q, k
    and v (GQA K/V not expanded), and out/grads equal the exact reference's."""
    calls = []
    tg.load_attention_kernels()  # before the trace, as GPT() does
    op = tg.fa4_varlen_op(*fa4_stand_ins(calls), name="fa4_varlen_cpu_test")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, heads, 8, generator=g, dtype=torch.float64) for heads in (4, 2, 2))
    cu = torch.tensor([0, 13, 31, 40], dtype=torch.int32)
    dout = torch.randn(40, 4, 8, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: op(*a, 18)[0], lambda q, k, v, cu: tg.varlen_causal_attention(q, k, v, cu, 18, "sdpa")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves, cu)
        out.backward(dout)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*results):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)  # lse is fp32, as FA4 keeps it
    assert [name for name, _ in calls] == ["forward", "backward"]
    assert all(kw["causal"] and kw["max_seqlen_q"] == kw["max_seqlen_k"] == 18 for _, kw in calls)


@pytest.mark.parametrize("total, bounds", [(512, [0, 100, 101, 300, 300, 512, 512]), (300, [0, 5, 290, 300, 300]),
                                           (384, [0, 256, 384])])
def test_flex_block_mask_visits_exactly_the_allowed_blocks(total, bounds):
    """The flex path's BlockMask (its kernel needs a GPU for backward): a block pair is visited iff some real
    (query, key) pair in it is allowed, and marked full (mask_mod skipped) only if every real pair is allowed."""
    block = 128
    mask = tg.document_block_mask(torch.tensor(bounds, dtype=torch.int32), total, block)
    seg = tg._segment_ids(torch.tensor(bounds), total)
    padded = -(-total // block) * block
    allowed = torch.zeros(padded, padded, dtype=torch.bool)
    allowed[:total, :total] = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    real = torch.zeros(padded, dtype=torch.bool)
    real[:total] = True
    real_pairs = real[:, None] & real[None, :]
    n = padded // block
    any_allowed = allowed.view(n, block, n, block).any(3).any(1)
    all_allowed = (allowed | ~real_pairs).view(n, block, n, block).all(3).all(1)
    full = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        full[i, mask.full_kv_indices[0, 0, i, :mask.full_kv_num_blocks[0, 0, i]].long()] = True
    assert torch.equal(mask.to_dense()[0, 0].bool(), any_allowed)
    assert not (full & ~all_allowed).any() and full.sum() == (all_allowed & any_allowed & ~torch.eye(n).bool()).sum()
    same_segment_causal = mask.mask_mod
    q_idx, k_idx = torch.arange(total)[:, None], torch.arange(total)[None, :]
    assert torch.equal(same_segment_causal(0, 0, q_idx, k_idx), allowed[:total, :total])


def test_attention_backend_knob_is_checked():
    with pytest.raises(ValueError, match="ATTN_BACKEND='fast'"):
        tg.GPT(tiny_h(attn_backend="fast"))
    assert tg.resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"


# ---- attention internals --------------------------------------------------------------------------------------

def test_xsa_output_is_orthogonal_to_own_value(monkeypatch):
    model = tiny_model()
    attn = model.blocks[3].attn
    seen = {}

    def project(x, w, name):
        out = tg.BankProjection.project(attn, x, w, name)
        seen.setdefault(name, x if name == "o" else out)
        return out

    monkeypatch.setattr(attn, "project", project)
    ids, cu = packed_row(14)
    logits_of(model, ids, cu)
    y = seen["o"].view(-1, 2, 2, 16)  # [T, kv head, group, head dim]: the gated head outputs
    v = F.normalize(seen["v"].view(-1, 2, 1, 16), dim=-1)
    assert y.abs().max() > 0.01 and (y * v).sum(-1).abs().max() < 1e-5


# ---- logits and losses ----------------------------------------------------------------------------------------

def test_asym_softcap_and_fixed_training_softcap():
    model = tiny_model()
    ids, cu = packed_row(15)
    targets = torch.randint(0, 512, ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.softcap_pos.fill_(3.0)
        model.softcap_neg.fill_(7.0)
        raw = model.forward_hidden(ids, cu) @ model.tok_emb.weight.T
        assert raw.max() > 0.5 and raw.min() < -0.5
        expected = torch.where(raw >= 0, 3 * torch.tanh(raw / 3), 7 * torch.tanh(raw / 7))
        assert torch.allclose(model.forward_logits(ids, cu), expected, atol=1e-6)
        plain = F.cross_entropy(30 * torch.tanh(raw[0] / 30), targets[0])
    loss = model(ids, targets, cu)
    assert torch.allclose(loss, plain, atol=1e-6)
    loss.backward()
    assert model.softcap_pos.grad is None and model.softcap_neg.grad is None
    assert model.tok_emb.weight.grad is not None and model.qo_bank.grad.abs().sum() > 0


def test_bf16_autocast_dtypes_match_the_gpu_run():
    """§2.11: with the embedding stored bf16 (as in training) under bf16 autocast, x0, the residual stream and
    both lanes are bf16, the eval logits bf16, the training loss fp32; CPU autocast rules do not matter."""
    model = tiny_model(looping=True)
    model.tok_emb.bfloat16()
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: dtypes.extend(
            [a.dtype for a in args[:2] if a is not None] + [t.dtype for t in (out if isinstance(out, tuple) else (out,))]))
    ids, cu = packed_row(16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model.forward_logits(ids, cu)
        loss = model(ids, ids, cu)
    assert set(dtypes) == {torch.bfloat16} and logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert model.blocks[0].attn_scale.dtype == torch.float32


def test_rms_norm_uses_fp32_eps_and_keeps_dtype():
    x = torch.full((3, 512), 1e-4, dtype=torch.bfloat16)
    y = tg.rms_norm(x)
    assert y.dtype == torch.bfloat16
    assert abs(y[0, 0].item() - 1e-4 / math.sqrt(1e-8 + torch.finfo(torch.float32).eps)) < 2e-3


# ---- config ---------------------------------------------------------------------------------------------------

def test_hyperparameters_read_env_unless_passed(monkeypatch):
    monkeypatch.setenv("MODEL_DIM", "64")
    monkeypatch.setenv("SMEAR_GATE_BOS_FIX", "1")
    assert tg.Hyperparameters().model_dim == 64 and tg.Hyperparameters().smear_gate_bos_fix
    assert tg.Hyperparameters(model_dim=128).model_dim == 128
    assert tg.Hyperparameters.from_env({"NUM_LAYERS": "2"}).model_dim == 512
    monkeypatch.setenv("SMEAR_GATE_BOS_FIX", "yes")
    with pytest.raises(ValueError, match="SMEAR_GATE_BOS_FIX='yes'"):
        tg.Hyperparameters()


@pytest.mark.parametrize("overrides, message", [
    (dict(num_kv_heads=3), "NUM_HEADS=4 must be a multiple of NUM_KV_HEADS=3"),
    (dict(rope_dims=32), "ROPE_DIMS=32"),
    (dict(loop_end=11), "LOOP_END=11"),
])
def test_bad_model_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tg.GPT(tiny_h(**overrides))
