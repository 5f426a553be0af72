"""prepare_caseops_data.py: golden tokens and byte sidecar through the CLI, shard format, split, sharding,
determinism, compressed input, input errors, tokenizer layout checks and training."""
import gzip
import json
import lzma
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import lossless_caps as lc  # noqa: E402
import prepare_caseops_data as prep  # noqa: E402

SHARED = REPO.parent / "shared"
GOLDEN_MODEL = SHARED / "golden" / "caseops_v1_reserved_sp8192.model"
ROWS = [json.loads(line) for line in (SHARED / "golden" / "caseops_v1.jsonl").read_text().splitlines()]
ENGLISH = SHARED / "data" / "english_mix_v1.jsonl.xz"


def run_cli(*args, check=True):
    result = subprocess.run([sys.executable, str(REPO / "prepare_caseops_data.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def read_shard(path: Path) -> np.ndarray:
    blob = path.read_bytes()
    n = int(np.frombuffer(blob[:1024], "<i4")[2])
    assert len(blob) == 1024 + 2 * n
    return np.frombuffer(blob[1024:], "<u2")


def stream(out: Path, prefix: str) -> np.ndarray:
    files = sorted(out.glob(f"{prefix}_[0-9]*.bin"))
    return np.concatenate([read_shard(f) for f in files]) if files else np.zeros(0, np.uint16)


def write_docs(path: Path, texts, blank_every=0):
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"text": text, "id": i}) + "\n")
        if blank_every and i % blank_every == 0:
            lines.append("\n   \n")
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(lines))
    return path


