"""Parameter-golf record stack (PR #2135 lineage) in one file: data, model, training, quantization, artifact, eval.

Launch (the defaults are the record's configuration):
    torchrun --standalone --nproc_per_node=8 train_gpt.py
One process on one GPU or on CPU:
    python train_gpt.py
Every hyperparameter is an environment variable named after its `Hyperparameters` field in upper case.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# === config ===


@dataclasses.dataclass
class Hyperparameters:
    # data
    data_path: str = "./data/datasets/fineweb10B_sp8192_caseops"  # folder with fineweb_{train,val,val_bytes}_*.bin
    tokenizer_path: str = "./tokenizer.model"  # SentencePiece model the shards were written with
    vocab_size: int = 8192
    eval_seq_len: int = 2560  # validation segment length; also fixes the val-stream truncation
    seed: int = 1337
    # model (fields added by the model section's author)
    # training
    # quantization and artifact
    # evaluation

    @classmethod
    def from_env(cls, environ=None) -> "Hyperparameters":
        """Build from defaults, overriding each field from its upper-case env name; junk raises."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.name.upper())
            if raw is not None:
                values[f.name] = _parse_env_value(f.name.upper(), raw, f.type)
        return cls(**values)

    def overridden(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def _parse_env_value(name: str, raw: str, type_name) -> object:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if type_name == "bool":
            if raw not in ("0", "1"):
                raise ValueError("expected 0 or 1")
            return raw == "1"
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "str":
            return raw
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r}: {e}") from None
    raise TypeError(f"environment variable {name}: unsupported field type {type_name}")


def log_hyperparameters(h: Hyperparameters, log) -> None:
    changed = h.overridden()
    log("Hyperparameters:")
    for f in sorted(dataclasses.fields(h), key=lambda f: f.name):
        log(f"  {f.name}: {getattr(h, f.name)}{'  (env)' if f.name in changed else ''}")


# === data ===
# Shards (spec 01 §3.1): int32 LE header[256] = (magic, version, N, 0...), then N uint16 LE entries. The same
# format holds token shards and the validation byte sidecar (original UTF-8 bytes per token, spec 01 §4).

