"""GPTQ, SDClip, LQER, the calibration loader and Hessian collection (shared/spec/03 §2-4, 01 §7)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg


def write_shard(path, tokens) -> None:
    header = np.zeros(tg.SHARD_HEADER_BYTES // 4, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


pytestmark = pytest.mark.usefixtures("one_thread")


def make_shards(folder, num_train=3, tokens=6000, vocab=256, seed=0):
    """num_train training shards, one validation shard and its byte sidecar (1 byte per token, 0 at BOS)."""
    rng = np.random.default_rng(seed)
    for kind, count in (("train", num_train), ("val", 1)):
        for i in range(count):
            ids = rng.integers(2, vocab, tokens)
            ids[rng.random(tokens) < 0.02] = tg.BOS_ID
            ids[0] = tg.BOS_ID
            write_shard(folder / f"fineweb_{kind}_{i:06d}.bin", ids)
    write_shard(folder / "fineweb_val_bytes_000000.bin", (ids != tg.BOS_ID).astype(np.int64))


def tiny_h(folder, **overrides) -> tg.Hyperparameters:
    config = dict(data_path=str(folder), vocab_size=256, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2,
                  xsa_last_n=3, loop_start=1, loop_end=1, num_loops=2, parallel_start_layer=2, train_seq_len=32,
                  train_batch_tokens=8 * 128, gptq_calibration_batches=2, max_wallclock_seconds=0.0,
                  quantized_model_path=str(Path(folder) / "final_model.int6.ptz"))
    return tg.Hyperparameters(**{**config, **overrides})


def tiny_model(h, seed=0) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():  # leave the all-zero init: every matrix and gate gets signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def correlated_layer(rows=256, cols=128, samples=8192, seed=0):
    """A weight and inputs with a decaying spectrum plus a few high-variance channels (spec 03 §3.2)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.exp(-torch.arange(cols) / 16.0)
    x = torch.randn(samples, cols, generator=g) @ mix
    x[:, :4] *= 8.0
    return torch.randn(rows, cols, generator=g) * 0.02, x, x.T @ x / samples


def rtn(weight, scales, qmax):
    return torch.clamp(torch.round(weight / scales.float()[:, None]), -qmax, qmax)


def test_gptq_output_error_below_round_to_nearest():
    weight, x, hessian = correlated_layer()
    for bits, clip in ((6, 11.5), (7, 14.0)):
        codes, scales = tg.gptq_quantize(weight[None], hessian[None], clip, bits)
        gptq_err = torch.linalg.norm(x @ (weight - tg.dequantize_tensor(codes[0], scales[0])).T)
        rtn_weight = rtn(weight, scales[0], 2 ** (bits - 1) - 1) * scales[0].float()[:, None]
        rtn_err = torch.linalg.norm(x @ (weight - rtn_weight).T)
        assert gptq_err < 0.9 * rtn_err, (bits, float(gptq_err), float(rtn_err))


def test_gptq_with_identity_hessian_is_round_to_nearest_and_scales_are_sdclip():
    weight, _, _ = correlated_layer()
    codes, scales = tg.gptq_quantize(weight[None], torch.eye(weight.shape[1])[None], 13.0, 6)
    assert torch.equal(scales[0], (13.0 * weight.std(dim=1) / 31).half())
    assert torch.equal(codes[0].float(), rtn(weight, scales[0], 31))


def test_gptq_dead_columns_code_range_and_constant_rows():
    weight, _, hessian = correlated_layer(rows=64, cols=96)
    hessian[5, :] = hessian[:, 5] = 0.0
    weight[3] = 0.0  # a constant row: the fp16 scale floor keeps it finite (spec 03 Q17)
    for bits in (6, 7):
        codes, scales = tg.gptq_quantize(weight[None], hessian[None], 12.0, bits)
        qmax = 2 ** (bits - 1) - 1
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= qmax
        assert not codes[0, :, 5].any() and not codes[0, 3].any() and float(scales[0, 3]) > 0


