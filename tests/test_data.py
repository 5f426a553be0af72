"""Shard/sidecar readers, validation truncation, the packing loader and BPB (spec 01 §3-7)."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SHARED

GOLDEN = SHARED / "golden"


def write_shard(path: Path, values, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=None) -> Path:
    values = np.asarray(values, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(values) if count is None else count
    path.write_bytes(header.tobytes() + values.tobytes())
    return path


def test_shard_header_bytes_match_the_spec(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [1, 5, 7])
    raw = path.read_bytes()
    assert raw[:12] == bytes.fromhex("88d83401" "01000000" "03000000")
    assert len(raw) == 1024 + 2 * 3
    assert tg.read_shard(path).tolist() == [1, 5, 7]


@pytest.mark.parametrize("fault, message", [
    (dict(magic=12345), "magic 12345"),
    (dict(version=2), "version 2"),
    (dict(count=4), "truncated or corrupt"),
])
def test_bad_shard_headers_name_the_file(tmp_path, fault, message):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3], **fault)
    with pytest.raises(ValueError, match=message) as err:
        tg.read_shard(path)
    assert str(path) in str(err.value)


def test_truncated_and_tiny_files_are_rejected(tmp_path):
    path = write_shard(tmp_path / "s.bin", list(range(100)))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        tg.read_shard(path)
    (tmp_path / "tiny.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="shorter than"):
        tg.read_shard(tmp_path / "tiny.bin")


def test_token_ids_beyond_the_vocab_are_rejected(tmp_path):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", [1, 9, 600, 3])
    assert tg.read_shard(path, vocab_size=601).tolist() == [1, 9, 600, 3]
    with pytest.raises(ValueError, match="token id 600 at entry 2 >= vocab_size 512"):
        tg.read_shard(path, vocab_size=512)


def make_val_dir(tmp_path, tokens, sizes, split=None):
    split = split or [len(tokens)]
    start = 0
    for i, n in enumerate(split):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", tokens[start:start + n])
        write_shard(tmp_path / f"fineweb_val_bytes_{i:06d}.bin", sizes[start:start + n])
        start += n
    return tmp_path


def test_val_glob_excludes_sidecars_and_truncates_to_whole_windows(tmp_path):
    tokens = [1, 10, 11, 12, 1, 13, 14, 15, 16, 17, 1, 18, 19]  # 13 tokens, 12 targets
    sizes = [0, 3, 1, 2, 0, 1, 1, 4, 1, 1, 0, 2, 5]
    make_val_dir(tmp_path, tokens, sizes, split=[6, 7])
    token_files, sidecars = tg.val_shard_files(str(tmp_path))
    assert [Path(f).name for f in token_files] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert all("_bytes_" in Path(f).name for f in sidecars)
    val = tg.load_validation(str(tmp_path), seq_len=5, vocab_size=64)
    assert val.num_targets == 10  # floor(12 / 5) * 5
    assert val.tokens.tolist() == tokens[:11] and val.token_bytes.tolist() == sizes[:11]
    assert val.tokens.dtype == torch.int64


def test_sidecar_faults_are_caught(tmp_path):
    make_val_dir(tmp_path, [1, 10, 11, 12], [0, 1, 1, 1])
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 1, 1])
    with pytest.raises(ValueError, match="3 entries but .*fineweb_val_000000.bin has 4 tokens"):
        tg.load_validation(str(tmp_path), seq_len=1, vocab_size=64)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [2, 1, 1, 1])
    with pytest.raises(ValueError, match="non-zero at a BOS"):
        tg.load_validation(str(tmp_path), seq_len=1, vocab_size=64)
    (tmp_path / "fineweb_val_bytes_000000.bin").unlink()
    with pytest.raises(FileNotFoundError, match="0 byte sidecars"):
        tg.load_validation(str(tmp_path), seq_len=1, vocab_size=64)


def test_missing_shards_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        tg.train_shard_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no fineweb_val"):
        tg.val_shard_files(str(tmp_path))


def test_cu_seqlens_split_long_documents_and_pad_to_the_bucket():
    cu, longest = tg.build_cu_seqlens(np.array([3, 10]), total=40, max_len=8, bucket=8)
    assert cu.dtype == np.int32 and cu.size % 8 == 0
    assert cu.tolist() == [0, 3, 10, 18, 26, 34, 40, 40]
    assert longest == 8
    cu, _ = tg.build_cu_seqlens(np.array([0]), total=5, max_len=8, bucket=4)
    assert cu.tolist() == [0, 5, 5, 5]


def spec_rows(shards, world, n, steps):
    """Spec 01 §7's loader, restated: per step, rank r's row is shard[cursor + r*(n+1) : ... + n+1]."""
    index, shard = 0, shards[0]
    cursor = int(np.flatnonzero(shard == tg.BOS_ID)[0])
    for _ in range(steps):
        while cursor + world * (n + 1) > len(shard):
            index = (index + 1) % len(shards)
            shard = shards[index]
            cursor = int(np.flatnonzero(shard == tg.BOS_ID)[0])
        yield [shard[cursor + r * (n + 1):cursor + (r + 1) * (n + 1)] for r in range(world)]
        cursor += world * (n + 1)


def test_packing_loader_spans_ranks_and_switches_shards(tmp_path):
    rng = np.random.default_rng(0)
    shards = []
    for i, size in enumerate([300, 200]):
        body = rng.integers(2, 50, size=size)
        body[[3, 40, 77, 150, 151]] = tg.BOS_ID
        shards.append(body)  # tokens before the first BOS (index 3) are never trained on
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", body)
    files = tg.train_shard_files(str(tmp_path))
    n, world, steps = 32, 2, 9  # 66 tokens a step: both shards are used and the loader wraps around
    loaders = [tg.DocumentPackingLoader(files, r, world, n, max_seq_len=16, device=torch.device("cpu"))
               for r in range(world)]
    seen_files = set()
    for expected in spec_rows(shards, world, n, steps):
        for rank, loader in enumerate(loaders):
            x, y, cu = loader.next_batch()
            seen_files.add(loader.file_index)
            row = np.asarray(expected[rank], dtype=np.int64)
            assert x.shape == (1, n) and x.dtype == torch.int64
            assert x[0].tolist() == row[:-1].tolist() and y[0].tolist() == row[1:].tolist()
            assert cu[0] == 0 and cu[-1] == n and cu.numel() % 64 == 0 and cu.dtype == torch.int32
            assert int(torch.diff(cu).max()) <= 16
            assert set(np.flatnonzero(row[:-1] == tg.BOS_ID).tolist()) <= set(cu.tolist())
    assert seen_files == {0, 1}


def test_tokenizer_mismatch_is_caught(tmp_path):
    model = GOLDEN / "caseops_v1_reserved_sp8192.model"
    tg.check_tokenizer_matches(str(model), str(tmp_path), 8192)
    with pytest.raises(ValueError, match="8192 pieces but VOCAB_SIZE=1024"):
        tg.check_tokenizer_matches(str(model), str(tmp_path), 1024)
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another tokenizer"):
        tg.check_tokenizer_matches(str(model), str(tmp_path), 8192)
    sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer_sha256": sha256}))
    tg.check_tokenizer_matches(str(model), str(tmp_path), 8192)
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.check_tokenizer_matches(str(tmp_path / "nope.model"), str(tmp_path), 8192)


def test_bpb_counts_target_bytes_through_the_sidecar(tmp_path):
    rows = [json.loads(line) for line in open(GOLDEN / "caseops_v1.jsonl")]
    tokens = np.concatenate([r["token_ids"] for r in rows])
    sizes = np.concatenate([r["token_bytes"] for r in rows])
    make_val_dir(tmp_path, tokens, sizes)
    val = tg.load_validation(str(tmp_path), seq_len=1, vocab_size=8192)
    assert val.num_targets == len(tokens) - 1
    # Targets are positions 1..N: every golden byte except the first row's BOS (0 anyway) is counted once.
    byte_sum = float(val.token_bytes[1:].double().sum())
    assert byte_sum == sum(r["sum_token_bytes"] for r in rows)
    losses = torch.rand(val.num_targets, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bpb = tg.bits_per_byte(float(losses.sum()), byte_sum)
    assert bpb == pytest.approx(float(losses.sum()) / (math.log(2) * byte_sum), rel=1e-15)
    # A BOS target adds loss but no bytes.
    bos_targets = (val.tokens[1:] == tg.BOS_ID)
    assert bos_targets.any() and int(val.token_bytes[1:][bos_targets].sum()) == 0
    assert tg.bits_per_byte(float(losses.sum()) + 1.0, byte_sum) > bpb
    with pytest.raises(ValueError):
        tg.bits_per_byte(1.0, 0.0)