BOS_ID = 1
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """The uint16 payload of one shard, after checking magic, version and the exact file size."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_BYTES // 4)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: magic {header[0]} != {SHARD_MAGIC}: not a shard file")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {header[1]} != {SHARD_VERSION}")
    count = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: header says {count} entries ({SHARD_HEADER_BYTES + 2 * count} bytes), "
                         f"file has {size} bytes (truncated or corrupt)")
    payload = np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_BYTES)
    if vocab_size is not None and count and int(payload.max()) >= vocab_size:
        bad = int(np.argmax(payload >= vocab_size))
        raise ValueError(f"{path}: token id {int(payload[bad])} at entry {bad} >= vocab_size {vocab_size} "
                         f"(tokenizer/data mismatch?)")
    return payload


def train_shard_files(data_path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_path, "fineweb_train_*.bin")))
    if not files:
        raise FileNotFoundError(f"{data_path}: no fineweb_train_*.bin shards")
    return files


def val_shard_files(data_path: str) -> tuple[list[str], list[str]]:
    """(token shards, byte sidecars), sorted; the token glob also matches the sidecars, which are excluded."""
    tokens = sorted(f for f in glob.glob(os.path.join(data_path, "fineweb_val_*.bin"))
                    if "_bytes_" not in os.path.basename(f))
    sidecars = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")))
    if not tokens:
        raise FileNotFoundError(f"{data_path}: no fineweb_val_*.bin shards")
    if len(sidecars) != len(tokens):
        raise FileNotFoundError(f"{data_path}: {len(tokens)} val token shards but {len(sidecars)} byte sidecars "
                                f"(fineweb_val_bytes_*.bin); BPB needs one sidecar per shard")
    return tokens, sidecars


@dataclasses.dataclass
class ValidationData:
    tokens: torch.Tensor  # int64 [N+1]: the val stream, truncated (spec 01 §5)
    token_bytes: torch.Tensor  # int32 [N+1]: original UTF-8 bytes of each token; the target at p counts [p]

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1


def load_validation(data_path: str, seq_len: int, vocab_size: int) -> ValidationData:
    token_files, sidecar_files = val_shard_files(data_path)
    tokens, sizes = [], []
    for token_file, sidecar_file in zip(token_files, sidecar_files):
        shard, sidecar = read_shard(token_file, vocab_size), read_shard(sidecar_file)
        if len(shard) != len(sidecar):
            raise ValueError(f"{sidecar_file}: {len(sidecar)} entries but {token_file} has {len(shard)} tokens")
        tokens.append(shard)
        sizes.append(sidecar)
    stream, stream_bytes = np.concatenate(tokens), np.concatenate(sizes)
    if stream.size < 2:
        raise ValueError(f"{data_path}: validation stream has {stream.size} tokens, need at least 2")
    if stream[0] != BOS_ID:
        raise ValueError(f"{token_files[0]}: validation stream starts with {stream[0]}, expected BOS {BOS_ID}")
    if np.any(stream_bytes[stream == BOS_ID] != 0):
        raise ValueError(f"{data_path}: byte sidecar is non-zero at a BOS position (sidecar misaligned?)")
    # Keep whole seq_len windows of targets plus the first token (the record's truncation: 47,851,520 targets).
    keep = (stream.size - 1) // seq_len * seq_len + 1
    if keep < 2:
        raise ValueError(f"{data_path}: {stream.size} val tokens, fewer than one {seq_len}-token window")
    return ValidationData(torch.from_numpy(stream[:keep].astype(np.int64)),
                          torch.from_numpy(stream_bytes[:keep].astype(np.int32)))


def build_cu_seqlens(starts: np.ndarray, total: int, max_len: int, bucket: int = 64) -> tuple[np.ndarray, int]:
    """Segment boundaries of one packed row: documents start at `starts`, long ones split every max_len,
    right-padded with `total` (empty segments) to a multiple of `bucket` so compiled shapes stay few."""
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], total)
    bounds = [np.arange(s, e, max_len) for s, e in zip(starts.tolist(), ends.tolist())]
    cu = np.append(np.concatenate(bounds), total).astype(np.int32)
    longest = int(np.diff(cu).max())
    padded = -(-cu.size // bucket) * bucket
    return np.pad(cu, (0, padded - cu.size), constant_values=total), longest


class DocumentPackingLoader:
    """Training rows of `tokens_per_rank` tokens (spec 01 §7): every rank reads its own contiguous span of the
    same shard, shards in sorted order, wrapping around; a new shard starts at its first BOS."""

    def __init__(self, files: list[str], rank: int, world_size: int, tokens_per_rank: int, max_seq_len: int,
                 device: torch.device, vocab_size: int | None = None):
        self.files, self.rank, self.world_size = list(files), rank, world_size
        self.tokens_per_rank, self.max_seq_len, self.device = tokens_per_rank, max_seq_len, device
        self.vocab_size = vocab_size
        self.file_index = -1
        self._open_next_shard()

    def _open_next_shard(self) -> None:
        span = (self.tokens_per_rank + 1) * self.world_size
        for _ in range(len(self.files)):
            self.file_index = (self.file_index + 1) % len(self.files)
            self.shard = read_shard(self.files[self.file_index], self.vocab_size)
            bos = np.flatnonzero(self.shard == BOS_ID)
            if bos.size and bos[0] + span <= self.shard.size:
                self.cursor = int(bos[0])
                return
        raise ValueError(f"no training shard holds a BOS followed by {span} tokens (one step over all ranks); "
                         f"shards: {self.files[0]} ...")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        span = self.tokens_per_rank + 1
        if self.cursor + span * self.world_size > self.shard.size:
            self._open_next_shard()
        start = self.cursor + self.rank * span
        row = torch.from_numpy(self.shard[start:start + span].astype(np.int64))
        self.cursor += span * self.world_size
        starts = np.flatnonzero(self.shard[start:start + self.tokens_per_rank] == BOS_ID)
        cu, _ = build_cu_seqlens(starts, self.tokens_per_rank, self.max_seq_len)
        to = dict(device=self.device, non_blocking=True)
        return (row[:-1].unsqueeze(0).to(**to), row[1:].unsqueeze(0).to(**to),
                torch.from_numpy(cu).to(**to))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_tokenizer_matches(tokenizer_path: str, data_path: str, vocab_size: int) -> None:
    """The tokenizer must be the one the shards were written with: vocab size, and the manifest's sha256."""
    import sentencepiece as spm

    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{tokenizer_path}: tokenizer not found (TOKENIZER_PATH)")
    pieces = spm.SentencePieceProcessor(model_file=tokenizer_path).get_piece_size()
    if pieces != vocab_size:
        raise ValueError(f"{tokenizer_path}: {pieces} pieces but VOCAB_SIZE={vocab_size}")
    manifest_path = os.path.join(data_path, "manifest.json")
    if os.path.isfile(manifest_path):
        expected = json.loads(Path(manifest_path).read_text()).get("tokenizer_sha256")
        found = file_sha256(tokenizer_path)
        if expected and expected != found:
            raise ValueError(f"{tokenizer_path}: sha256 {found[:16]}... differs from {manifest_path}'s "
                             f"tokenizer_sha256 {expected[:16]}...: the shards were written with another tokenizer")


def bits_per_byte(loss_sum: float, byte_sum: float) -> float:
    """BPB over scored targets: summed NLL in nats over summed original UTF-8 bytes (spec 01 §6)."""
    if byte_sum <= 0:
        raise ValueError(f"bits_per_byte: byte_sum {byte_sum} must be positive")
    return float(loss_sum) / (math.log(2.0) * float(byte_sum))


# === model ===

# === optimizer ===

# === training ===

# === quantization ===

# === artifact ===

# === evaluation ===

# === main ===
