"""The artifact: frame round trip (in and across processes), corruption errors, code-size accounting, the cap,
and the entropy coder against the order-0 entropy (shared/spec/03 §5-7)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_quant import make_shards, tiny_h, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def order0_bytes(codes: np.ndarray) -> float:
    counts = np.bincount(codes.ravel().astype(np.int64) + 128)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum() * codes.size / 8)


@pytest.fixture
def quantized(monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)
    h = tiny_h(".")
    model = tiny_model(h)
    flat = tg.unbank_state_dict(model.state_dict())
    hessians = {n: torch.eye(t.shape[1]) for n, t in flat.items() if t.numel() > 1024}
    return h, model, tg.quantize_weights(flat, hessians, h, torch.device("cpu"))


def test_encode_decode_round_trip_is_exact(quantized):
    _, model, qw = quantized
    blob, stats = tg.encode_artifact(qw)
    back = tg.decode_artifact(blob, "memory")
    assert back.bits == qw.bits and back.lqer.keys() == qw.lqer.keys()
    assert back.passthrough.keys() == qw.passthrough.keys()
    for name in qw.codes:
        assert torch.equal(back.codes[name], qw.codes[name]) and torch.equal(back.scales[name], qw.scales[name])
    for name, factors in qw.lqer.items():
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(back.lqer[name], factors))
    assert all(torch.equal(back.passthrough[n], t) for n, t in qw.passthrough.items())
    assert stats["q_raw"] == sum(c.numel() for c in qw.codes.values())
    template = tg.unbank_state_dict(model.state_dict())
    deq, deq_back = qw.dequantize(template), back.dequantize(template)
    assert all(torch.equal(deq[n], deq_back[n]) and deq[n].dtype == template[n].dtype for n in template)


def state_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().reshape(-1)
        digest.update(name.encode() + str(tensor.dtype).encode() + tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_dequantized_model_is_bit_identical_in_a_fresh_process(quantized, tmp_path):
    h, model, qw = quantized
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(tg.encode_artifact(qw)[0])
    template = model.state_dict()
    expected = state_digest(tg.rebank_state_dict(qw.dequantize(tg.unbank_state_dict(template)), template))
    script = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
              "import torch, train_gpt as tg\nfrom test_artifact import state_digest\nfrom test_quant import tiny_h\n"
              f"model = tg.load_quantized_model({str(path)!r}, tiny_h('.'), torch.device('cpu'))\n"
              "assert model.looping\nprint(state_digest(model.state_dict()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:7] + bytes([b[7] ^ 0xFF]) + b[8:], "artifact version"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:-100] + bytes([b[-100] ^ 0x01]) + b[-99:], "crc32"),
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b + b"\0", "trailing bytes"),
    (lambda b: b[:10], "shorter than"),
])
def test_damaged_artifact_raises_naming_the_file(quantized, damage, message):
    blob = tg.encode_artifact(quantized[2])[0]
    with pytest.raises(ValueError, match=message) as error:
        tg.decode_artifact(damage(blob), "runs/final_model.int6.ptz")
    assert "runs/final_model.int6.ptz" in str(error.value)


def test_flipped_byte_in_the_file_fails_load(quantized, tmp_path):
    h, _, qw = quantized
    path = tmp_path / "model.ptz"
    blob = bytearray(tg.encode_artifact(qw)[0])
    blob[len(blob) // 3] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"{path}.*crc32"):
        tg.load_quantized_model(path, h, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="QUANTIZED_MODEL_PATH"):
        tg.load_quantized_model(tmp_path / "missing.ptz", h, torch.device("cpu"))


def run_write_artifact(h, code_dir, log_lines):
    model = tiny_model(h)
    flat = tg.unbank_state_dict(model.state_dict())
    hessians = {n: torch.eye(t.shape[1]) for n, t in flat.items() if t.numel() > tg.PASSTHROUGH_MAX_NUMEL}
    return tg.write_artifact(model, hessians, h, torch.device("cpu"), log_lines.append, code_dir)


def test_size_accounting_counts_every_eval_code_file_as_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)
    for name, size in (("a.py", 1234), ("b.c", 777), ("c.py", 5000)):
        (tmp_path / name).write_bytes(b"x" * size)
    h = tiny_h(tmp_path)
    monkeypatch.setattr(tg, "EVAL_CODE_FILES", ("a.py", "b.c"))
    lines = []
    first = run_write_artifact(h, tmp_path, lines)
    shipped = tmp_path / "submission"
    assert sorted(f.name for f in shipped.iterdir()) == ["a.py", "b.c"]
    assert (shipped / "b.c").read_bytes() == b"x" * 777  # C ships raw, Python as a stub
    assert (shipped / "a.py").read_bytes().startswith(tg.SHIPPED_STUB_PREFIX)
    code_bytes = (shipped / "a.py").stat().st_size + 777
    assert first["bytes_code"] == code_bytes and first["bytes_total"] == first["bytes_model"] + code_bytes
    assert first["bytes_model"] == (tmp_path / "final_model.int6.ptz").stat().st_size
    assert f"Total submission size quantized+pergroup: {first['bytes_total']} bytes" in lines
    a_bytes = code_bytes - 777
    assert f"Code size: {code_bytes} bytes (shipped, compressed: a.py:{a_bytes} b.c:777)" in lines
    monkeypatch.setattr(tg, "EVAL_CODE_FILES", ("a.py", "b.c", "c.py"))
    second = run_write_artifact(h, tmp_path, [])
    grown = second["bytes_total"] - first["bytes_total"]
    assert grown == (shipped / "c.py").stat().st_size and 0 < grown < 5000
    assert second["bytes_model"] == first["bytes_model"]
    monkeypatch.setattr(tg, "EVAL_CODE_FILES", ("a.py", "gone.py"))
    with pytest.raises(FileNotFoundError, match="gone.py"):
        run_write_artifact(h, tmp_path, [])


def test_eval_code_files_exist_in_the_repository(tmp_path):
    sizes = tg.write_shipped_code(ROOT, tmp_path)
    assert set(sizes) == set(tg.EVAL_CODE_FILES) and "train_gpt.py" in sizes
    assert sizes["train_gpt.py"] == (tmp_path / "train_gpt.py").stat().st_size


def test_over_the_cap_raises_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)
    monkeypatch.setattr(tg, "MAX_SUBMISSION_BYTES", 50_000)
    monkeypatch.setattr(tg, "EVAL_CODE_FILES", ("a.py",))
    (tmp_path / "a.py").write_bytes(b"x" * 100)
    h = tiny_h(tmp_path)
    with pytest.raises(ValueError, match="exceeds the 50000-byte cap.*ALLOW_OVERSIZE_ARTIFACT"):
        run_write_artifact(h, tmp_path, [])
    assert not Path(h.quantized_model_path).exists()
    lines = []
    run_write_artifact(tiny_h(tmp_path, allow_oversize_artifact=True), tmp_path, lines)
    assert Path(h.quantized_model_path).exists() and any(line.startswith("WARNING artifact:") for line in lines)


def test_entropy_coder_reaches_the_order0_entropy_and_gains_on_row_and_column_structure():
    rng = np.random.default_rng(0)
    iid = rng.standard_normal((1024, 512))
    columns = iid * np.exp(rng.normal(0.0, 0.4, 512))
    sign_like = rng.choice([-1.0, 1.0], size=(1024, 512)) + 0.2 * iid  # rows after one sign-like update
    rows = np.where(np.arange(1024)[:, None] < 256, sign_like, iid)  # two row shapes
    shifted = iid + 1.5 * rng.choice([-1.0, 1.0], size=512)  # a direction common to all rows (anisotropy)
    for weight, tolerance in ((iid, 1.003), (columns, 0.98), (rows, 0.95), (shifted, 0.95)):
        codes = np.clip(np.rint(weight / (12.0 * weight.std(axis=1, keepdims=True) / 31)), -31, 31).astype(np.int8)
        model = tg.fit_code_model(codes)
        words = tg.ans_encode(codes, model)
        assert np.array_equal(tg.ans_decode(words, codes.shape, model, "test"), codes)
        assert words.nbytes < tolerance * order0_bytes(codes), (words.nbytes, order0_bytes(codes), model.freqs.shape)
    zeros = np.zeros((64, 32), dtype=np.int8)  # one symbol (e.g. a zero-initialised output projection)
    model = tg.fit_code_model(zeros)
    assert np.array_equal(tg.ans_decode(tg.ans_encode(zeros, model), zeros.shape, model, "z"), zeros)


def test_evaluate_artifact_scores_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX_NUMEL", 1024)
    make_shards(tmp_path, tokens=4096)
    h = tiny_h(tmp_path, eval_seq_len=64, val_batch_tokens=8 * 256, allow_oversize_artifact=True)
    tg.quantize_and_write_artifact(tiny_model(h), h, 0, 1, torch.device("cpu"), lambda message: None)
    val = tg.load_validation(h.data_path, h.eval_seq_len, h.vocab_size)
    lines = []
    loss, bpb, _ = tg.evaluate_artifact(h, val, 0, 1, torch.device("cpu"), lines.append)
    expected = tg.evaluate_bpb(tg.load_quantized_model(h.quantized_model_path, h, torch.device("cpu")), val, h)
    assert (loss, bpb) == expected and 0 < loss < 10
    assert any(line.startswith(f"diagnostic quantized val_loss:{loss:.8f} val_bpb:{bpb:.8f}") for line in lines)
    tg.write_submission_json(tmp_path / "submission.json", torch.device("cpu"), 1, val_bpb=bpb, seed=h.seed)
    assert '"hardware": "1x CPU"' in (tmp_path / "submission.json").read_text()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