def test_lqer_factors_shapes_ranges_and_error_reduction():
    weight, _, hessian = correlated_layer(rows=128, cols=64)
    weight[:, 7] += 0.3  # a planted low-rank error: a column far outside the clip range
    codes, scales = tg.gptq_quantize(weight[None], torch.eye(64)[None], 4.0, 6)
    error = weight - tg.dequantize_tensor(codes[0], scales[0])
    qa, sa, qb, sb = tg.lqer_factors(error, 4, 32)
    assert qa.shape == (128, 4) and qb.shape == (4, 64) and sb.shape == (8,) and sa.dim() == 0
    assert int(qa.min()) >= -2 and int(qa.max()) <= 1 and int(qb.min()) >= -8 and int(qb.max()) <= 7
    corrected = weight - tg.dequantize_tensor(codes[0], scales[0], (qa, sa, qb, sb))
    assert torch.linalg.norm(corrected) < 0.9 * torch.linalg.norm(error)


def test_quantize_weights_routing_and_lqer_on_the_largest_errors(monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)
    h = tiny_h(".", lqer_top_k=2)
    flat = tg.unbank_state_dict(tiny_model(h).state_dict())
    hessians = {n: torch.eye(t.shape[1]) for n, t in flat.items() if t.numel() > 1024}
    qw = tg.quantize_weights(flat, hessians, h, torch.device("cpu"))
    assert set(qw.codes) == set(hessians) and len(qw.codes) == 6 * h.num_layers + 1
    assert qw.bits["tok_emb.weight"] == 7 and {qw.bits[n] for n in qw.codes if n != "tok_emb.weight"} == {6}
    assert all(t.dtype == torch.float16 for t in qw.passthrough.values())
    errors = {n: float(torch.linalg.norm(flat[n] - tg.dequantize_tensor(qw.codes[n], qw.scales[n]))) for n in qw.codes}
    assert set(qw.lqer) == set(sorted(errors, key=errors.get)[-2:])
    for name in qw.lqer:
        assert float(torch.linalg.norm(flat[name] - tg.dequantize_tensor(qw.codes[name], qw.scales[name],
                                                                         qw.lqer[name]))) < errors[name]
    assert "gptq (int7)" in "".join(qw.categories()) and "passthrough (float16)" in qw.categories()


def test_bank_split_round_trip():
    h = tiny_h(".")
    state = tiny_model(h).state_dict()
    flat = tg.unbank_state_dict(state)
    assert torch.equal(flat["blocks.1.attn.proj.weight"], state["qo_bank"][h.num_layers + 1])
    assert torch.equal(flat["blocks.2.attn.c_v.weight"], state["kv_bank"][h.num_layers + 2])
    rebanked = tg.rebank_state_dict(flat, state)
    assert rebanked.keys() == state.keys() and all(torch.equal(rebanked[k], state[k]) for k in state)


def test_calibration_loader_windows_ranks_and_segments(tmp_path):
    make_shards(tmp_path, num_train=4)
    files = tg.train_shard_files(str(tmp_path))
    shards = {f: tg.read_shard(f) for f in files}
    loader = tg.CalibrationLoader(files, rank=1, world_size=2, seq_len=32, num_seqs=5)
    ids, cu = loader.next_batch()
    assert ids.shape == (1, 160) and cu[0] == 0 and cu[-1] == 160 and cu.numel() % 64 == 0
    starts = set(cu.tolist())
    assert all(s in starts for s in range(0, 160, 32))
    assert all(p in starts for p in np.flatnonzero(ids[0].numpy() == tg.BOS_ID))
    mine = [shards[f] for f in files[1::2]]
    for window in ids[0].view(5, 32).numpy():  # every window is a run of one of this rank's shards
        assert any(np.array_equal(window, s[i:i + 32]) for s in mine for i in np.flatnonzero(s == window[0]))
    again = tg.CalibrationLoader(files, rank=1, world_size=2, seq_len=32, num_seqs=5)
    assert torch.equal(again.next_batch()[0], ids)