def split_docs(tokens: np.ndarray, counts: np.ndarray):
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    return [(tokens[a:b].tolist(), counts[a:b].tolist() if counts is not None else None)
            for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    docs = write_docs(tmp / "docs.jsonl", [r["text"] for r in ROWS], blank_every=7)
    run_cli("--docs", docs, "--out", tmp / "out", "--val-docs", len(ROWS), "--tokenizer", GOLDEN_MODEL)
    return tmp


def test_golden_tokens_and_sidecar(golden_run):
    out = golden_run / "out"
    got = split_docs(stream(out, "fineweb_val"), stream(out, "fineweb_val_bytes"))
    assert len(got) == len(ROWS)
    for row, (ids, counts) in zip(ROWS, got):
        assert ids == row["token_ids"], row["id"]
        assert counts == row["token_bytes"], row["id"]
    assert not list(out.glob("fineweb_train_*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val"]["docs"] == len(ROWS) and manifest["train"]["docs"] == 0
    assert manifest["val"]["original_bytes"] == sum(r["sum_token_bytes"] for r in ROWS)
    assert manifest["tokenizer_sha256"] == "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"


def test_shard_header_and_size(golden_run):
    n = sum(len(r["token_ids"]) for r in ROWS)
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        blob = (golden_run / "out" / name).read_bytes()
        assert blob[:8] == bytes.fromhex("88d8340101000000")
        assert blob[8:12] == n.to_bytes(4, "little")
        assert blob[12:1024] == bytes(1012)
        assert len(blob) == 1024 + 2 * n


@pytest.fixture(scope="module")
def golden_sp():
    return prep.load_tokenizer(GOLDEN_MODEL)


def test_spans_equal_sentencepiece_proto(golden_sp):
    # the fast span computation must give the proto's begin/end exactly (golden rows + real English)
    sp = golden_sp
    piece_bytes = prep.normalized_piece_bytes(sp)
    english = [json.loads(line)["text"] for _, line in islice(prep.iter_doc_lines(ENGLISH), 300)]
    extra = [" \n\t ", "x" + " " * 70 + "y", lc.ESC * 3 + "A\u0300 ǅ ½ Ⅻ", "\ue004\ue001\ue000 \x00\x07 K"]
    for text in [r["text"] for r in ROWS] + english + extra:
        encoded = lc.encode(text)
        proto = sp.encode(encoded, out_type="proto").pieces
        ids, begin, end = prep.piece_spans(sp, piece_bytes, encoded.encode())
        assert ids.tolist() == [p.id for p in proto]
        assert begin.tolist() == [p.begin for p in proto] and end.tolist() == [p.end for p in proto]


def walk_surfaces(surfaces):
    """Spec 01 section 4 literally: the case decoder's state over piece surfaces, counting original bytes."""
    counts, escape = [], False
    for surface in surfaces:
        n = 0
        for ch in surface:
            if escape:
                n, escape = n + len(ch.encode()), False
            elif ch == lc.ESC:
                escape = True
            elif ch not in (lc.TITLE, lc.ALLCAPS, lc.CAPNEXT):
                n += len(ch.encode())
        counts.append(n)
    return counts


@pytest.mark.parametrize("text", [r["text"] for r in ROWS] + [
    "\ue004\ue004 \ue001\ue001\ue003 ESC\ue004", "Ab\ue004\ue002CD \ue002\ue003x", "ＡＢＣ ﬁ Ⅻ é😀 👍🏽"])
def test_sidecar_equals_state_machine_walk(golden_sp, text):
    sp = golden_sp
    encoded = lc.encode(text)
    ids, counts = prep.document_tokens(sp, prep.normalized_piece_bytes(sp), text, with_bytes=True)
    surfaces = [p.surface for p in sp.encode(encoded, out_type="proto").pieces]
    assert counts.tolist() == [0] + walk_surfaces(surfaces)
    assert ids[0] == 1 and counts[0] == 0


def test_token_over_uint16_raises(golden_sp):
    sp = golden_sp
    with pytest.raises(ValueError, match="70000 original bytes"):
        prep.document_tokens(sp, prep.normalized_piece_bytes(sp), "a" + " " * 69999 + "b", with_bytes=True)


@pytest.fixture(scope="module")
def english_docs(tmp_path_factory):
    """600 real documents (3 worker chunks) as plain, .gz and .xz JSONL."""
    tmp = tmp_path_factory.mktemp("english")
    texts = [json.loads(line)["text"] for _, line in islice(prep.iter_doc_lines(ENGLISH), 600)]
    return texts, {s: write_docs(tmp / f"docs.jsonl{s}", texts, blank_every=50) for s in ("", ".gz", ".xz")}


def test_split_sharding_determinism_and_compression(english_docs, golden_sp, tmp_path):
    texts, paths = english_docs
    common = ("--val-docs", 300, "--tokenizer", GOLDEN_MODEL)
    run_cli("--docs", paths[""], "--out", tmp_path / "whole", *common, "--workers", 1)
    for suffix, out in ((".gz", "sharded_a"), (".xz", "sharded_b")):
        run_cli("--docs", paths[suffix], "--out", tmp_path / out, *common, "--shard-tokens", 5000, "--workers", 2)
    whole, a, b = (tmp_path / d for d in ("whole", "sharded_a", "sharded_b"))
    for prefix in ("fineweb_train", "fineweb_val", "fineweb_val_bytes"):
        assert np.array_equal(stream(whole, prefix), stream(a, prefix))
        sizes = [len(read_shard(f)) for f in sorted(a.glob(f"{prefix}_[0-9]*.bin"))]
        assert len(sizes) > 1 and set(sizes[:-1]) == {5000} and 0 < sizes[-1] <= 5000
    # gz and xz inputs (and the manifest apart from the input name) give byte-identical output
    for f in sorted(a.iterdir()):
        if f.name != "manifest.json":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest == json.loads((b / "manifest.json").read_text().replace("jsonl.xz", "jsonl.gz"))
    # split by document index: first 300 docs validation, the remaining 300 training
    val = split_docs(stream(whole, "fineweb_val"), None)
    train = split_docs(stream(whole, "fineweb_train"), None)
    assert len(val) == 300 and len(train) == 300
    for text, (ids, _) in [(texts[5], val[5]), (texts[299], val[299]), (texts[300], train[0]), (texts[-1], train[-1])]:
        assert ids == [1] + golden_sp.encode(lc.encode(text))
    assert manifest["val"]["docs"] == 300 and manifest["train"]["docs"] == 300
    assert manifest["train"]["tokens"] == sum(s["tokens"] for s in manifest["train"]["shards"])


def test_two_runs_identical(english_docs, tmp_path):
    _, paths = english_docs
    for out in ("one", "two"):
        run_cli("--docs", paths[".xz"], "--out", tmp_path / out, "--val-docs", 200, "--tokenizer", GOLDEN_MODEL)
    files = sorted(f.name for f in (tmp_path / "one").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "two").iterdir()) and "manifest.json" in files
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "fine"', r"bad\.jsonl:3: invalid JSON"),
    ('{"txt": "no text field"}', r"bad\.jsonl:3: expected an object with a string field 'text'"),
    ('["text"]', r"bad\.jsonl:3: expected an object"),
])
def test_bad_input_names_file_and_line(tmp_path, bad_line, message):
    docs = tmp_path / "bad.jsonl"
    docs.write_text('{"text": "One"}\n\n' + bad_line + "\n" + '{"text": "Two"}\n')
    result = run_cli("--docs", docs, "--out", tmp_path / "out", "--tokenizer", GOLDEN_MODEL, check=False)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr


def test_tokenizer_layout_is_checked(tmp_path):
    proto = sentencepiece_model_pb2.ModelProto.FromString(GOLDEN_MODEL.read_bytes())
    proto.pieces[5].piece = "\ue000"
    bad = tmp_path / "bad.model"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"bad\.model: piece id 5 is '\\ue000' .*expected '\\ue002'"):
        prep.load_tokenizer(bad)
    result = run_cli("--docs", tmp_path / "none.jsonl", "--out", tmp_path / "out", "--tokenizer", bad, check=False)
    assert result.returncode != 0 and "piece id 5" in result.stderr


def test_training_sentences_split_at_lines():
    text = "\n".join(f"line {i} " + "w" * (i * 37 % 300) for i in range(200))
    sentences = list(prep.training_sentences(text))
    assert len(sentences) > 1 and "\n".join(sentences) == text
    assert max(len(s.encode()) for s in sentences) <= prep.MAX_SENTENCE_BYTES


def test_train_tokenizer_canonical_layout(english_docs, tmp_path):
    _, paths = english_docs
    out = tmp_path / "out"
    for run in (out, tmp_path / "again"):
        run_cli("--docs", paths[".xz"], "--out", run, "--val-docs", 100, "--train-tokenizer", "--vocab-size", 512,
                "--tokenizer-train-docs", 400)
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "again" / "tokenizer.model").read_bytes()
    proto = sentencepiece_model_pb2.ModelProto.FromString((out / "tokenizer.model").read_bytes())
    pieces = [p.piece for p in proto.pieces]
    assert len(pieces) == 512
    assert pieces[:8] == ["<pad>", "<s>", "</s>", "<unk>", lc.TITLE, lc.ALLCAPS, lc.CAPNEXT, lc.ESC]
    assert pieces[8:264] == [f"<0x{b:02X}>" for b in range(256)]
    assert not any(c.isascii() and c.isupper() for p in pieces[264:] for c in p)
    norm = proto.normalizer_spec
    assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == ("nmt_nfkc", False, True)
    assert proto.trainer_spec.split_digits and proto.trainer_spec.byte_fallback
    prep.load_tokenizer(out / "tokenizer.model")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val"]["docs"] == 100 and manifest["train"]["docs"] == 500
    tokens = stream(out, "fineweb_val")
    assert tokens.max() < 512 and np.count_nonzero(tokens == 1) == 100


def test_download_selects_canonical_files(monkeypatch, tmp_path):
    """--download cannot reach the network here: check which files it asks a stand-in huggingface_hub for."""
    root = "datasets/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    listing = ([f"{root}/fineweb_train_{i:06d}.bin" for i in (2, 0, 1)] + [f"{root}/fineweb_val_000000.bin",
               f"{root}/fineweb_val_bytes_000000.bin", "datasets/manifest.json", "README.md",
               "datasets/datasets/fineweb10B_sp10240_lossless_caps_caseops_v1_reserved/fineweb_val_000000.bin",
               "datasets/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"])
    fetched = []
    hub = type(sys)("huggingface_hub")
    hub.HfApi = lambda: type("Api", (), {"list_repo_files": lambda self, repo, repo_type: listing})()
    hub.hf_hub_download = lambda repo, name, repo_type, local_dir: fetched.append((repo, name)) or name
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    prep.download(prep.parse_args(["--download", "--out", str(tmp_path), "--train-shards", "2"]))
    assert {name for _, name in fetched} == {f"{root}/fineweb_val_000000.bin", f"{root}/fineweb_val_bytes_000000.bin",
                                            f"{root}/fineweb_train_000000.bin", f"{root}/fineweb_train_000001.bin",
                                            "datasets/manifest.json", listing[-1]}
    assert {repo for repo, _ in fetched} == {prep.CANONICAL_REPO_ID}