def test_hessians_match_activations_captured_independently(tmp_path):
    make_shards(tmp_path)
    h = tiny_h(tmp_path)
    model = tiny_model(h)
    loader = tg.CalibrationLoader(tg.train_shard_files(str(tmp_path)), 0, 1, 32, 4, h.vocab_size)
    hessians, info = tg.collect_hessians(model, loader, 2, torch.device("cpu"))
    assert len(hessians) == 6 * h.num_layers + 1 and info["batches_total"] == 2 and info["tokens_total"] == 256
    assert hessians["blocks.0.attn.c_k.weight"] is hessians["blocks.0.attn.c_q.weight"]
    captured = {"attn": [], "mlp": [], "hidden": []}
    hooks = [model.blocks[1].attn.register_forward_pre_hook(lambda m, args: captured["attn"].append(args[0])),
             model.blocks[1].mlp.register_forward_pre_hook(lambda m, args: captured["mlp"].append(args[0]))]
    replay = tg.CalibrationLoader(tg.train_shard_files(str(tmp_path)), 0, 1, 32, 4, h.vocab_size)
    assert not model.looping  # collect_hessians turned looping on for the calibration only
    model.set_looping(True)
    with torch.no_grad():
        for _ in range(2):
            ids, cu = replay.next_batch()
            captured["hidden"].append(model.forward_hidden(ids, cu, 32))
    for hook in hooks:
        hook.remove()
    assert len(captured["attn"]) == 2 * (h.num_loops + 1)  # layer 1 is looped: 3 visits per batch

    def gram(xs):
        x = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in xs])
        return x.T @ x / 2

    torch.testing.assert_close(hessians["blocks.1.attn.c_q.weight"], gram(captured["attn"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hessians["blocks.1.mlp.fc.weight"], gram(captured["mlp"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hessians["tok_emb.weight"], gram(captured["hidden"]), rtol=1e-4, atol=1e-5)


def test_calibration_opens_training_shards_only(tmp_path, monkeypatch):
    make_shards(tmp_path)
    opened = []
    real_read_shard = tg.read_shard
    monkeypatch.setattr(tg, "read_shard",
                        lambda path, *a, **k: opened.append(str(path)) or real_read_shard(path, *a, **k))
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)
    h = tiny_h(tmp_path, allow_oversize_artifact=True)
    result = tg.quantize_and_write_artifact(tiny_model(h), h, 0, 1, torch.device("cpu"), lambda message: None)
    assert opened and all("fineweb_train_" in p for p in opened), opened
    assert result["batches_total"] == h.gptq_calibration_batches


def test_calibration_stops_at_the_reserve(tmp_path):
    make_shards(tmp_path)
    h = tiny_h(tmp_path)
    loader = tg.CalibrationLoader(tg.train_shard_files(str(tmp_path)), 0, 1, 32, 4, h.vocab_size)
    _, info = tg.collect_hessians(tiny_model(h), loader, 5, torch.device("cpu"), deadline=0.0)
    assert info["batches_local"] == 1  # at least one batch, then the (past) deadline stops it


def test_reserve_is_measured_from_a_timed_batch_and_covers_the_calibration(tmp_path, monkeypatch):
    make_shards(tmp_path)
    h = tiny_h(tmp_path, gptq_calibration_batches=4, max_wallclock_seconds=60.0)
    model = tiny_model(h)
    calls = []
    real = tg.collect_hessians
    monkeypatch.setattr(tg, "collect_hessians", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    reserve, per_batch = tg.calibration_reserve_seconds(model, h, 0, 1, torch.device("cpu"))
    assert calls == [1, 1] and per_batch > 0  # an untimed first batch, then the timed one
    assert reserve == pytest.approx(per_batch * 4 * 1.25 + 1.0)
    _, info = real(model, tg.CalibrationLoader(tg.train_shard_files(str(tmp_path)), 0, 1, 32, 4, h.vocab_size), 4,
                   torch.device("cpu"))
    assert info["seconds"] < reserve  # the whole calibration fits what was reserved for it
    assert tg.budget_ms(tg.Hyperparameters(max_wallclock_seconds=600.0, gptq_reserve_seconds=-1.0)) == 600_000.0


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
