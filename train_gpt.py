"""Parameter-golf record stack (PR #2135 lineage) in one file: data, model, training, quantization, artifact, eval.

Launch (the defaults are the record's configuration):
    torchrun --standalone --nproc_per_node=8 train_gpt.py
One process on one GPU or on CPU:
    python train_gpt.py
Every hyperparameter is an environment variable named after its `Hyperparameters` field in upper case.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import copy
import dataclasses
import functools
import gc
import glob
import itertools
import hashlib
import inspect
import json
import lzma
import math
import os
import random
import re
import struct
import subprocess
import sys
import time
import typing
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import online_ngram_tilt as ngram

try:  # ships with CUDA builds of torch; without it the fused MLP runs its plain-op form
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# === config ===


def _field_defaults_from_env(cls):
    """Fields not passed as kwargs take their env var when set: bare `Hyperparameters()` is the env's config."""
    dataclass_init = cls.__init__
    cls.__init__ = lambda self, **kwargs: dataclass_init(self, **_env_values(cls, os.environ, kwargs), **kwargs)
    return cls


@_field_defaults_from_env
@dataclasses.dataclass
class Hyperparameters:
    # data
    data_path: str = "./data/datasets/fineweb10B_sp8192_caseops"  # folder with fineweb_{train,val,val_bytes}_*.bin
    tokenizer_path: str = "./tokenizer.model"  # SentencePiece model the shards were written with
    vocab_size: int = 8192
    eval_seq_len: int = 2560  # validation segment length; also fixes the val-stream truncation
    seed: int = 1337
    # model
    num_layers: int = 11  # physical transformer blocks
    model_dim: int = 512
    num_heads: int = 8  # query heads; head dim = model_dim // num_heads
    num_kv_heads: int = 4  # GQA: query head h reads KV head h // (num_heads // num_kv_heads)
    mlp_mult: float = 4.0  # MLP hidden = int(mlp_mult * model_dim)
    train_seq_len: int = 2048  # longest training segment (docs are cut every train_seq_len tokens)
    tied_embed_init_std: float = 0.005  # Normal(0, std) init of the tied embedding / output head
    logit_softcap: float = 30.0  # training loss softcap; also the init of softcap_pos / softcap_neg
    rope_base: float = 10000.0
    rope_dims: int = 16  # leading dims of each head that RoPE rotates (partial RoPE)
    ln_scale: bool = True  # scale each block's normed inputs by 1/sqrt(layer + 1)
    qk_gain_init: float = 5.0  # init of the per-head query gain (the learned attention temperature)
    xsa_last_n: int = 11  # exclusive self-attention on the last n layers (11 = all)
    num_loops: int = 2  # extra passes through layers loop_start..loop_end once looping is on
    loop_start: int = 3
    loop_end: int = 5  # inclusive
    parallel_start_layer: int = 8  # decoder layers >= this run as two-lane parallel-residual blocks
    gate_window: int = 12  # leading channels read by SmearGate and SparseAttnGate
    sparse_attn_gate_scale: float = 0.5  # multiplier inside the per-head attention-output sigmoid gate
    smear_gate_bos_fix: bool = False  # 1: a BOS stops absorbing the previous doc's last token; 0 as PR #2135 (Q1)
    attn_backend: str = "auto"  # auto|fa3|fa4|varlen|flex|sdpa; auto on CUDA: fa3, fa4 if importable, else varlen
    # training
    iterations: int = 20000  # optimizer-step bound (the wallclock stops the record near step 5,000)
    max_wallclock_seconds: float = 600.0  # training budget; 0 => no cap, the LR schedule runs on step/iterations
    gptq_reserve_seconds: float = -1.0  # training time left to GPTQ calibration (spec 03 Q1); < 0: measured first
    warmup_steps: int = 20  # compile warm-up optimizer steps per mode (unlooped, looped); all reverted. No LR warm-up
    train_batch_tokens: int = 786_432  # tokens per optimizer step = 8 micro-batches of 98,304 on any GPU count
    train_log_every: int = 500  # step-line period (plus steps 1..5)
    val_loss_every: int = 4000  # in-training val at each multiple of this step (0 too) and at the end; 0: end only
    val_batch_tokens: int = 524_288  # val tokens per forward = val_batch_tokens / 8 (25 rows of 2560)
    enable_looping_at: float = 0.35  # training fraction at which depth recurrence switches on
    matrix_lr: float = 0.028  # Muon LR of the four weight banks
    tied_embed_lr: float = 0.03  # AdamW LR of the tied token embedding
    scalar_lr: float = 0.02  # AdamW LR of the small control tensors
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92  # Muon momentum at step 0, ramped linearly to muon_momentum
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5  # Polar Express iterations
    muon_row_normalize: bool = True  # scale each row of the momentum update to unit norm before Newton-Schulz
    muon_wd: float = 0.095  # decoupled weight decay of the banks (factor 1 - lr * wd per step)
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-08
    adam_wd: float = 0.02  # AdamW weight decay of the control tensors
    embed_wd: float = 0.085  # AdamW weight decay of the token embedding
    warmdown_frac: float = 0.85  # LR decays linearly over this last fraction of the budget
    min_lr: float = 0.1  # floor of the LR multiplier
    grad_clip_norm: float = 0.3  # global-norm clip of each micro-batch's gradient; 0 = off
    ema_decay: float = 0.9965  # weight EMA, loaded once after training
    train_cuda_graphs: bool = True  # CUDA: replay each training micro-step (fwd, bwd, clip, sum) from a CUDA graph
    run_id: str = ""  # log file logs/<run_id>.txt; empty => a timestamp and the seed
    # quantization and artifact
    gptq_calibration_batches: int = 32  # Hessian batches per rank (48 x 2048 train tokens each), summed over ranks
    matrix_bits: int = 6  # GPTQ bits of the 66 block matrices
    embed_bits: int = 7  # GPTQ bits of the tied embedding
    attn_clip_sigmas: float = 13.0  # row step = clip * std(row) / qmax for c_q, c_k, c_v, attn.proj
    mlp_clip_sigmas: float = 11.5  # the same for mlp.fc, mlp.proj
    embed_clip_sigmas: float = 14.0  # the same for tok_emb
    lqer_enabled: bool = True  # low-rank correction of the lqer_top_k largest quantization errors
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_asym_group: int = 32  # values of the int4 factor B per fp16 scale
    quantized_model_path: str = "final_model.int6.ptz"  # the artifact written after training, read by the evals
    eval_only: bool = False  # no training: evaluate the artifact at quantized_model_path in this process
    allow_oversize_artifact: bool = False  # development runs: a total over 16,000,000 bytes warns instead of raising
    # evaluation
    ttt_enabled: bool = True  # run the scored eval (phased TTT + tilt) after the diagnostic ones
    ttt_eval_seq_len: int = 2560  # longest TTT window (context + chunk) of a document row
    ttt_chunk_size: int = 48  # targets scored, then trained on, per TTT step
    ttt_batch_size: int = 64  # documents per TTT batch, one LoRA each
    ttt_lora_rank: int = 80
    ttt_lora_alpha: float = 144.0  # LoRA output scale = alpha / rank
    ttt_lora_lr: float = 8e-05  # AdamW, constant
    ttt_beta1: float = 0.0
    ttt_beta2: float = 0.99
    ttt_weight_decay: float = 2.0  # decoupled AdamW decay of A and B
    phased_ttt_prefix_docs: int = 2500  # the first documents of the stream: scored, then the global phase trains
    global_ttt_lr: float = 0.001  # global SGD peak lr, cosine to 0
    global_ttt_momentum: float = 0.9
    global_ttt_chunk_tokens: int = 32768  # targets per global SGD step, over all ranks
    global_ttt_grad_clip: float = 1.0
    ttt_cuda_graphs: bool = True  # CUDA: replay each TTT step shape from a CUDA graph (rounded-up shapes)
    ngram_tilt_enabled: bool = True
    token_order: int = 16  # n-gram order: 15 context tokens
    token_threshold: float = 0.8  # gate when the top continuation's share >= this
    token_boost: float = 2.625  # tilt strength (nats) at a gated target

    @classmethod
    def from_env(cls, environ=None) -> "Hyperparameters":
        """The record values overridden from `environ` (default os.environ) alone; junk raises."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(**{**defaults, **_env_values(cls, os.environ if environ is None else environ)})


_ENV_PARSERS = {"bool": lambda raw: raw == "1", "int": int, "float": float, "str": str}


def _env_values(cls, environ, skip=()) -> dict:
    """The fields of cls (but `skip`) set in environ under their upper-case name, parsed by type; junk raises."""
    values = {}
    for f in dataclasses.fields(cls):
        name, raw = f.name.upper(), environ.get(f.name.upper())
        if raw is None or f.name in skip:
            continue
        if f.type not in _ENV_PARSERS:  # f.type is the annotation's text (from __future__ import annotations)
            raise TypeError(f"environment variable {name}: unsupported field type {f.type}")
        try:
            if f.type == "bool" and raw not in ("0", "1"):
                raise ValueError("expected 0 or 1")
            values[f.name] = _ENV_PARSERS[f.type](raw)
        except ValueError as e:
            raise ValueError(f"environment variable {name}={raw!r}: {e}") from None
    return values


def log_hyperparameters(h: Hyperparameters, log) -> None:
    log("Hyperparameters:")
    for f in sorted(dataclasses.fields(h), key=lambda f: f.name):
        value = getattr(h, f.name)
        log(f"  {f.name}: {value}{'  (env)' if value != f.default else ''}")


# === data ===
# Shards (spec 01 §3.1): int32 LE header[256] = (magic, version, N, 0...), then N uint16 LE entries. The same
# format holds token shards and the validation byte sidecar (original UTF-8 bytes per token, spec 01 §4).

BOS_ID = 1
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """The uint16 payload of one shard, after checking magic, version and the exact file size."""
    size = os.path.getsize(path)
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
    tokens, sizes = [read_shard(f, vocab_size) for f in token_files], [read_shard(f) for f in sidecar_files]
    for token_file, sidecar_file, shard, sidecar in zip(token_files, sidecar_files, tokens, sizes):
        if len(shard) != len(sidecar):
            raise ValueError(f"{sidecar_file}: {len(sidecar)} entries but {token_file} has {len(shard)} tokens")
    stream, stream_bytes = np.concatenate(tokens), np.concatenate(sizes)
    # Keep whole seq_len windows of targets plus the first token (the record's truncation: 47,851,520 targets).
    keep = (stream.size - 1) // seq_len * seq_len + 1
    if keep < 2:
        raise ValueError(f"{data_path}: {stream.size} val tokens, fewer than one {seq_len}-token window")
    if stream[0] != BOS_ID:
        raise ValueError(f"{token_files[0]}: validation stream starts with {stream[0]}, expected BOS {BOS_ID}")
    if np.any(stream_bytes[stream == BOS_ID] != 0):
        raise ValueError(f"{data_path}: byte sidecar is non-zero at a BOS position (sidecar misaligned?)")
    return ValidationData(torch.from_numpy(stream[:keep].astype(np.int64)),
                          torch.from_numpy(stream_bytes[:keep].astype(np.int32)))


def build_cu_seqlens(starts: np.ndarray, total: int, max_len: int, bucket: int = 64) -> tuple[np.ndarray, int]:
    """(cu_seqlens, longest segment) of a row whose documents start at `starts`, cut every max_len, right-padded
    with `total` (empty segments) to a multiple of `bucket` so that compiled shapes stay few."""
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:], total)
    bounds = [np.arange(s, e, max_len) for s, e in zip(starts.tolist(), ends.tolist())]
    cu = np.append(np.concatenate(bounds), total).astype(np.int32)
    return np.pad(cu, (0, -cu.size % bucket), constant_values=total), int(np.diff(cu).max())


class DocumentPackingLoader:
    """Training rows (spec 01 §7): each rank its own span of the same shard; shards in sorted order, wrapping."""

    def __init__(self, files: list[str], rank: int, world_size: int, tokens_per_rank: int, max_seq_len: int,
                 device: torch.device, vocab_size: int | None = None):
        self.files, self.rank, self.world_size, self.vocab_size = list(files), rank, world_size, vocab_size
        self.tokens_per_rank, self.max_seq_len, self.device, self.file_index = tokens_per_rank, max_seq_len, device, -1
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
        cu = torch.from_numpy(build_cu_seqlens(starts, self.tokens_per_rank, self.max_seq_len)[0])
        if self.device.type == "cuda":  # a non_blocking copy from pageable memory would block the host
            row, cu = row.pin_memory(), cu.pin_memory()
        to = dict(device=self.device, non_blocking=True)
        return row[:-1].unsqueeze(0).to(**to), row[1:].unsqueeze(0).to(**to), cu.to(**to)


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
        found = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
        if expected and expected != found:
            raise ValueError(f"{tokenizer_path}: sha256 {found[:16]}... differs from {manifest_path}'s "
                             f"tokenizer_sha256 {expected[:16]}...: the shards were written with another tokenizer")


def bits_per_byte(loss_sum: float, byte_sum: float) -> float:
    """BPB over scored targets: summed NLL in nats over summed original UTF-8 bytes (spec 01 §6)."""
    if byte_sum <= 0:
        raise ValueError(f"bits_per_byte: byte_sum {byte_sum} must be positive")
    return float(loss_sum) / (math.log(2.0) * float(byte_sum))


# === model ===
# The PR #2135 network (spec 02 §2-3). Dtypes are pinned in the code (weights cast to the activation dtype at use,
# norms in fp32 cast back), not left to autocast: CPU and every torch version see the record's bf16 H100 run (§2.11).
# No knobs for what the record fixed: TIE_EMBEDDINGS, SKIP_GATES_ENABLED, SMEAR_GATE_ENABLED, SPARSE_ATTN_GATE_ENABLED,
# ASYM_LOGIT_RESCALE, PARALLEL_FINAL_LANE=mean, FUSED_CE_ENABLED (a kernel choice for the same CE math).

ATTN_BACKENDS = ("auto", "fa3", "fa4", "varlen", "flex", "sdpa")
_ATTN_KERNELS: dict = {}


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm in fp32 with eps = fp32 machine eps (the reference's eps=None, §2.2), cast back: torch 2.12
    put rms_norm on autocast's fp32 list (pytorch #188955), which would turn the residual stream fp32."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=torch.finfo(torch.float32).eps).to(x.dtype)


def rope_tables(seq_len: int, rope_dims: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [seq_len, 1, rope_dims/2] of angle p * base^(-2j/rope_dims) for ROW positions p, as the
    reference (spec 02 Q6); RoPE is relative, so in-segment positions would differ only by rounding."""
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq.to(device))
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (j, j + r/2) of the first r = 2*cos.size(-1) dims of each head by -p*theta_j (the
    reference's sign, spec 02 Q7: matters only for loading its weights); the other dims pass through."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def fa4_varlen_op(forward, backward, name: str = "fa4_varlen"):
    """flash-attn-4's CuTe kernels (SM90/SM100; GQA without expanding K/V) as torch.library ops, so that the
    compiled blocks trace them: fa4_varlen(q, k, v, cu_seqlens, max_seqlen) -> (out [T, H, D], lse [H, T])."""
    @torch.library.custom_op(f"train_gpt::{name}", mutates_args=())
    def fa4_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = forward(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                           max_seqlen_k=max_seqlen, causal=True, return_lse=True)[:2]
        return out, lse

    @torch.library.custom_op(f"train_gpt::{name}_backward", mutates_args=())
    def fa4_varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> list[torch.Tensor]:
        return list(backward(q, k, v, out, dout.contiguous(), lse, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                              max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3])

    fa4_varlen.register_fake(lambda q, k, v, cu, max_seqlen: (
        torch.empty_like(q), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)))
    fa4_varlen_backward.register_fake(lambda dout, q, k, v, *rest: (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))

    def save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], *output, inputs[3])
        ctx.max_seqlen = inputs[4]

    def grads(ctx, dout, dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        return *fa4_varlen_backward(dout, q, k, v, out, lse, cu, ctx.max_seqlen), None, None
    fa4_varlen.register_autograd(grads, setup_context=save)
    return fa4_varlen


def load_attention_kernels() -> dict:
    """Import the optional kernels once, before any torch.compile trace; None where not importable. varlen_attn's
    causal keyword is is_causal in its first releases, window_size from torch 2.11; enable_gqa came in 2.12.
    flex_attention is compiled: its eager form materializes the scores."""
    if not _ATTN_KERNELS:
        _ATTN_KERNELS.update(fa3=None, fa4=None, varlen=None)
        with contextlib.suppress(ImportError):
            from flash_attn_interface import flash_attn_varlen_func
            _ATTN_KERNELS["fa3"] = flash_attn_varlen_func
        with contextlib.suppress(ImportError):
            from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
            _ATTN_KERNELS["fa4"] = fa4_varlen_op(_flash_attn_fwd, _flash_attn_bwd)
            warnings.filterwarnings("ignore", message="Argument aux_data")  # CuTe DSL, once per kernel compile
        with contextlib.suppress(ImportError):
            from torch.nn.attention.varlen import varlen_attn
            params = inspect.signature(varlen_attn).parameters
            kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            _ATTN_KERNELS["varlen"] = (varlen_attn, kwargs)
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        _ATTN_KERNELS["flex"] = (torch.compile(flex_attention, dynamic=False), BlockMask)
    return _ATTN_KERNELS


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name not in ATTN_BACKENDS:
        raise ValueError(f"ATTN_BACKEND={name!r}: expected one of {', '.join(ATTN_BACKENDS)}")
    if name == "auto" and device.type == "cuda":
        kernels = load_attention_kernels()
        fa4 = kernels["fa4"] is not None and torch.cuda.get_device_capability(device)[0] in (9, 10)
        return "fa3" if kernels["fa3"] is not None else "fa4" if fa4 else "varlen"
    return "sdpa" if name == "auto" else name


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen: int, backend: str = "auto") -> torch.Tensor:
    """Causal attention within each segment [cu[i], cu[i+1]) of a flat row: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D].
    cu_seqlens: int32 0..T, may be right-padded with T, or flex's block mask; max_seqlen must bound every segment."""
    backend, kernels = resolve_attention_backend(backend, q.device), load_attention_kernels()
    group = q.size(1) // k.size(1)
    if backend in ("fa3", "fa4", "varlen") and kernels[backend] is None:
        raise RuntimeError(f"ATTN_BACKEND={backend}: the kernel is not importable with torch {torch.__version__}")
    if backend == "fa3":
        out = kernels["fa3"](q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if backend == "fa4":
        return kernels["fa4"](q, k, v, cu_seqlens, max_seqlen)[0]
    if backend == "varlen":
        varlen_attn, kwargs = kernels["varlen"]
        if "enable_gqa" not in kwargs:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    if backend == "flex":
        block_mask = document_block_mask(cu_seqlens, len(q)) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        heads_first = [t.transpose(0, 1)[None].contiguous() for t in (q, k, v)]  # [1, heads, T, D]
        return kernels["flex"][0](*heads_first, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)
    # sdpa, the exact path (CPU): segment s gathered into row s of an [S, L] batch. Its tokens are a prefix of the
    # row, so causal masking also hides the slots past its end (clamped indices); outputs gathered back, no host sync.
    total, cu = q.size(0), cu_seqlens.long()
    slots = (cu[:-1, None] + torch.arange(min(max_seqlen, total), device=q.device)).clamp(max=total - 1)
    qs = q[slots].transpose(1, 2)  # [S, H, L, D]
    ks = k[slots].repeat_interleave(group, dim=2).transpose(1, 2)
    vs = v[slots].repeat_interleave(group, dim=2).transpose(1, 2)
    y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(1, 2)  # [S, L, H, D]
    seg = _segment_ids(cu, total)
    return y[seg, torch.arange(total, device=q.device) - cu[seg]]


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the segment holding each flat position (empty padding segments are never hit)."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True) - 1


def document_block_mask(cu_seqlens: torch.Tensor, total: int, block: int = 128):
    """flex_attention's BlockMask for causal attention inside segments, from the segment ids: a KV block is visited
    when not in the future and overlapping the query block's segments, without mask_mod ("full") when both lie in
    one segment. Built once per forward outside the compiled blocks (inside, it failed to lower: torch 2.13, CPU)."""
    BlockMask = load_attention_kernels()["flex"][1]
    doc = _segment_ids(cu_seqlens, total)
    nblocks = -(-total // block)
    padded = torch.cat((doc, doc[-1:].expand(nblocks * block - total))).view(nblocks, block)
    first, last = padded[:, 0], padded[:, -1]  # segment ids are non-decreasing
    device = cu_seqlens.device
    qb, kb = torch.arange(nblocks, device=device)[:, None], torch.arange(nblocks, device=device)[None, :]
    live = (kb <= qb) & (last[None, :] >= first[:, None])
    full = (kb < qb) & (first[None, :] == last[:, None])

    def sparse(mask):
        counts = mask.sum(-1, dtype=torch.int32)[None, None]
        order = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True)
        return counts, order.to(torch.int32)[None, None]

    def same_segment_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)
    return BlockMask.from_kv_blocks(*sparse(live & ~full), *sparse(full), BLOCK_SIZE=block,
                                    mask_mod=same_segment_causal, seq_lengths=(total, total))


def asym_softcap(logits: torch.Tensor, softcap_pos: torch.Tensor, softcap_neg: torch.Tensor) -> torch.Tensor:
    """Eval/TTT logits (§2.10): s * tanh(l / s), s = softcap_pos for l >= 0 else softcap_neg; bf16 stays bf16."""
    return torch.where(logits >= 0, softcap_pos * torch.tanh(logits / softcap_pos),
                       softcap_neg * torch.tanh(logits / softcap_neg))


def layer_schedule(num_layers: int, num_loops: int, loop_start: int, loop_end: int) -> tuple[list, list]:
    """(encoder, decoder) layers: loop_start..loop_end run num_loops + 1 times, the order split in half (§2.7)."""
    loop = list(range(loop_start, loop_end + 1))
    order = [*range(loop_start), *loop * (num_loops + 1), *range(loop_end + 1, num_layers)]
    return order[:len(order) // 2], order[len(order) // 2:]


def _scaled_norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """rms_norm(x) * scale with the reference's roundings (normed value in x's dtype, then the product)."""
    return (rms_norm(x).float() * scale).to(x.dtype)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora: dict | None, name: str) -> torch.Tensor:
    """y + scale * x_b A_b^T B_b^T per row b with the TTT adapter lora[name] = (A^T, B^T, scale), if any (spec 04
    §3.1). Stored transposed, [rows, in, r] and [rows, r, out]: the bmm gradients then come out in the adapters'
    own layout, where A and B as such got theirs transposed and autograd copied each (136 copies a chunk step)."""
    if lora is None or name not in lora:
        return y
    a_t, b_t, scale = lora[name]
    return y + scale * torch.bmm(torch.bmm(x, a_t.to(x.dtype)), b_t.to(x.dtype))


class BankProjection(nn.Module):
    def project(self, x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
        """x @ w^T with w a bank slice (name: q, k, v, o, up, down); GPTQ calibration hooks here."""
        return F.linear(x, w.to(x.dtype))


class Attention(BankProjection):
    """GQA attention: per-head q/k RMSNorm, partial RoPE, learned per-head query gain, XSA, SparseAttnGate (§2.5)."""

    def __init__(self, h: Hyperparameters, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = h.num_heads, h.num_kv_heads, h.model_dim // h.num_heads
        self.gate_window, self.gate_scale = h.gate_window, h.sparse_attn_gate_scale
        self.use_xsa = layer >= h.num_layers - h.xsa_last_n
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.attn_gate_w = nn.Parameter(torch.zeros(h.num_heads, h.gate_window))

    def forward(self, z, wq, wk, wv, wo, attn_args: tuple, lora: dict | None = None) -> torch.Tensor:
        """attn_args = ((cos, sin), segments, max_seqlen, backend), shared by all layers of a forward; segments:
        cu_seqlens, flex's block mask or None (each row a segment). lora: TTT adapters q, v, o on z (spec 04 §3.1)."""
        (cos, sin), segments, max_seqlen, backend = attn_args
        batch, seq, dim = z.shape
        max_seqlen = seq if max_seqlen is None else min(max_seqlen, seq)  # from the shape: symbolic in TTT graphs
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = rms_norm(add_lora(self.project(z, wq, "q"), z, lora, "q").view(batch, seq, heads, head_dim))
        k = rms_norm(self.project(z, wk, "k").view(batch, seq, kv_heads, head_dim))
        v = add_lora(self.project(z, wv, "v"), z, lora, "v").view(batch * seq, kv_heads, head_dim)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = apply_rope(q, cos, sin) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(k, cos, sin)
        if segments is None:  # SDPA per row, KV heads repeated so that the flash backend (dynamic shapes) applies
            k_rows, v_rows = (t.reshape(batch, seq, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=2)
                              .transpose(1, 2) for t in (k, v))
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k_rows, v_rows, is_causal=True).transpose(1, 2)
        else:
            y = varlen_causal_attention(q.reshape(batch * seq, heads, head_dim),
                                        k.reshape(batch * seq, kv_heads, head_dim), v, segments, max_seqlen, backend)
        y = y.reshape(batch * seq, kv_heads, heads // kv_heads, head_dim)  # kernels may return strided output
        if self.use_xsa:  # exclusive self-attention (arXiv:2603.09078): drop the part along the own value vector
            v_hat = F.normalize(v.float(), dim=-1).unsqueeze(-2)  # fp32, as F.normalize under CUDA autocast
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        gate = torch.sigmoid(self.gate_scale * F.linear(z[..., :self.gate_window], self.attn_gate_w.to(z.dtype)))
        y = y.reshape(batch, seq, heads, head_dim) * gate[..., None]
        return add_lora(self.project(y.reshape(batch, seq, dim).to(z.dtype), wo, "o"), z, lora, "o")


# MLP training path (§2.6): LeakyReLU_0.5^2 in the up-projection GEMM's epilogue, its derivative in the epilogue of the
# down-projection's input-gradient GEMM, which saves two round trips of a [T, 4d] bf16 tensor through HBM per layer
# visit. These Triton GEMMs run at ~0.65x cuBLAS's rate, so a training step gains 1.3-1.7% (H200, BENCHMARKS.md).
# Rounding points as eager bf16: each GEMM output rounded once, the activation and the gradient product rounded once
# (2u and u/2 are exact). Tiles per direction: the fastest of bench_mlp's sweep on an H200.
LEAKY_SQ_TILES = {"forward": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
                  "backward": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)}
LEAKY_SQ_MIN_ROWS = 16_384  # fewer rows run the plain ops (training has 98,304; global TTT rows 2,560)

if triton is not None:
    @triton.jit(do_not_specialize=["M"])  # one compile for every row count (global TTT rows vary in length)
    def leaky_sq_gemm_kernel(a_ptr, b_ptr, pre_ptr, out_ptr, M, N, K: tl.constexpr, stride_am, stride_bk, stride_bn,
                             BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """g = A[M, K] @ B[K, N] rounded to the output dtype. Forward: pre = g, out = LeakyReLU_0.5(g)^2. Backward
        (pre given): out = g * d/du LeakyReLU_0.5(u)^2 at u = pre, i.e. g * 2u (u > 0) or g * u/2. A, pre and out
        are row-major with unit column stride; N and K are multiples of the tile."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), N // BLOCK_N
        group = GROUP_M * tiles_n  # tiles in GROUP_M consecutive row tiles: they share B's columns in L2
        first_m = (pid // group) * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % group) % rows
        tile_n = (pid % group) // rows
        rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (rm % M)[:, None] * stride_am + rk[None, :]  # rows past M re-read valid ones, never stored
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(K // BLOCK_K):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        offsets, in_rows = rm[:, None] * N + rn[None, :], (rm < M)[:, None]
        g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        if BACKWARD:
            u = tl.load(pre_ptr + offsets, mask=in_rows).to(tl.float32)
            tl.store(out_ptr + offsets, (g * tl.where(u > 0, 2.0 * u, 0.5 * u)).to(out_ptr.dtype.element_ty),
                     mask=in_rows)
        else:
            tl.store(pre_ptr + offsets, g.to(pre_ptr.dtype.element_ty), mask=in_rows)
            act = tl.where(g > 0, g, 0.5 * g)
            tl.store(out_ptr + offsets, (act * act).to(out_ptr.dtype.element_ty), mask=in_rows)


def leaky_sq_gemm(a: torch.Tensor, b: torch.Tensor, pre: torch.Tensor | None = None, tile: dict | None = None):
    """The Triton kernel on a [M, K] (unit column stride) and b [K, N] (any strides): forward (pre None) ->
    (pre, out); backward -> out. Shapes must fit the tile (leaky_sq_gemm_fits)."""
    forward = pre is None
    tile = tile or LEAKY_SQ_TILES["forward" if forward else "backward"]
    (M, K), N = a.shape, b.size(1)
    out = a.new_empty((M, N))
    pre = a.new_empty((M, N)) if forward else pre.contiguous()
    grid = (triton.cdiv(M, tile["BLOCK_M"]) * (N // tile["BLOCK_N"]),)
    leaky_sq_gemm_kernel[grid](a, b, pre, out, M, N, K, a.stride(0), b.stride(0), b.stride(1),
                               BACKWARD=not forward, **tile)
    return (pre, out) if forward else out


@functools.cache
def leaky_sq_gemm_device_ok(device_index: int) -> bool:
    """Hopper only: the tiles were measured there, and their pipelines need up to 192 KiB of shared memory per
    block (an A100 offers 163 KiB, consumer GPUs ~100 KiB)."""
    return torch.cuda.get_device_capability(device_index)[0] == 9


def leaky_sq_gemm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The Triton path: bf16 on a Hopper GPU, shapes that fit the tiles, and enough rows to fill the GPU (eager, 2,560
    rows of global TTT take 0.84 ms forward + backward fused against 0.45 ms plain on the H200: 1.2 waves of tiles)."""
    return (triton is not None and a.is_cuda and a.dtype == b.dtype == torch.bfloat16 and a.stride(1) == 1
            and a.size(0) >= LEAKY_SQ_MIN_ROWS and leaky_sq_gemm_device_ok(a.device.index)
            and all(a.size(1) % t["BLOCK_K"] == 0 and b.size(1) % t["BLOCK_N"] == 0 for t in LEAKY_SQ_TILES.values()))


@torch.library.custom_op("train_gpt::leaky_sq_up", mutates_args=())
def leaky_sq_up(x: torch.Tensor, w_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, post) = (x W_up^T, LeakyReLU_0.5(pre)^2) for x [M, d]."""
    if leaky_sq_gemm_fits(x, w_up.T):
        return leaky_sq_gemm(x, w_up.T)
    pre = F.linear(x, w_up)
    return pre, F.leaky_relu(pre, 0.5).square().to(pre.dtype)  # CUDA autocast runs square (pow) in fp32


@torch.library.custom_op("train_gpt::leaky_sq_grad", mutates_args=())
def leaky_sq_grad(dy: torch.Tensor, w_down: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """d loss / d pre from dy = d loss / d (post W_down^T) [M, d]."""
    if leaky_sq_gemm_fits(dy, w_down):
        return leaky_sq_gemm(dy, w_down, pre)
    return (dy @ w_down) * torch.where(pre > 0, 2 * pre, 0.5 * pre)


leaky_sq_up.register_fake(lambda x, w_up: tuple(x.new_empty((x.size(0), w_up.size(0))) for _ in range(2)))
leaky_sq_grad.register_fake(lambda dy, w_down, pre: torch.empty_like(pre))


class LeakyReluSquaredMLP(torch.autograd.Function):
    """LeakyReLU_0.5(z W_up^T)^2 W_down^T with the fused ops; saves pre and post (+2 x [T, 4d] bf16 a visit)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        x = z.reshape(-1, z.size(-1))
        pre, post = leaky_sq_up(x, w_up)
        ctx.save_for_backward(x, w_up, w_down, pre, post)
        return F.linear(post, w_down).view(*z.shape[:-1], w_down.size(0))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_up, w_down, pre, post = ctx.saved_tensors
        dy_flat = dy.reshape(-1, dy.size(-1))
        d_pre = leaky_sq_grad(dy_flat, w_down, pre)
        return (d_pre @ w_up).view(dy.shape[:-1] + (w_up.size(1),)), d_pre.T @ x, dy_flat.T @ post


class MLP(BankProjection):
    fused = True  # training path through LeakyReluSquaredMLP (bench/bench_mlp.py compares both)

    def forward(self, z: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        if self.fused and torch.is_grad_enabled() and (w_up.requires_grad or w_down.requires_grad):
            return LeakyReluSquaredMLP.apply(z, w_up.to(z.dtype), w_down.to(z.dtype))
        return self.project(F.leaky_relu(self.project(z, w_up, "up"), 0.5).square(), w_down, "down")


class Block(nn.Module):
    """One physical layer's scalars and its attention/MLP; the matrices come in as bank slices."""

    def __init__(self, h: Hyperparameters, layer: int):
        super().__init__()
        self.attn, self.mlp = Attention(h, layer), MLP()
        self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim))))
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if h.ln_scale else 1.0  # c_i of §2.2

    def forward(self, x, x0, weights, norm_scale, attn_args, lane1=None, lambdas=None, lora=None):
        """Sequential block (§2.4) -> x; given lambdas = (resid [2], post [2 sources, 2 lanes]), the parallel-residual
        block (§2.8) with x as lane0 -> (lane0, lane1). For torch.compile, norm_scale is a 0-dim tensor (a float is a
        guard: a graph per layer), and x, x0 and lane1 are distinct tensors (aliased ones compile another graph)."""
        wq, wk, wv, wo, w_up, w_down = weights
        mix = self.resid_mix.to(x.dtype)
        u = mix[0] * x + mix[1] * x0
        a = self.attn_scale.to(x.dtype) * self.attn(_scaled_norm(u, norm_scale), wq, wk, wv, wo, attn_args, lora)
        if lambdas is None:  # the x0-mixed value becomes the residual
            u = u + a
            n = _scaled_norm(u, norm_scale)
            return u + self.mlp_scale.to(x.dtype) * add_lora(self.mlp(n, w_up, w_down), n, lora, "mlp")
        n = _scaled_norm(lane1, norm_scale)
        m = self.mlp_scale.to(x.dtype) * add_lora(self.mlp(n, w_up, w_down), n, lora, "mlp")
        resid, post = (t.to(x.dtype) for t in lambdas)
        return resid[0] * x + post[0, 0] * a + post[1, 0] * m, resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m


def _check_model_config(h: Hyperparameters) -> None:
    checks = [
        (h.model_dim % h.num_heads == 0, f"MODEL_DIM={h.model_dim} must be a multiple of NUM_HEADS={h.num_heads}"),
        (h.num_heads % h.num_kv_heads == 0,
         f"NUM_HEADS={h.num_heads} must be a multiple of NUM_KV_HEADS={h.num_kv_heads}"),
        (h.rope_dims % 2 == 0 and 0 < h.rope_dims <= h.model_dim // h.num_heads,
         f"ROPE_DIMS={h.rope_dims} must be even and within the head dim {h.model_dim // max(h.num_heads, 1)}"),
        (0 < h.gate_window <= h.model_dim, f"GATE_WINDOW={h.gate_window} must be in 1..MODEL_DIM={h.model_dim}"),
        (0 <= h.loop_start <= h.loop_end < h.num_layers and h.num_loops >= 0,
         f"LOOP_START={h.loop_start} LOOP_END={h.loop_end} NUM_LOOPS={h.num_loops}: need "
         f"0 <= start <= end < NUM_LAYERS={h.num_layers} and loops >= 0"),
        (h.logit_softcap > 0, f"LOGIT_SOFTCAP={h.logit_softcap} must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"Hyperparameters: {message}")
    resolve_attention_backend(h.attn_backend, torch.device("cpu"))


class GPT(nn.Module):
    """`model(ids, targets, cu_seqlens)` -> mean training loss (fixed softcap); `forward_logits(ids, cu_seqlens)` ->
    AsymLogit-softcapped logits. ids: [1, T] with cu_seqlens, or [B, T] without (each row one causal segment)."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        _check_model_config(h)
        L, d = h.num_layers, h.model_dim
        kv_dim, hidden = h.num_kv_heads * (d // h.num_heads), int(h.mlp_mult * d)
        self.tok_emb = nn.Embedding(h.vocab_size, d)
        self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))  # [i] = Wq_i, [L + i] = Wo_i
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv_dim, d))  # [i] = Wk_i, [L + i] = Wv_i
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hidden, d))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, d, hidden))
        self.blocks = nn.ModuleList(Block(h, i) for i in range(L))
        self.schedules = [layer_schedule(L, loops, h.loop_start, h.loop_end) for loops in (0, h.num_loops)]  # [looping]
        num_skips = min(map(len, self.schedules[True]))  # sized for looping
        self.skip_weights = nn.Parameter(torch.ones(num_skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, d))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))  # [layer, source attn/mlp, dest lane]
        self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        self.smear_gate = nn.Linear(h.gate_window, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        # Eval/TTT-only: training and global TTT use the fixed logit_softcap, so these stay at init (spec 02 Q2).
        self.softcap_pos = nn.Parameter(torch.tensor(h.logit_softcap))
        self.softcap_neg = nn.Parameter(torch.tensor(h.logit_softcap))
        self.logit_softcap, self.rope_dims, self.rope_base = h.logit_softcap, h.rope_dims, h.rope_base
        self.gate_window, self.smear_gate_bos_fix = h.gate_window, h.smear_gate_bos_fix
        self.parallel_start_layer, self.attn_backend = h.parallel_start_layer, h.attn_backend
        self.looping, self._constants = False, {}
        self.lora_path = None  # (embed, blocks, skip_mix, final_norm) for forwards with TTT adapters: PhasedTTT's
        load_attention_kernels()
        with torch.no_grad():  # §3: orthogonal Wq/Wk/Wv/Wup, zero Wo/Wdown (blocks start as the identity), zero gates
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=h.tied_embed_init_std)
            for i in range(L):
                for w in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[L + i], self.mlp_up_bank[i]):
                    nn.init.orthogonal_(w)
            self.qo_bank[L:].zero_()
            self.mlp_down_bank.zero_()
            self.smear_gate.weight.zero_()

    def set_looping(self, enabled: bool) -> None:
        self.looping = bool(enabled)

    def schedule(self) -> tuple[list, list]:  # (encoder, decoder) physical layers of the current looping state
        return self.schedules[self.looping]

    def constants(self, seq_len: int, device) -> tuple:
        """((cos, sin), per-layer norm scales [L]): fp32, built once per (seq_len, device), not buffers (the
        state dict holds parameters only, and a bf16 cast of the model must not round them)."""
        key = (seq_len, str(device))
        if key not in self._constants:
            scales = torch.tensor([block.norm_scale for block in self.blocks], dtype=torch.float32, device=device)
            self._constants[key] = (rope_tables(seq_len, self.rope_dims, self.rope_base, device), scales)
        return self._constants[key]

    def layer_weights(self) -> list[tuple]:
        """Per physical layer (Wq, Wk, Wv, Wo, Wup, Wdown). unbind: one stack per bank in backward, where
        per-use indexing would scatter into a bank-sized zero tensor for each of the 17 layer applications."""
        L = len(self.blocks)
        qo, kv = self.qo_bank.unbind(0), self.kv_bank.unbind(0)
        up, down = self.mlp_up_bank.unbind(0), self.mlp_down_bank.unbind(0)
        return [(qo[i], kv[i], kv[L + i], qo[L + i], up[i], down[i]) for i in range(L)]

    def smear(self, e: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """SmearGate (§2.3; PR #1667, modded-nanogpt): e_t += lambda * sigmoid(w . e_t[:gate_window]) * e_{t-1}."""
        gate_in = e[:, 1:, :self.gate_window]
        g = self.smear_lambda.to(e.dtype) * torch.sigmoid(F.linear(gate_in, self.smear_gate.weight.to(e.dtype)))
        if self.smear_gate_bos_fix:
            g = g * (ids[:, 1:, None] != BOS_ID).to(g.dtype)
        return torch.cat((e[:, :1], e[:, 1:] + g * e[:, :-1]), dim=1)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """x0 = RMSNorm(SmearGate(Emb[ids])) [B, T, d]; a method so that it can be compiled on its own."""
        return rms_norm(self.smear(self.tok_emb(input_ids), input_ids))

    def skip_mix(self, x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """U-Net skip as a lerp: sigmoid(g_j) * x + (1 - sigmoid(g_j)) * (w_j * skip) (§2.7). Row j comes in as
        tensors, so that one compiled graph serves every skip."""
        return torch.lerp(weight.to(x.dtype) * skip, x, torch.sigmoid(gate.to(x.dtype)))

    def final_norm(self, x: torch.Tensor, lane1: torch.Tensor | None) -> torch.Tensor:
        return rms_norm(x if lane1 is None else 0.5 * (x + lane1))

    def forward_hidden(self, input_ids, cu_seqlens=None, max_seqlen: int | None = None, lora=None) -> torch.Tensor:
        """Final-normed hidden [B, T, d] (§2.1). max_seqlen: bound on the longest segment for the GPU kernels (None:
        T; training passes train_seq_len, the loader's cut). lora: TTT adapters, a dict per block visit (add_lora)."""
        batch, seq = input_ids.shape
        if cu_seqlens is not None and batch != 1:
            raise ValueError(f"GPT: cu_seqlens needs input_ids of shape [1, T], got {list(input_ids.shape)}")
        rope, norm_scales = self.constants(seq, input_ids.device)
        backend = resolve_attention_backend(self.attn_backend, input_ids.device)
        segments = document_block_mask(cu_seqlens, seq) if backend == "flex" and cu_seqlens is not None else cu_seqlens
        if backend == "fa4" and cu_seqlens is None:  # rows as varlen segments: FA4 also for eval and TTT windows
            segments = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=input_ids.device)
        attn_args = (rope, segments, max_seqlen, backend)
        weights = self.layer_weights()
        embed, blocks, skip_mix, final_norm = (self.lora_path if lora is not None and self.lora_path else
                                               (self.embed, self.blocks, self.skip_mix, self.final_norm))
        x0 = embed(input_ids)
        x, skips, lane1 = x0.clone(), [], None  # copies, in the first block and lane: one graph per block kind
        if lora is not None and torch.is_grad_enabled() and not x.requires_grad:
            x.requires_grad_()  # as the later blocks' inputs: TTT's first block compiles no graph of its own
        encoder_layers, decoder_layers = self.schedule()
        visits = iter(lora or itertools.repeat(None))
        for i in encoder_layers:
            x = blocks[i](x, x0, weights[i], norm_scales[i], attn_args, lora=next(visits))
            skips.append(x)
        for j, i in enumerate(decoder_layers):
            parallel = i >= self.parallel_start_layer
            if parallel and lane1 is None:  # both lanes start as the residual before this layer's skip mix
                lane1 = x.clone()
            if j < self.skip_weights.size(0) and skips:
                x = skip_mix(x, skips.pop(), self.skip_weights[j], self.skip_gates[j])  # LIFO; lane0 only
            if parallel:
                lambdas = (self.parallel_resid_lambdas[i], self.parallel_post_lambdas[i])
                x, lane1 = blocks[i](x, x0, weights[i], norm_scales[i], attn_args,
                                     lane1=lane1, lambdas=lambdas, lora=next(visits))
            else:
                x = blocks[i](x, x0, weights[i], norm_scales[i], attn_args, lora=next(visits))
        return final_norm(x, lane1)

    def forward_logits(self, input_ids, cu_seqlens=None, max_seqlen: int | None = None) -> torch.Tensor:
        hidden = self.forward_hidden(input_ids, cu_seqlens, max_seqlen)
        return asym_softcap(F.linear(hidden, self.tok_emb.weight.to(hidden.dtype)), self.softcap_pos, self.softcap_neg)

    def forward(self, input_ids, target_ids, cu_seqlens=None, max_seqlen: int | None = None) -> torch.Tensor:
        return self.training_loss(self.forward_hidden(input_ids, cu_seqlens, max_seqlen), target_ids)

    def training_loss(self, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Tied head + mean CE of the fp32 softcapped logits (§2.9; the reference's fused kernel agrees to ~1e-17),
        compiled on its own: eager, the [T, V] fp32 temporaries cost several GB of memory traffic per step."""
        logits = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype)).float()
        capped = self.logit_softcap * torch.tanh(logits.view(-1, logits.size(-1)) / self.logit_softcap)
        return F.cross_entropy(capped, target_ids.reshape(-1))


# === optimizer ===
# Per step (spec 02 §4): AdamW on the tied embedding, AdamW on the control tensors, Muon on the four weight banks.

MICRO_BATCHES = 8  # micro-batches per optimizer step on every GPU count: the record's 8 GPUs x 1 (spec 02 §5.4)
MUON_BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
TOKEN_EMBEDDING = "tok_emb.weight"
FROZEN_IN_TRAINING = ("softcap_pos", "softcap_neg")  # the eval/TTT-only AsymLogit scales stay 30.0 (spec 02 Q2)

# Polar Express (arXiv 2505.16932): (a, b, c) of X <- aX + (bA + cA^2)X, A = XX^T, per iteration (the last repeats);
# singular values in [1e-3, 1] (relative to the Frobenius norm) end in [0.8589, 1.1411] (spec 02 §4.2).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# torch 2.13 renamed these two collectives (same signatures); 2.11 has only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def polar_express(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Near-orthogonal polar factor of each matrix of x [B, rows, cols], computed in x's dtype."""
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT  # iterate on the wide side: the Gram matrix A is then the smaller one
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon (K. Jordan 2024; arXiv 2502.16982) per matrix of banks [B, out, in] (spec 02 §4.2): buf = mu*buf + g;
    u = g + mu*buf; rows of u to unit norm; O = PolarExpress(u); p *= 1 - lr*wd; p -= lr * sqrt(max(1, out/in)) * O.
    p.grad: this rank's share of the mean gradient. Rank r owns matrices [r*k, (r+1)*k), k = ceil(B / W): it
    reduce-scatters their gradient, keeps their momentum, all-gathers their bf16 updates: an all-reduce's bytes, 1/W
    of the Newton-Schulz (~3.7e11 FLOP, 1-2 ms of a 95 ms step at W=8). fp32 momentum (record: bf16, Q14), 127 MB/W."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, backend_steps: int,
                 row_normalize: bool, rank: int = 0, world_size: int = 1, orthogonalize=polar_express):
        super().__init__(list(params), dict(lr=lr, base_lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.row_normalize, self.orthogonalize = backend_steps, row_normalize, orthogonalize
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            # Largest bank first, so that each all-gather overlaps the next bank's Newton-Schulz.
            params = sorted(group["params"], key=lambda p: p.numel(), reverse=True)
            shards = [self._reduce_scatter(p.grad) for p in params]
            updates = []
            for p, (grad, work) in zip(params, shards):
                if work is not None:
                    work.wait()
                updates.append(self._all_gather(self._orthogonalized(p, grad, group)))
            for p, (update, work) in zip(params, updates):
                if work is not None:
                    work.wait()
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(update[:p.size(0)].to(p.dtype), alpha=-group["lr"] * max(1.0, p.size(1) / p.size(2)) ** 0.5)

    def _reduce_scatter(self, grad: torch.Tensor):
        if self.world_size == 1:
            return grad, None
        owned = -(-grad.size(0) // self.world_size)
        if owned * self.world_size != grad.size(0):  # zero padding matrices: they stay zero through every op
            grad = torch.cat([grad, grad.new_zeros(owned * self.world_size - grad.size(0), *grad.shape[1:])])
        shard = grad.new_empty(owned, *grad.shape[1:])
        return shard, _reduce_scatter(shard, grad, async_op=True)

    def _all_gather(self, update: torch.Tensor):
        if self.world_size == 1:
            return update, None
        full = update.new_empty(update.size(0) * self.world_size, *update.shape[1:])
        return full, _all_gather(full, update, async_op=True)

    def _orthogonalized(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        if "momentum_buffer" not in self.state[p]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
        buf = self.state[p]["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        update = grad.add(buf, alpha=group["momentum"])
        if self.row_normalize:
            update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        # bf16 Newton-Schulz on GPU as in the record; fp32 on CPU (bf16 matmuls are slow there; tests compare tightly).
        return self.orthogonalize(update.to(torch.bfloat16 if update.is_cuda else torch.float32), self.backend_steps)


def build_optimizers(model: nn.Module, h: Hyperparameters, rank: int = 0,
                     world_size: int = 1) -> tuple[torch.optim.AdamW, Muon]:
    """AdamW on the tied embedding and on the other trained tensors, Muon on the banks; base_lr: the record LR."""
    params = dict(model.named_parameters())
    missing = [name for name in (TOKEN_EMBEDDING, *MUON_BANKS) if name not in params]
    if missing:
        raise ValueError(f"model has no parameter {missing}: the optimizer groups follow spec 02 §2.12's names")
    scalars = [p for name, p in params.items() if name not in (TOKEN_EMBEDDING, *MUON_BANKS, *FROZEN_IN_TRAINING)]
    on_cuda = params[TOKEN_EMBEDDING].is_cuda
    adamw = torch.optim.AdamW(
        [dict(params=[params[TOKEN_EMBEDDING]], lr=h.tied_embed_lr, base_lr=h.tied_embed_lr, weight_decay=h.embed_wd),
         dict(params=scalars, lr=h.scalar_lr, base_lr=h.scalar_lr, weight_decay=h.adam_wd)],
        betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=True if on_cuda else None)
    orthogonalize = torch.compile(polar_express, dynamic=False) if on_cuda else polar_express
    muon = Muon([params[name] for name in MUON_BANKS], h.matrix_lr, h.muon_momentum_warmup_start, h.muon_wd,
                h.muon_backend_steps, h.muon_row_normalize, rank, world_size, orthogonalize)
    return adamw, muon


# === training ===
# The reference's quirks (spec 02 §9) decided here:
# Q3  each micro-batch's gradient is clipped on its own, then averaged: the record's math at 8 GPUs, kept on 1-4.
# Q4  the compile warm-up is reverted completely, Muon momentum included (the record kept 40 steps of it).
# Q10 unused skip/lambda rows decay as in the record.  Q11 the final step gets a step line too.
# Q13 the bank padding at W = 8 stays: per-matrix sharding needs whole matrices per rank.
# Q14 Muon: fp32 gradient reduction and momentum.  Q18 train_loss is the mean over ranks (the record: rank 0's).
# Q15 cu_seqlens are padded to >= 256 entries: one compiled shape for <= 255 segments (the record compiled
#     64/128/192/256 separately); a larger batch compiles once, and the loop logs it.
# Q19 no host sync per step: ranks agree on the time via an all-reduce read one step late; the EMA is one foreach op.
#     Before issuing step k + 1 the host waits for step k - 1 to end: a step replayed from CUDA graphs costs the host
#     little, and a host many steps ahead would read the wallclock cap early and overrun it by the queued steps.

CU_SEQLENS_MIN_ENTRIES = 256
# CUDA-graph captures forbid unsafe CUDA calls in the capturing thread only: other threads (NCCL's watchdog under
# torchrun) may keep querying their events while a graph is captured.
CAPTURE_ERROR_MODE = "thread_local"


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the record's compute dtype), nothing on CPU. No cast cache: the weights are cast in the
    code, and a cache must not outlive a CUDA-graph capture (torch.cuda.graph's documented restriction)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """CUDA: right-pad with `total` (empty segments) to CU_SEQLENS_MIN_ENTRIES so the compiled blocks see one shape
    (no host sync). CPU: nothing is compiled and the exact attention pays for empty segments too: drop the padding."""
    if not cu_seqlens.is_cuda:
        return cu_seqlens[:int((cu_seqlens < total).sum()) + 1]
    missing = CU_SEQLENS_MIN_ENTRIES - cu_seqlens.numel()
    return F.pad(cu_seqlens, (0, missing), value=total) if missing > 0 else cu_seqlens


def budget_ms(h: Hyperparameters) -> float:
    return 1000.0 * (h.max_wallclock_seconds - max(h.gptq_reserve_seconds, 0.0))


def training_fraction(elapsed_ms: float, step: int, h: Hyperparameters) -> float:
    """Share of the training budget used before this step: wallclock-based; step-based without a wallclock cap."""
    return step / h.iterations if h.max_wallclock_seconds <= 0 else elapsed_ms / budget_ms(h)


def lr_multiplier(frac: float, h: Hyperparameters) -> float:
    """1, then linear decay to 0 over the last warmdown_frac, floored at min_lr (spec 02 §4.4). No LR warm-up."""
    if h.warmdown_frac <= 0 or frac < 1.0 - h.warmdown_frac:
        return 1.0
    return max((1.0 - frac) / h.warmdown_frac, h.min_lr)


def muon_momentum(step: int, h: Hyperparameters) -> float:
    ramp = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return h.muon_momentum_warmup_start + (h.muon_momentum - h.muon_momentum_warmup_start) * ramp


class ClippedGradientSum:
    """Sum of the micro-batches' gradients, each clipped to global norm max_norm (Q3, spec 02 §4.5). fp32 sums in
    one flat buffer: its leading part (the AdamW tensors) is all-reduced in one call, Muon reduces the banks."""

    def __init__(self, replicated: list[torch.Tensor], sharded: list[torch.Tensor], max_norm: float):
        self.params, self.max_norm = replicated + sharded, max_norm
        self.replicated_numel = sum(p.numel() for p in replicated)
        sizes = [p.numel() for p in self.params]
        self.flat = torch.zeros(sum(sizes), device=self.params[0].device)
        self.sums = [chunk.view_as(p) for chunk, p in zip(self.flat.split(sizes), self.params)]

    @torch.no_grad()
    def add_micro_batch(self) -> None:
        live = [(p, s) for p, s in zip(self.params, self.sums) if p.grad is not None]
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p, _ in live], self.max_norm, foreach=True)
        torch._foreach_add_([s for _, s in live], [p.grad for p, _ in live])
        for p, _ in live:
            p.grad = None

    @torch.no_grad()
    def install(self, num_micro_batches: int, world_size: int) -> None:
        """.grad <- this rank's share of the mean clipped gradient; replicated tensors all-reduced (SUM)."""
        self.flat.div_(num_micro_batches)
        if world_size > 1:
            dist.all_reduce(self.flat[:self.replicated_numel])
        for p, s in zip(self.params, self.sums):
            p.grad = s if s.dtype == p.dtype else s.to(p.dtype)

    def clear(self) -> None:
        self.flat.zero_()
        for p in self.params:
            p.grad = None


class EMA:
    """fp32 EMA of every floating state-dict tensor from the warm-up restore on, loaded once after training (spec 02
    §4.6). lerp keeps a tensor that never moves (the frozen softcaps) bit-identical."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.live = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
        self.shadow = {name: t.detach().float().clone() for name, t in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(list(self.shadow.values()), [t.float() for t in self.live.values()], 1.0 - self.decay)

    def load_into(self, model: nn.Module) -> None:
        model.load_state_dict({n: s.to(self.live[n].dtype) for n, s in self.shadow.items()}, strict=False)


class TrainingClock:
    """Training ms, paused around evaluation, from the host clock. Ranks act on the MAX over ranks of the previous
    step's reading (read one step late: the host never waits for the GPU), so schedule, looping and stop agree."""

    def __init__(self, device: torch.device, world_size: int, now=time.perf_counter):
        self.device, self.world_size, self.now = device, world_size, now
        self.train_ms, self.started, self.vote, self.vote_ready = 0.0, None, None, None

    def start(self) -> None:
        synchronize(self.device)
        self.started = self.now()

    def stop(self) -> float:  # pause once the queued work is done -> training ms so far
        synchronize(self.device)
        self.train_ms += 1000.0 * (self.now() - self.started)
        self.started = None
        return self.train_ms

    def agreed_ms(self) -> float:
        local = self.train_ms + 1000.0 * (self.now() - self.started)
        if self.world_size == 1:
            return local
        if self.vote_ready is not None:
            self.vote_ready.synchronize()
        agreed = 0.0 if self.vote is None else float(self.vote)
        vote = torch.full((1,), local, dtype=torch.float64, device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        self.vote, self.vote_ready = vote.to("cpu", non_blocking=True), torch.cuda.Event() if vote.is_cuda else None
        if self.vote_ready is not None:
            self.vote_ready.record()
        return agreed


class Progress:
    """A long phase's progress on rank 0: a tqdm bar on a terminal, else a log line every `every_s` seconds."""

    def __init__(self, label: str, total: float, log, enabled: bool = True, unit: str = "", every_s: float = 30.0):
        self.label, self.total, self.log, self.enabled, self.every_s = label, total, log, enabled, every_s
        self.unit, self.bar, self.last_line = unit, None, time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, done: float, text: str = "") -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self.last_line = time.perf_counter()
            self.log(f"{self.label}_progress {done:.0f}/{self.total:.0f}{self.unit} {text}".rstrip())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def compiled_graph_count() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class Trainer:
    """Optimizer step, compile warm-up and timed loop (spec 02 §5); a rank runs 8 / world_size micro-batches a step."""

    def __init__(self, h: Hyperparameters, model: nn.Module, train_files: list[str], rank: int = 0,
                 world_size: int = 1, device: torch.device = torch.device("cpu"), log=print, now=time.perf_counter):
        if MICRO_BATCHES % world_size:
            raise ValueError(f"world size {world_size}: the {MICRO_BATCHES} micro-batches of a step must split evenly "
                             f"over ranks (1, 2, 4 or 8)")
        if h.train_batch_tokens % MICRO_BATCHES:
            raise ValueError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens}: must be a multiple of {MICRO_BATCHES}")
        if h.max_wallclock_seconds > 0 and budget_ms(h) <= 0:
            raise ValueError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} leaves no training time after "
                             f"GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds}")
        self.h, self.model, self.train_files, self.log, self.now = h, model, train_files, log, now
        self.rank, self.world_size, self.device = rank, world_size, device
        self.grad_accum_steps = MICRO_BATCHES // world_size
        self.adamw, self.muon = build_optimizers(model, h, rank, world_size)
        replicated = [p for group in self.adamw.param_groups for p in group["params"]]
        self.grad_sum = ClippedGradientSum(replicated, self.muon.param_groups[0]["params"], h.grad_clip_norm)
        self.loader = self.new_loader()
        self.loss_sum = torch.zeros((), device=device)
        self.graphs = {} if device.type == "cuda" and h.train_cuda_graphs else None
        self.graph_pool = torch.cuda.graph_pool_handle() if self.graphs is not None else None
        self.settled_keys = set()  # (looping, cu_seqlens entries) whose last eager run compiled nothing
        self.replays = 0

    def new_loader(self) -> DocumentPackingLoader:
        return DocumentPackingLoader(self.train_files, self.rank, self.world_size, self.h.train_batch_tokens //
                                     MICRO_BATCHES, self.h.train_seq_len, self.device, self.h.vocab_size)

    def next_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """The next step's micro-batches on the device: (inputs, targets, cu_seqlens padded for the compiled blocks)."""
        batches = []
        for _ in range(self.grad_accum_steps):
            inputs, targets, cu_seqlens = self.loader.next_batch()
            batches.append((inputs, targets, fit_cu_seqlens(cu_seqlens, inputs.size(1))))
        return batches

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """Forward and backward of one micro-batch; its clipped gradient and its loss are added to the step's sums."""
        with autocast(self.device):
            loss = self.model(inputs, targets, cu_seqlens, self.h.train_seq_len)
        loss.backward()  # unscaled: each micro-batch is clipped on its own, then averaged
        self.grad_sum.add_micro_batch()
        self.loss_sum += loss.detach()

    def graphed_micro_step(self, batch: tuple[torch.Tensor, ...]) -> None:
        """micro_step replayed from CUDA graphs, all in one memory pool: issued op by op, a looped micro-step is ~4,000
        kernel launches, and the GPU waited for the host in gaps of ~2-4% of the step (bench/step_gap.py). Two graphs
        per (looping, cu_seqlens entries), replayed in turn, as a graph's launch is ordered behind its previous one
        (H200: +0.9% / +1.7% unlooped / looped against op by op; +0.5% / +1.1% with one graph, another call, so not
        clearly apart). A shape runs eagerly until a run of it compiles nothing (no compile may happen inside a
        capture), and is captured at its next use."""
        key = (self.model.looping, batch[2].numel())
        if key not in self.graphs:
            if key not in self.settled_keys:
                self.release_graphs()  # else the eager activations (up to 39 GiB) come on top of the graphs' pool
                compiled = compiled_graph_count()
                self.micro_step(*batch)
                if compiled_graph_count() == compiled:
                    self.settled_keys.add(key)
                return
            start, self.graphs[key] = time.perf_counter(), []
            for _ in range(2):
                static = [t.clone() for t in batch]
                self.graphs[key].append((self.capture_micro_step(static), static))
            self.log(f"train_cuda_graph looping:{int(key[0])} cu_seqlens:{key[1]} "
                     f"capture:{time.perf_counter() - start:.2f}s")
        self.replays += 1
        graph, static = self.graphs[key][self.replays % 2]
        for buffer, value in zip(static, batch):
            buffer.copy_(value)
        graph.replay()

    def capture_micro_step(self, static: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
        """A CUDA graph of micro_step on the tensors `static` (capturing runs nothing: replay() does)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode=CAPTURE_ERROR_MODE):
            self.micro_step(*static)
        return graph

    def release_graphs(self) -> None:
        """Free the training graphs and their pool (~26-39 GiB at the record config): before an eager micro-step and
        after training. Settled shapes are captured again at their next use (~0.2 s each, logged)."""
        if self.graphs:
            synchronize(self.device)
            self.graphs.clear()
            gc.collect()
            if self.device.type == "cuda":  # (tests run the graph logic on CPU with stand-in graphs)
                torch.cuda.empty_cache()
                self.graph_pool = torch.cuda.graph_pool_handle()  # later captures: a new pool, not the freed id

    def step(self, step: int, lr_scale: float, batches: list | None = None) -> torch.Tensor:
        """One optimizer step (on `batches` from next_batches(), else the loader's next); returns this rank's mean
        micro-batch loss (a device scalar, not synced)."""
        self.loss_sum.zero_()
        for batch in batches or self.next_batches():
            if self.graphs is None:
                self.micro_step(*batch)
            else:
                self.graphed_micro_step(batch)
        self.grad_sum.install(MICRO_BATCHES, self.world_size)
        for group in self.adamw.param_groups + self.muon.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        self.muon.param_groups[0]["momentum"] = muon_momentum(step, self.h)  # the banks: Muon's one group
        self.adamw.step()
        self.muon.step()
        self.grad_sum.clear()
        return self.loss_sum / self.grad_accum_steps

    def warmup(self) -> None:
        """Compile (and capture) every training graph outside the timer: warmup_steps steps unlooped, then looped, then
        with CUDA graphs one more unlooped step; all reverted (Q4)."""
        if self.h.warmup_steps <= 0:
            return
        weights = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in (self.adamw, self.muon)]
        for looping in (False, True):
            self.model.set_looping(looping)
            synchronize(self.device)
            start = time.perf_counter()
            for k in range(self.h.warmup_steps):
                self.step(k, lr_scale=1.0)
                synchronize(self.device)
                if k == 0:
                    first = time.perf_counter() - start
            self.log(f"warmup looping:{int(looping)} steps:{self.h.warmup_steps} first_step:{first:.1f}s "
                     f"total:{time.perf_counter() - start:.1f}s graphs:{compiled_graph_count()}")
        self.model.set_looping(False)
        if self.graphs is not None:  # the looped eager runs freed the unlooped graphs: capture them here, not timed
            self.step(self.h.warmup_steps, lr_scale=1.0)
        self.model.load_state_dict(weights)
        for opt, state in zip((self.adamw, self.muon), optimizer_states):
            opt.load_state_dict(state)
        self.loader = self.new_loader()

    def validate(self, step: int, val: ValidationData) -> None:
        """Outside train_time; the first call compiles the blocks for the eval shape (logged as its graphs)."""
        graphs, start = compiled_graph_count(), time.perf_counter()
        val_loss, val_bpb = evaluate_bpb(self.model, val, self.h, self.rank, self.world_size, self.device, self.log)
        self.log(f"step:{step}/{self.h.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                 f"eval_time:{1000 * (time.perf_counter() - start):.0f}ms new_graphs:{compiled_graph_count() - graphs}")

    def log_step(self, step: int, loss: torch.Tensor, clock: TrainingClock) -> None:
        if self.world_size > 1:
            dist.all_reduce(loss)
            loss /= self.world_size
        synchronize(self.device)
        train_ms = clock.train_ms + 1000.0 * (self.now() - clock.started)
        tokens_per_s = step * self.h.train_batch_tokens / max(train_ms / 1000.0, 1e-9)
        self.log(f"step:{step}/{self.h.iterations} train_loss:{loss.item():.4f} train_time:{train_ms:.0f}ms "
                 f"step_avg:{train_ms / step:.2f}ms tok/s:{tokens_per_s:.0f}")

    def train(self, val: ValidationData | None) -> EMA:
        """The timed loop (spec 02 §5.3); looping from the first step whose pre-step fraction >= enable_looping_at."""
        h, log = self.h, self.log
        clock, ema = TrainingClock(self.device, self.world_size, self.now), EMA(self.model, h.ema_decay)
        progress = Progress("train", 100, log, enabled=self.rank == 0, unit="%")
        graphs, step, looping, loss, logged = compiled_graph_count(), 0, False, None, 0
        step_ends = collections.deque()  # CUDA events of the steps the GPU may still be running
        clock.start()
        while True:
            batches = self.next_batches()  # host work and copies queue behind the running step
            if len(step_ends) > 1:
                step_ends.popleft().synchronize()  # Q19: at most one step ahead of the GPU
            elapsed = clock.agreed_ms()
            capped = h.max_wallclock_seconds > 0 and elapsed >= budget_ms(h)
            last = capped or step >= h.iterations
            if last and logged < step:
                self.log_step(step, loss, clock)
            if val is not None and (last or (h.val_loss_every > 0 and step % h.val_loss_every == 0)):
                clock.stop()
                self.validate(step, val)
                graphs = compiled_graph_count()
                clock.start()
            if last:
                break
            frac = training_fraction(elapsed, step, h)
            if not looping and frac >= h.enable_looping_at:
                looping = True
                self.model.set_looping(True)
                encoder, decoder = self.model.schedule()
                log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{encoder} decoder:{decoder}")
            loss = self.step(step, lr_multiplier(frac, h), batches)
            ema.update()
            if self.device.type == "cuda":
                step_ends.append(torch.cuda.Event())
                step_ends[-1].record()
            step += 1
            if step <= 5 or (h.train_log_every > 0 and step % h.train_log_every == 0):
                self.log_step(step, loss, clock)
                logged = step
                if compiled_graph_count() != graphs:
                    log(f"warning: {compiled_graph_count() - graphs} graph(s) compiled inside the timed loop")
                    graphs = compiled_graph_count()
            progress.update(100 * min(frac, 1.0), f"step:{step}")
        progress.close()
        train_ms = clock.stop()
        self.release_graphs()
        self.steps, self.train_seconds = step, train_ms / 1000.0
        if capped:
            log(f"stopping_early:wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{h.iterations}")
        if self.device.type == "cuda":
            log(f"peak memory allocated:{torch.cuda.max_memory_allocated() >> 20}MiB "
                f"reserved:{torch.cuda.max_memory_reserved() >> 20}MiB")
        return ema


# === quantization ===
# EMA weights -> per-matrix GPTQ codes (shared/spec/03 §1-4). GPTQ (Frantar et al., arXiv:2210.17323) with act-order
# and per-row "SDClip" scales; LQER (arXiv:2402.02446) as PR #2135's asymmetric int2/int4 rank-4 correction.
# Hessians are summed over all ranks (the record used rank 0's 3.1M tokens only, spec 03 Q7).

BANK_ROLES = {"qo_bank": ("attn.c_q.weight", "attn.proj.weight"), "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
              "mlp_up_bank": ("mlp.fc.weight",), "mlp_down_bank": ("mlp.proj.weight",)}  # bank[k*L + i]: layer i
PASSTHROUGH_MAX_NUMEL = 65_536  # tensors this small (all control tensors) are stored as float16
GPTQ_BLOCK_COLUMNS = 128
GPTQ_DAMPING = 0.01  # times the mean Hessian diagonal


def unbank_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The banks split into per-layer matrices (views); other entries unchanged."""
    flat = {}
    for name, tensor in state.items():
        roles = BANK_ROLES.get(name)
        if roles is None:
            flat[name] = tensor
            continue
        layers = tensor.shape[0] // len(roles)
        for k, role in enumerate(roles):
            flat.update({f"blocks.{i}.{role}": tensor[k * layers + i] for i in range(layers)})
    return flat


def rebank_state_dict(flat: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of unbank_state_dict for the entries of `template` (the model's own state dict)."""
    def bank(name, roles):
        layers = template[name].shape[0] // len(roles)
        return torch.stack([flat[f"blocks.{i}.{role}"] for role in roles for i in range(layers)])
    return {name: bank(name, BANK_ROLES[name]) if name in BANK_ROLES else flat[name] for name in template}


def quant_format(name: str, tensor: torch.Tensor, h: Hyperparameters) -> tuple[int, float] | None:
    """(bits, clip sigmas) of a GPTQ tensor, or None for float16 passthrough (spec 03 §1.1)."""
    if not tensor.is_floating_point() or tensor.numel() <= PASSTHROUGH_MAX_NUMEL:
        return None
    if "tok_emb" in name:
        return h.embed_bits, h.embed_clip_sigmas
    if ".mlp." in name:
        return h.matrix_bits, h.mlp_clip_sigmas
    if ".attn." in name:
        return h.matrix_bits, h.attn_clip_sigmas
    raise ValueError(f"quantization: no clip rule for {name} {tuple(tensor.shape)} (expected tok_emb/.mlp./.attn.)")


def gptq_quantize(weights: torch.Tensor, hessians: torch.Tensor, clip_sigmas: float,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (spec 03 §3), act-order: W [n, rows, cols], H [n, cols, cols] -> (int8 codes, fp16 scales [n, rows])."""
    qmax = 2 ** (bits - 1) - 1
    # fp16 row step = clip * std(row) / qmax ("SDClip"), floored at the smallest fp16 so that a constant row cannot
    # get a zero scale (the reference's 0/0 -> NaN, spec 03 Q17).
    scales = (clip_sigmas * weights.float().std(dim=-1) / qmax).clamp_min(1e-10).half().clamp_min(2.0 ** -24)
    step, hess = scales.float(), hessians.float().clone()
    diag = hess.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag += GPTQ_DAMPING * diag.mean(dim=-1, keepdim=True)
    order = torch.argsort(diag, dim=-1, descending=True, stable=True)
    hess = torch.take_along_dim(torch.take_along_dim(hess, order[:, :, None], 1), order[:, None, :], 2)
    work = torch.take_along_dim(weights.float(), order[:, None, :], 2)
    work.masked_fill_(torch.take_along_dim(dead, order, 1)[:, None, :], 0.0)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hess)), upper=True)
    codes = torch.empty_like(work)
    for a in range(0, work.shape[-1], GPTQ_BLOCK_COLUMNS):
        b = min(a + GPTQ_BLOCK_COLUMNS, work.shape[-1])
        errors = torch.empty_like(work[..., a:b])
        for j in range(a, b):
            codes[..., j] = torch.clamp(torch.round(work[..., j] / step), -qmax, qmax)
            errors[..., j - a] = (work[..., j] - codes[..., j] * step) / upper[:, j, j, None]
            work[..., j:b] -= errors[..., j - a, None] * upper[:, None, j, j:b]
        work[..., b:] -= errors @ upper[:, a:b, b:]
    return torch.empty_like(codes).scatter_(2, order[:, None, :].expand_as(codes), codes).to(torch.int8), scales


def lqer_factors(error: torch.Tensor, rank: int, group: int) -> tuple[torch.Tensor, ...]:
    """Rank-r factors of a quantization error E [rows, cols] (spec 03 §4.2-4.3): A = U_r S_r in int2, one scale;
    B = V_r^T in int4, a scale per `group` values -> (qA int8, sA fp16 0-d, qB int8, sB fp16). Each component's
    sign is fixed (largest |A| entry positive): the asymmetric grid then ignores the SVD's sign convention (Q15)."""
    if (rank * error.shape[1]) % group:
        raise ValueError(f"LQER: rank {rank} x cols {error.shape[1]} is not a multiple of LQER_ASYM_GROUP={group}")
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    a, b = (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    sign = torch.where(a.gather(0, a.abs().argmax(dim=0, keepdim=True)) < 0, -1.0, 1.0)
    a, b = a * sign, b * sign.T
    scale_a = (a.abs().max().clamp_min(1e-10) / 1.5).half()
    groups = b.reshape(-1, group)
    scales_b = (groups.abs().amax(dim=1).clamp_min(1e-10) / 7.5).half()
    codes_b = torch.clamp(torch.round(groups / scales_b.float()[:, None]), -8, 7).to(torch.int8).reshape(b.shape)
    return torch.clamp(torch.round(a / scale_a.float()), -2, 1).to(torch.int8), scale_a, codes_b, scales_b


def dequantize_tensor(codes, scales, lqer=None) -> torch.Tensor:
    """q * s (+ A_hat B_hat) in fp32. The correction is a fixed-order sum of outer products (no matmul), so the
    bits do not depend on the device, the BLAS or the thread count."""
    weight = codes.float() * scales.float()[:, None]
    if lqer is not None:
        codes_a, scale_a, codes_b, scales_b = lqer
        a = codes_a.float() * scale_a.float()
        b = (codes_b.float().reshape(scales_b.numel(), -1) * scales_b.float()[:, None]).reshape(codes_b.shape)
        for k in range(a.shape[1]):
            weight = weight + a[:, k, None] * b[None, k, :]
    return weight


@dataclasses.dataclass
class QuantizedWeights:
    """What the artifact stores, keyed by per-layer names (banks split); lqer: (qA, sA, qB, sB) of the top-k."""
    codes: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # int8 [rows, cols]
    scales: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # fp16 [rows]
    bits: dict[str, int] = dataclasses.field(default_factory=dict)
    lqer: dict[str, tuple] = dataclasses.field(default_factory=dict)
    passthrough: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # fp16

    def dequantize(self, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(set(template) - set(self.codes) - set(self.passthrough))
        if missing:
            raise KeyError(f"quantized weights lack {len(missing)} model tensors, e.g. {missing[:3]}")
        return {name: (self.passthrough[name] if name in self.passthrough else
                       dequantize_tensor(self.codes[name], self.scales[name], self.lqer.get(name))
                       ).to(like.dtype).reshape(like.shape) for name, like in template.items()}

    def categories(self) -> dict[str, list[str]]:
        """The record's "Quantized weights:" lines: `blocks.<i>` collapsed, names sorted and unique."""
        groups = collections.defaultdict(set)
        for name in self.codes:
            groups[f"gptq (int{self.bits[name]})" + ("+lqer_asym" if name in self.lqer else "")].add(name)
        groups["passthrough (float16)"].update(self.passthrough)
        return {cat: sorted({re.sub(r"\.\d+$", "", re.sub(r"blocks\.\d+", "blocks", n)) for n in names})
                for cat, names in sorted(groups.items())}


def quantize_weights(flat: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], h: Hyperparameters,
                     device: torch.device) -> QuantizedWeights:
    """GPTQ batched per shape and format; LQER on the lqer_top_k largest ||W - q s||_F (unweighted, spec 03 §4.1)."""
    qw, batches = QuantizedWeights(), collections.defaultdict(list)
    for name, tensor in flat.items():
        fmt = quant_format(name, tensor, h)
        if fmt is None:
            qw.passthrough[name] = tensor.detach().to("cpu", torch.float16)
        else:
            batches[(tuple(tensor.shape), fmt)].append(name)
    for (_, (bits, clip)), names in batches.items():
        weights = torch.stack([flat[n].detach().to(device, torch.float32) for n in names])
        codes, scales = gptq_quantize(weights, torch.stack([hessians[n].to(device) for n in names]), clip, bits)
        for name, code, scale in zip(names, codes.cpu(), scales.cpu()):
            qw.codes[name], qw.scales[name], qw.bits[name] = code, scale, bits
    if h.lqer_enabled:
        errors = {n: flat[n].detach().to("cpu", torch.float32) - dequantize_tensor(qw.codes[n], qw.scales[n])
                  for n in qw.codes}
        for name in sorted(errors, key=lambda n: float(torch.linalg.norm(errors[n])), reverse=True)[:h.lqer_top_k]:
            factors = lqer_factors(errors[name].to(device), h.lqer_rank, h.lqer_asym_group)
            qw.lqer[name] = tuple(t.cpu() for t in factors)
    return qw


class CalibrationLoader:
    """GPTQ calibration batches from TRAINING shards (spec 01 §7, random mode): this rank's shards sorted[rank::world]
    (all if fewer than ranks), numpy PCG64(seed=rank), independent of SEED. A batch: num_seqs random seq_len windows
    in one row, segments at every window and BOS: per-document attention as in training (the record: dense, Q10)."""

    def __init__(self, files: list[str], rank: int, world_size: int, seq_len: int, num_seqs: int,
                 vocab_size: int | None = None):
        self.shards = [read_shard(f, vocab_size) for f in (files[rank::world_size] or files)]
        self.seq_len, self.num_seqs = seq_len, num_seqs
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self._draw_windows()

    def _draw_windows(self) -> None:
        """Per shard: a random phase, then its windows phase + k*seq_len in random order (popped from the end)."""
        L, self.windows = self.seq_len, []
        for shard in self.shards:
            max_phase = min(L - 1, max(0, shard.size - L - 1))
            phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
            self.windows.append(list(phase + L * self.rng.permutation((shard.size - 1 - phase) // L)))
        if not any(self.windows):
            raise ValueError(f"calibration: no shard of this rank holds {L + 1} tokens ({len(self.shards)} shards)")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [1, num_seqs * seq_len] int64, cu_seqlens int32), on CPU."""
        rows = []
        for _ in range(self.num_seqs):
            if not any(self.windows):
                self._draw_windows()
            remaining = np.array([len(w) for w in self.windows], dtype=np.float64)
            shard = int(self.rng.choice(len(self.windows), p=remaining / remaining.sum()))
            start = int(self.windows[shard].pop())
            rows.append(self.shards[shard][start:start + self.seq_len])
        ids = np.concatenate(rows).astype(np.int64)
        starts = np.union1d(np.arange(0, ids.size, self.seq_len), np.flatnonzero(ids == BOS_ID))
        return torch.from_numpy(ids)[None], torch.from_numpy(build_cu_seqlens(starts, ids.size, self.seq_len)[0])


# The matrix whose Hessian each bank projection's input feeds; k and v read q's input and share its Hessian.
PROJECTION_INPUTS = {"q": "attn.c_q.weight", "o": "attn.proj.weight", "up": "mlp.fc.weight", "down": "mlp.proj.weight"}


@contextlib.contextmanager
def capture_projection_inputs(model: nn.Module, record):
    """While open, record(matrix name, input) sees every bank projection input, looped visits under their layer name."""
    with contextlib.ExitStack() as restore:
        for i, block in enumerate(model.blocks):
            for module in (block.attn, block.mlp):
                def project(x, w, name, module=module, i=i):
                    if name in PROJECTION_INPUTS:
                        record(f"blocks.{i}.{PROJECTION_INPUTS[name]}", x)
                    return type(module).project(module, x, w, name)
                module.project = project
                restore.callback(delattr, module, "project")
        yield


def collect_hessians(model: nn.Module, loader: CalibrationLoader, num_batches: int, device: torch.device,
                     deadline: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """H = sum of X^T X over batches, looped visits and ranks / number of batches (spec 03 §2), per matrix name; X in
    fp32 (TF32 products of bf16 values are exact). After one batch, stops once time.perf_counter() passes `deadline`."""
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()
        with torch.autocast(device.type, enabled=False):
            if name not in sums:
                sums[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
            sums[name].addmm_(x.T, x)
    start, batches, was_looping = time.perf_counter(), 0, model.looping
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    model.set_looping(True)
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), capture_projection_inputs(model, record):
            while batches < num_batches and not (batches and deadline is not None and time.perf_counter() > deadline):
                ids, cu_seqlens = loader.next_batch()
                with autocast(device):
                    hidden = model.forward_hidden(ids.to(device), cu_seqlens.to(device), loader.seq_len)
                record("tok_emb.weight", hidden)
                batches += 1
                synchronize(device)
    finally:
        model.set_looping(was_looping)
        torch.set_float32_matmul_precision(precision)
    counts = torch.tensor([batches, batches * loader.num_seqs * loader.seq_len], device=device, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        for name in sorted(sums):
            dist.all_reduce(sums[name])
        dist.all_reduce(counts)
    hessians = {name: (total / counts[0]).cpu() for name, total in sums.items()}
    for name in [n for n in hessians if n.endswith(".attn.c_q.weight")]:
        hessians[name.replace("c_q", "c_k")] = hessians[name.replace("c_q", "c_v")] = hessians[name]
    return hessians, {"batches_local": batches, "batches_total": int(counts[0]), "tokens_total": int(counts[1]),
                      "seconds": time.perf_counter() - start}


# === artifact ===
# Frame: header (magic, version, body length, crc32 of the body) + body = u32 length + brotli-11 "remainder" (JSON
# metadata, row scales, LQER factors, float16 tensors, coder models) + the Q section: one rANS stream (`constriction`)
# per code matrix, a fitted categorical per (row class, column class) cell: no row order needed, hence no similarity
# sort or stored permutations (the record's 51.8 s and 106 KB, spec 03 §5.2, Q12). Compared: bench/bench_compress.py.

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGQZ", 1
ARTIFACT_HEADER = struct.Struct("<4sIQI")
MAX_SUBMISSION_BYTES = 16_000_000
# Every code file that runs at evaluation; the submission total counts each one's bytes exactly as shipped.
EVAL_CODE_FILES = ("train_gpt.py", "online_ngram_tilt.py", "online_ngram_state.c")
# Shipped Python files are one-line self-extracting stubs that start with this (see shipped_python).
SHIPPED_STUB_PREFIX = b"import lzma,base64,linecache;"
ANS_FREQ_TOTAL = 1 << 15  # stored symbol frequencies: counts rescaled to this total (uint16)
# Candidate numbers of row and column classes (powers of two, nested); the cheapest grid (coded + model bytes) wins.
ANS_ROW_CLASSES, ANS_COLUMN_CLASSES = (1, 2, 4, 8), (1, 2, 4, 8, 16)


class CodeModel(typing.NamedTuple):
    """A static model of one code matrix: rows and columns in classes, a categorical per (row, column) class."""
    lo: int  # symbol s stands for code lo + s
    row_classes: np.ndarray  # uint8 [rows]
    col_classes: np.ndarray  # uint8 [cols]
    freqs: np.ndarray  # uint16 [row classes, column classes, alphabet]

    def cells(self):
        """(row indices, column indices, frequencies) of every non-empty cell, in coding order."""
        for r, c in itertools.product(range(self.freqs.shape[0]), range(self.freqs.shape[1])):
            rows, cols = np.flatnonzero(self.row_classes == r), np.flatnonzero(self.col_classes == c)
            if rows.size and cols.size:
                yield rows, cols, self.freqs[r, c]


def fit_code_model(codes: np.ndarray) -> CodeModel:
    """Rows and columns ranked by mean |code| or mean code, cut into equal classes; the cheapest ranking and grid win.
    Column classes catch channel magnitudes and a direction shared by all rows (embedding anisotropy), row classes
    the distribution shape: what the record's row-similarity sort gave its compressor, without permutations."""
    lo = int(codes.min())
    size = max(int(codes.max()), lo + 1) - lo + 1  # constriction needs two symbols at least
    values, symbols = codes.astype(np.int32), (codes.astype(np.int64) - lo).ravel()
    R, C = ANS_ROW_CLASSES[-1], ANS_COLUMN_CLASSES[-1]
    best = None
    for row_key, col_key in itertools.product(*[(np.abs(values).mean(axis), values.mean(axis)) for axis in (1, 0)]):
        # equal classes by rank: stable rank * number of classes // count
        rows, cols = (np.argsort(np.argsort(k, kind="stable")) * n // k.size for k, n in ((row_key, R), (col_key, C)))
        key = ((rows[:, None] * C + cols[None, :]) * size).ravel() + symbols
        finest = np.bincount(key, minlength=R * C * size).reshape(R, C, size)
        for r, c in itertools.product(ANS_ROW_CLASSES, ANS_COLUMN_CLASSES):
            counts = finest.reshape(r, R // r, c, C // c, size).sum(axis=(1, 3))
            freqs = np.where(counts > 0, np.maximum(1, np.rint(
                counts * ANS_FREQ_TOTAL / np.maximum(counts.sum(-1, keepdims=True), 1))), 0)
            probs = freqs / np.maximum(freqs.sum(-1, keepdims=True), 1)
            bits = -(counts[counts > 0] * np.log2(probs[counts > 0])).sum()
            cost = (bits + codes.shape[0] * math.log2(r) + codes.shape[1] * math.log2(c)) / 8 + 2 * freqs.size
            if best is None or cost < best[0]:
                best = (cost, CodeModel(lo, (rows // (R // r)).astype(np.uint8), (cols // (C // c)).astype(np.uint8),
                                        freqs.astype(np.uint16)))
    return best[1]


def _categorical(freqs: np.ndarray):
    import constriction
    return constriction.stream.model.Categorical(freqs / freqs.sum(), perfect=False)


def ans_encode(codes: np.ndarray, model: CodeModel) -> np.ndarray:
    """uint32 rANS words of one code matrix, cell by cell (a stack: encoded last to first, decoded first to last)."""
    import constriction
    coder = constriction.stream.stack.AnsCoder()
    for rows, cols, freqs in reversed(list(model.cells())):
        coder.encode_reverse((codes[np.ix_(rows, cols)].astype(np.int32) - model.lo).ravel(), _categorical(freqs))
    return coder.get_compressed()


def ans_decode(words: np.ndarray, shape: tuple, model: CodeModel, source: str) -> np.ndarray:
    import constriction
    coder, codes = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32)), np.empty(shape, np.int8)
    for rows, cols, freqs in model.cells():
        symbols = coder.decode(_categorical(freqs), rows.size * cols.size).astype(np.int32)
        codes[np.ix_(rows, cols)] = (symbols + model.lo).reshape(rows.size, cols.size)
    if not coder.is_empty():
        raise ValueError(f"{source}: a Q-section stream has data left after decoding (corrupt artifact)")
    return codes


def encode_artifact(qw: QuantizedWeights) -> tuple[bytes, dict]:
    """The artifact bytes and their statistics (section sizes, Q bytes per tensor)."""
    import brotli
    meta, arrays, streams = {"gptq": {}, "passthrough": sorted(qw.passthrough), "arrays": {}}, {}, []
    for name, codes in qw.codes.items():
        model = fit_code_model(codes.numpy())
        streams.append(ans_encode(codes.numpy(), model).astype("<u4").tobytes())
        meta["gptq"][name] = {"shape": list(codes.shape), "bits": qw.bits[name], "lo": model.lo,
                              "q_bytes": len(streams[-1]), "lqer": name in qw.lqer}
        arrays.update({f"{name}.scale": qw.scales[name], f"{name}.rows": model.row_classes,
                       f"{name}.cols": model.col_classes, f"{name}.freqs": model.freqs})
        arrays.update({f"{name}.{part}": t for part, t in zip(("lqA", "lqAs", "lqB", "lqBs"), qw.lqer.get(name, ()))})
    arrays.update({name: qw.passthrough[name] for name in meta["passthrough"]})
    offset, chunks = 0, []
    for key, array in arrays.items():
        array = np.asarray(array.numpy() if isinstance(array, torch.Tensor) else array)
        meta["arrays"][key] = [array.dtype.str, list(array.shape), offset]  # 0-d tensors keep shape []
        offset += array.nbytes
        chunks.append(array.tobytes())
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    remainder = struct.pack("<I", len(meta_bytes)) + meta_bytes + b"".join(chunks)
    packed = brotli.compress(remainder, quality=11)
    body = struct.pack("<I", len(packed)) + packed + b"".join(streams)
    frame = ARTIFACT_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(body), zlib.crc32(body)) + body
    return frame, {"remainder_raw": len(remainder), "remainder_bytes": len(packed), "q_bytes": sum(map(len, streams)),
                   "q_raw": sum(c.numel() for c in qw.codes.values()),
                   "q_bytes_by_tensor": {n: m["q_bytes"] for n, m in meta["gptq"].items()}}


def decode_artifact(blob: bytes, source: str) -> QuantizedWeights:
    """Inverse of encode_artifact; every error names `source` (the file)."""
    import brotli
    if len(blob) < ARTIFACT_HEADER.size:
        raise ValueError(f"{source}: {len(blob)} bytes, shorter than the {ARTIFACT_HEADER.size}-byte artifact header")
    magic, version, body_len, crc = ARTIFACT_HEADER.unpack_from(blob)
    if magic != ARTIFACT_MAGIC:
        raise ValueError(f"{source}: magic {magic!r} != {ARTIFACT_MAGIC!r}: not a quantized-model artifact")
    if version != ARTIFACT_VERSION:
        raise ValueError(f"{source}: artifact version {version}, this code reads version {ARTIFACT_VERSION}")
    body = blob[ARTIFACT_HEADER.size:]
    if len(body) != body_len:
        raise ValueError(f"{source}: header says {body_len} body bytes, the file has {len(body)} "
                         f"({'truncated' if len(body) < body_len else 'trailing bytes'})")
    if zlib.crc32(body) != crc:
        raise ValueError(f"{source}: body crc32 {zlib.crc32(body):08x} != {crc:08x} in the header (corrupt artifact)")
    (packed_len,) = struct.unpack_from("<I", body)
    remainder = brotli.decompress(body[4:4 + packed_len])
    (meta_len,) = struct.unpack_from("<I", remainder)
    meta, data = json.loads(remainder[4:4 + meta_len]), memoryview(remainder)[4 + meta_len:]

    def array(key):
        dtype, shape, offset = meta["arrays"][key]
        return torch.from_numpy(np.frombuffer(data, dtype, math.prod(shape), offset).reshape(shape).copy())
    qw, offset = QuantizedWeights(), 4 + packed_len
    for name, info in meta["gptq"].items():
        words = np.frombuffer(body, "<u4", info["q_bytes"] // 4, offset)
        offset += info["q_bytes"]
        model = CodeModel(info["lo"], *(array(f"{name}.{part}").numpy() for part in ("rows", "cols", "freqs")))
        codes = ans_decode(words, tuple(info["shape"]), model, source)
        qw.codes[name], qw.scales[name], qw.bits[name] = torch.from_numpy(codes), array(f"{name}.scale"), info["bits"]
        if info["lqer"]:
            qw.lqer[name] = tuple(array(f"{name}.{part}") for part in ("lqA", "lqAs", "lqB", "lqBs"))
    if offset != len(body):
        raise ValueError(f"{source}: the Q section ends at byte {offset} of a {len(body)}-byte body")
    qw.passthrough = {name: array(name) for name in meta["passthrough"]}
    return qw


def shipped_python(source: bytes) -> bytes:
    """A one-line stub that runs `source` (lzma 9e, base85) in the stub's own module: __name__, __file__ and the
    folder on sys.path stay the stub's, so the shipped files behave as the source files do. The source is compiled
    under the stub's path and put in linecache there (mtime None: never reloaded from disk), so inspect.getsource
    works in it, which triton.jit needs, and tracebacks show the real lines."""
    packed = base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    body = (f"n=__file__;s=lzma.decompress(base64.b85decode(b'{packed}')).decode();"
            f"linecache.cache[n]=(len(s),None,s.splitlines(True),n);exec(compile(s,n,'exec'))\n")
    return SHIPPED_STUB_PREFIX + body.encode("ascii")


def write_shipped_code(code_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """EVAL_CODE_FILES written into out_dir as shipped -> their byte counts: Python files as stubs (a stub is copied,
    so the shipped train_gpt.py ships itself), the C source raw (the shipped online_ngram_tilt compiles it)."""
    shipped = {}
    for name in EVAL_CODE_FILES:
        path = Path(code_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"code size: {path} is listed in EVAL_CODE_FILES but missing")
        source = path.read_bytes()
        keep = not name.endswith(".py") or source.startswith(SHIPPED_STUB_PREFIX)
        shipped[name] = source if keep else shipped_python(source)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return {name: (Path(out_dir) / name).write_bytes(data) for name, data in shipped.items()}


def write_artifact(model: nn.Module, hessians: dict[str, torch.Tensor], h: Hyperparameters, device: torch.device,
                   log, code_dir: str | os.PathLike | None = None) -> dict:
    """Quantize, encode, count the code as write_shipped_code ships it into `submission/` beside it, write."""
    start = time.perf_counter()
    state = {name: t.detach() for name, t in model.state_dict().items()}
    log(f"Serialized model: {sum(t.numel() * t.element_size() for t in state.values())} bytes (unquantized state)")
    qw = quantize_weights(unbank_state_dict(state), hessians, h, device)
    gptq_s = time.perf_counter() - start
    log("Quantized weights:")
    for category, names in qw.categories().items():
        log(f"  {category}: {', '.join(names)}")
    blob, stats = encode_artifact(qw)
    # Coded bits per value per role against the order-0 entropy of the codes (per-tensor histograms; spec 03 §9):
    # below it is what the column classes gain, above it what the coder loses.
    groups = collections.defaultdict(lambda: np.zeros(3))
    for name, codes in qw.codes.items():
        p = np.bincount(codes.numpy().ravel().astype(np.int64) + 128) / codes.numel()
        entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * codes.numel()
        groups["embed" if "tok_emb" in name else "mlp" if ".mlp." in name else "attn"] += (
            codes.numel(), 8 * stats["q_bytes_by_tensor"][name], entropy)
    for role, (values, bits, entropy) in sorted(groups.items()):
        log(f"pergroup:Q {role} values:{values:.0f} bytes:{bits / 8:.0f} bits_per_value:{bits / values:.4f} "
            f"order0_entropy:{entropy / values:.4f}")
    log(f"pergroup:Q {stats['q_raw']} raw → {stats['q_bytes']} (rans) "
        f"({100 * stats['q_bytes'] / stats['q_raw']:.1f}%)")
    log(f"pergroup:remainder {stats['remainder_raw']} raw → {stats['remainder_bytes']} brotli")
    log(f"pergroup:total frame {len(blob)} bytes")
    shipped_dir = Path(h.quantized_model_path).resolve().parent / "submission"
    code = write_shipped_code(code_dir or Path(__file__).resolve().parent, shipped_dir)
    total = len(blob) + sum(code.values())
    log(f"Code size: {sum(code.values())} bytes (shipped, compressed: {' '.join(f'{n}:{b}' for n, b in code.items())})")
    log(f"Serialized model quantized+pergroup: {len(blob)} bytes")
    log(f"Total submission size quantized+pergroup: {total} bytes")
    if total > MAX_SUBMISSION_BYTES:
        over = (f"total submission size {total} bytes exceeds the {MAX_SUBMISSION_BYTES}-byte cap by "
                f"{total - MAX_SUBMISSION_BYTES}")
        if not h.allow_oversize_artifact:
            raise ValueError(f"artifact: {over} (ALLOW_OVERSIZE_ARTIFACT=1 only warns, for development runs)")
        log(f"WARNING artifact: {over}; allowed by ALLOW_OVERSIZE_ARTIFACT=1, not a valid submission")
    Path(h.quantized_model_path).write_bytes(blob)
    seconds = time.perf_counter() - start
    log(f"artifact:written path:{h.quantized_model_path} gptq:{gptq_s:.1f}s pack:{seconds - gptq_s:.1f}s")
    return {"bytes_model": len(blob), "bytes_code": sum(code.values()), "bytes_total": total,
            "quantize_seconds": seconds}


def calibration_loader(h: Hyperparameters, rank: int, world_size: int) -> CalibrationLoader:
    """This rank's calibration windows: GPTQ_CALIBRATION_BATCHES batches of one micro-batch's sequences each."""
    num_seqs = h.train_batch_tokens // MICRO_BATCHES // h.train_seq_len
    return CalibrationLoader(train_shard_files(h.data_path), rank, world_size, h.train_seq_len, num_seqs, h.vocab_size)


def calibration_reserve_seconds(model: nn.Module, h: Hyperparameters, rank: int, world_size: int,
                                device: torch.device, margin: float = 1.25) -> tuple[float, float]:
    """(reserve, seconds per batch): the slowest rank's second calibration batch (the first warms up the allocator
    and cuBLAS) x gptq_calibration_batches x margin + 1 s (all-reduce, loader). Measured before training."""
    loader = calibration_loader(h, rank, world_size)
    collect_hessians(model, loader, 1, device)
    per_batch = torch.tensor(collect_hessians(model, loader, 1, device)[1]["seconds"], device=device)
    if world_size > 1:
        dist.all_reduce(per_batch, op=dist.ReduceOp.MAX)
    return per_batch.item() * h.gptq_calibration_batches * margin + 1.0, per_batch.item()


def quantize_and_write_artifact(model: nn.Module, h: Hyperparameters, rank: int, world_size: int,
                                device: torch.device, log) -> dict:
    """Hessians from every rank's training shards, summed; rank 0 alone quantizes and writes (seconds on the GPU; one
    writer: nothing can differ between ranks). Calibration reads training data, so it stops at gptq_reserve_seconds."""
    start = time.perf_counter()
    log("GPTQ:collecting Hessians from calibration data...")
    loader = calibration_loader(h, rank, world_size)
    deadline = start + h.gptq_reserve_seconds if h.max_wallclock_seconds > 0 <= h.gptq_reserve_seconds else None
    hessians, calib = collect_hessians(model, loader, h.gptq_calibration_batches, device, deadline)
    calib_s = time.perf_counter() - start
    log(f"GPTQ:collected {len(hessians)} Hessians in {calib_s:.1f}s batches:{calib['batches_total']} "
        f"tokens:{calib['tokens_total']} world_size:{world_size} gptq_reserve_seconds:{h.gptq_reserve_seconds}")
    if calib["batches_local"] < h.gptq_calibration_batches:
        log(f"WARNING GPTQ: calibration stopped after {calib['batches_local']}/{h.gptq_calibration_batches} batches "
            f"on rank {rank}: gptq_reserve_seconds={h.gptq_reserve_seconds} is too small for this machine")
    result = {"calibration_seconds": calib_s, **calib}
    if rank == 0:
        result.update(write_artifact(model, hessians, h, device, log))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return result


def load_quantized_model(path: str | os.PathLike, h: Hyperparameters, device: torch.device) -> GPT:
    """The eval model from the artifact alone: build_model's GPT with the dequantized weights (computed in fp32 on
    the CPU, so that every reader gets the same bits), looping on as in the record's eval model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: quantized model artifact not found (QUANTIZED_MODEL_PATH)")
    qw = decode_artifact(path.read_bytes(), str(path))
    model = build_model(h, device, log=lambda message: None)
    template = model.state_dict()
    model.load_state_dict(rebank_state_dict(qw.dequantize(unbank_state_dict(template)), template), strict=True)
    model.set_looping(True)
    return model


def evaluate_artifact(h: Hyperparameters, val: ValidationData, rank: int, world_size: int, device: torch.device,
                      log) -> tuple[float, float, float]:
    """The `diagnostic quantized` eval of the model read back from the artifact file -> (loss, bpb, seconds)."""
    start = time.perf_counter()
    model = load_quantized_model(h.quantized_model_path, h, device)
    log(f"artifact:loaded path:{h.quantized_model_path} time:{time.perf_counter() - start:.1f}s")
    synchronize(device)
    start = time.perf_counter()
    val_loss, val_bpb = evaluate_bpb(model, val, h, rank, world_size, device, log)
    seconds = time.perf_counter() - start
    log(f"diagnostic quantized val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{1000 * seconds:.0f}ms")
    return val_loss, val_bpb, seconds


def write_submission_json(path: str | os.PathLike, device: torch.device, world_size: int, **fields) -> None:
    """submission.json: the caller's fields (val_bpb, bytes_total, steps, seed, ...) plus the hardware."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    Path(path).write_text(json.dumps({**fields, "hardware": f"{world_size}x {gpu}"}, indent=2) + "\n")


# === evaluation ===


def evaluate_bpb(model: nn.Module, val: ValidationData, h: Hyperparameters, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), log=None) -> tuple[float, float]:
    """Diagnostic eval, no TTT -> (val_loss, val_bpb): each target 1..N once (the reference drops ~235k, spec 01 §6)."""
    seq_len = h.eval_seq_len
    if val.num_targets % seq_len:
        raise ValueError(f"validation: {val.num_targets} targets is not a multiple of EVAL_SEQ_LEN={seq_len} "
                         f"(load_validation truncates the stream for this seq_len)")
    num_rows = val.num_targets // seq_len
    first, end = num_rows * rank // world_size, num_rows * (rank + 1) // world_size
    rows_per_batch = max(1, h.val_batch_tokens // (MICRO_BATCHES * seq_len))
    padded_len = rows_per_batch * seq_len  # one shape for every batch, the last too: padded with BOS, not scored
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss (nats), bytes, scored targets
    progress = Progress("eval", end - first, log, enabled=rank == 0 and log is not None, unit=" rows")
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device):
        for row in range(first, end, rows_per_batch):
            a, b = row * seq_len, min(row + rows_per_batch, end) * seq_len
            inputs = val.tokens[a:b]  # segments at every BOS and row start
            starts = np.union1d(np.arange(0, padded_len, seq_len), np.flatnonzero(inputs.numpy() == BOS_ID))
            cu_seqlens = torch.from_numpy(build_cu_seqlens(starts, padded_len, seq_len)[0]).to(device)
            padded = F.pad(inputs, (0, padded_len - inputs.numel()), value=BOS_ID)[None].to(device)
            logits = model.forward_logits(padded, fit_cu_seqlens(cu_seqlens, padded_len), seq_len)[0, :b - a]
            losses = F.cross_entropy(logits.float(), val.tokens[a + 1:b + 1].to(device), reduction="none")
            sums[0] += losses.sum(dtype=torch.float64)
            sums[1] += val.token_bytes[a + 1:b + 1].sum(dtype=torch.float64).to(device)
            sums[2] += b - a
            progress.update(b // seq_len - first)
    progress.close()
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    loss_sum, byte_sum, count = sums.tolist()
    if int(count) != val.num_targets:
        raise RuntimeError(f"diagnostic eval scored {int(count)} targets, expected every one of {val.num_targets}")
    return loss_sum / count, bits_per_byte(loss_sum, byte_sum)


# Phased score-first TTT + n-gram tilt (spec 04) in ONE causal order (fixes spec 04 Q8): the first
# PHASED_TTT_PREFIX_DOCS documents are scored, the global SGD phase trains on exactly them, then the rest are scored,
# each part longest first, in batches. Hints follow this order and each batch starts from fresh adapters (no
# warm-start A, Q7), so a score depends only on tokens scored before it; batches are split statically over ranks.

LORA_OUTPUTS = ("q", "v", "o", "mlp")  # per block visit (record: TTT_K_LORA=0), plus one on the head
TTT_MIN_ROWS = 2  # rows per chunk step at least: dynamo specializes size-1 dims, a 1-row step is a graph of its own
# A chunk step's fixed cost in row tokens, from bench/ttt_cost_model.py's H100 fits: replayed from a CUDA graph
# 5.6 ms at 588k row tokens/s; launched 82.3 ms (host-bound) at 716k/s.
TTT_STEP_COST = {True: 3_300, False: 59_000}
TTT_LOG_EVERY_S = 15.0


def find_documents(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(BOS position, target count) per document: its targets run to the next BOS inclusive (spec 04 §2.1)."""
    if tokens.size < 2 or tokens[0] != BOS_ID:
        raise ValueError(f"validation stream: must start with BOS {BOS_ID}, found {tokens[:1].tolist()}")
    starts = np.flatnonzero(tokens[:-1] == BOS_ID)
    return starts, np.diff(np.append(starts, tokens.size - 1))


def ttt_schedule(num_targets: np.ndarray, prefix_docs: int, batch_size: int) -> tuple[list[np.ndarray], int]:
    """The scoring order: batches of document indices, and how many of them hold the prefix documents."""
    split, batches = min(prefix_docs, len(num_targets)), []
    for part in (np.arange(split), np.arange(split, len(num_targets))):
        part = part[np.argsort(-num_targets[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return batches, -(-split // batch_size)


def ordered_stream(starts, num_targets, docs) -> tuple[np.ndarray, np.ndarray]:
    """Stream positions of documents `docs` (BOS to last target) concatenated, and the mask of their targets."""
    lengths = num_targets[docs] + 1
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.arange(first.size)
    return np.repeat(starts[docs], lengths) + index - first, index != first


def ordered_hints(tokens, starts, num_targets, docs, h: Hyperparameters) -> np.ndarray:
    """int32 [N] n-gram hint per target in scoring order (-1: not gated), one pass over the scoring order."""
    positions, is_target = ordered_stream(starts, num_targets, docs)
    hint, gate = ngram.token_hints(tokens[positions], h.token_order, h.token_threshold)
    return np.where(gate, hint, -1)[is_target].astype(np.int32)


def chunk_plan(num_targets: np.ndarray, h: Hyperparameters) -> list[tuple[int, int, int]]:
    """(rows scored, rows trained, window width) per chunk step of one batch (documents longest first): ended rows
    drop out (the reference runs them as padding); a row trains on chunk c if its document goes on (spec 04 §3.4)."""
    chunk, steps = h.ttt_chunk_size, -(-num_targets // h.ttt_chunk_size)
    return [(int((steps > c).sum()), int((steps > c + 1).sum()), min(chunk * (c + 1), h.ttt_eval_seq_len))
            for c in range(int(steps.max()))]


def chunk_window(num_targets: torch.Tensor, c: int, chunk: int, max_len: int) -> tuple[torch.Tensor, ...]:
    """Chunk c (spec 04 §2.4): per row the input window [start, end), and `first`: targets first+1 .. end scored."""
    end = num_targets.clamp(max=chunk * (c + 1))
    return (end - max_len).clamp(min=0), end, chunk * c


def step_shape(rows: int, width: int, h: Hyperparameters, graphed: bool) -> tuple[int, int]:
    """(rows, width) of a chunk step as run: >= TTT_MIN_ROWS rows, with CUDA graphs rounded up to few shapes. Extra
    rows are not scored; extra columns lie after every scored position, which causal attention never reads."""
    rows = max(rows, TTT_MIN_ROWS)
    if not graphed:
        return rows, width
    rows = min(1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8, max(h.ttt_batch_size, TTT_MIN_ROWS))
    return rows, min(-(-width // 128) * 128, h.ttt_eval_seq_len)


def step_row_tokens(num_targets: np.ndarray, h: Hyperparameters, graphed: bool) -> list[int]:
    """Row tokens through the model per chunk step of one batch (documents longest first), as run (step_shape)."""
    return [math.prod(step_shape(rows, width, h, graphed)) for rows, _, width in chunk_plan(num_targets, h)]


def batch_cost(num_targets: np.ndarray, h: Hyperparameters, graphed: bool = False) -> int:
    return sum(tokens + TTT_STEP_COST[graphed] for tokens in step_row_tokens(num_targets, h, graphed))


def assign_batches(batch_ids, costs: list[int], world_size: int) -> list[list[int]]:
    """Batches per rank, the same on every rank: longest processing time first on the estimated work."""
    load, shares = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(batch_ids, key=lambda i: -costs[i]):
        rank = load.index(min(load))
        load[rank] += costs[i]
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def ttt_logits(hidden, cols, weight, head: dict, softcap_pos, softcap_neg) -> torch.Tensor:
    """fp32 eval logits (forward_logits' head + adapter) at columns cols [rows, chunk] of hidden [rows, width, d]."""
    hidden = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.size(-1)))
    logits = add_lora(F.linear(hidden, weight.to(hidden.dtype)), hidden, head, "head")
    return asym_softcap(logits, softcap_pos, softcap_neg).float()


def ttt_token_losses(hidden, cols, weight, head, softcap_pos, softcap_neg, targets, hints):
    """(nll of the targets, log p of the hints) [rows, chunk], fp32. One function, compiled as one graph."""
    logits = ttt_logits(hidden, cols, weight, head, softcap_pos, softcap_neg)
    lse = torch.logsumexp(logits, dim=-1)
    return lse - logits.gather(-1, targets[..., None])[..., 0], logits.gather(-1, hints[..., None])[..., 0] - lse


def with_dynamic_sizes(fn, dims: dict[str, tuple[int, ...]]):
    """fn, which marks the listed dims of the named arguments' tensors (nested too) dynamic before each call."""
    signature = inspect.signature(fn)

    def call(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        for name, marked in dims.items():
            for leaf in torch.utils._pytree.tree_leaves(arguments.get(name)):
                for dim in marked if isinstance(leaf, torch.Tensor) else ():
                    torch._dynamo.maybe_mark_dynamic(leaf, dim)
        return fn(*args, **kwargs)
    return call


class BatchedLoRA:
    """Adapters of one batch (spec 04 §3.1): row b of each A [rows, r, d] and B [rows, out, r] is document b's, and
    their AdamW (torch's formula, decoupled decay) runs on the rows still training only."""

    def __init__(self, model: GPT, rows: int, h: Hyperparameters, device: torch.device):
        d, r = model.tok_emb.embedding_dim, h.ttt_lora_rank
        outputs = {"q": d, "v": model.kv_bank.size(1), "o": d, "mlp": d}

        def pair(out):  # (A^T, B^T), see add_lora
            return tuple(torch.zeros(n, device=device) for n in ((rows, d, r), (rows, r, out)))
        self.visits = [{name: pair(outputs[name]) for name in LORA_OUTPUTS} for part in model.schedule() for _ in part]
        self.head = pair(model.tok_emb.num_embeddings)
        self.tensors = [t for visit in self.visits for p in visit.values() for t in p] + list(self.head)
        self.square_avg = [torch.zeros_like(t) for t in self.tensors]
        self.avg = [torch.zeros_like(t) for t in self.tensors]  # the fused AdamW keeps it even at beta1 = 0
        self.scale, self.bound, self.device, self.h, self.rows = h.ttt_lora_alpha / r, d ** -0.5, device, h, rows
        self.step = torch.ones((), device=device)  # AdamW's step count, read on the device (graph replays)
        self.leaves: list[torch.Tensor] = []

    @torch.no_grad()
    def reset(self, batch_index: int) -> None:
        """A ~ U(+-1/sqrt(d)) seeded by (seed, batch): the same on any rank; B = 0; no AdamW state."""
        generator = torch.Generator(self.device).manual_seed(self.h.seed * 1_000_003 + batch_index)
        for a, b in zip(self.tensors[::2], self.tensors[1::2]):
            a.uniform_(-self.bound, self.bound, generator=generator)
            b.zero_()
        torch._foreach_zero_(self.square_avg + self.avg)

    def adapters(self, rows: int) -> tuple[list[dict], dict]:
        """Fresh autograd leaves on the first `rows` rows: ([{name: (A^T, B^T, scale)} per visit], {"head": ...})."""
        self.leaves = [t[:rows].detach().requires_grad_() for t in self.tensors]
        pairs = iter(zip(self.leaves[::2], self.leaves[1::2]))
        visits = [{name: (*next(pairs), self.scale) for name in visit} for visit in self.visits]
        return visits, {"head": (*next(pairs), self.scale)}

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """AdamW step `step` (1-based) into the device scalar that a CUDA graph of update() reads."""
        self.step.fill_(step)

    @torch.no_grad()
    def update(self, rows: int) -> None:
        """AdamW (torch's, decoupled decay) on the first `rows` rows (all at one step: rows train on a prefix of their
        chunks), fused: one pass over the 1.5 GB of adapters and state at the record's size, where the foreach
        form made ~20 (6% of a chunk step, H100). Drops the grads."""
        h, n = self.h, len(self.tensors)
        torch._fused_adamw_([t[:rows] for t in self.tensors], [t.grad[:rows] for t in self.leaves],
                            [t[:rows] for t in self.avg], [t[:rows] for t in self.square_avg], [], [self.step] * n,
                            lr=h.ttt_lora_lr, beta1=h.ttt_beta1, beta2=h.ttt_beta2, weight_decay=h.ttt_weight_decay,
                            eps=1e-10, amsgrad=False, maximize=False)
        for leaf in self.leaves:
            leaf.grad = None


class TTTData:
    """The val stream, its bytes and the scoring-order hints on the device, cut into rows of documents."""

    def __init__(self, val: ValidationData, starts, num_targets, docs, hints: torch.Tensor, device: torch.device):
        self.tokens, self.bytes, self.hints = val.tokens.to(device), val.token_bytes.to(device), hints
        self.starts, self.num_targets, self.device = starts, num_targets, device
        self.hint_offset = np.zeros_like(starts)
        self.hint_offset[docs] = np.cumsum(num_targets[docs]) - num_targets[docs]

    def rows(self, docs: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One row per document, by position (0 = BOS): tokens, target bytes, hints (-1 off targets); count, start."""
        def column(values):
            return torch.as_tensor(values[docs], device=self.device)[:, None]
        start, count, offset = column(self.starts), column(self.num_targets), column(self.hint_offset)
        pos = torch.arange(int(self.num_targets[docs].max()) + 1, device=self.device)
        inside, target, last = pos <= count, (pos <= count) & (pos > 0), self.tokens.numel() - 1
        tokens = torch.where(inside, self.tokens[(start + pos).clamp(max=last)], 0)
        nbytes = torch.where(target, self.bytes[(start + pos).clamp(max=last)], 0)
        hints = torch.where(target, self.hints[(offset + pos - 1).clamp(0, last - 1)].long(), -1)
        return tokens, nbytes, hints, count[:, 0], start[:, 0]


def synthetic_ttt_data(lengths: list[int], vocab: int, generator, device: torch.device) -> TTTData:
    """Random documents of these target counts with random hints, as TTTData (warm-up and benchmarks)."""
    tokens = torch.randint(2, vocab, (sum(lengths) + 1,), generator=generator)
    tokens[np.cumsum([0] + lengths[:-1])] = BOS_ID
    starts, num_targets = find_documents(tokens.numpy())
    hints = torch.randint(-1, vocab, (int(num_targets.sum()),), generator=generator, dtype=torch.int32)
    synthetic = ValidationData(tokens, torch.ones_like(tokens, dtype=torch.int32))
    return TTTData(synthetic, starts, num_targets, np.arange(len(starts)), hints.to(device), device)


class PhasedTTT:
    """The phased TTT eval of one model (spec 04): warm_up() compiles, run(val) scores."""

    def __init__(self, model: GPT, h: Hyperparameters, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), log=None):
        if not 0 < h.ttt_chunk_size <= h.ttt_eval_seq_len or h.ttt_batch_size < 1:
            raise ValueError(f"Hyperparameters: need 0 < TTT_CHUNK_SIZE={h.ttt_chunk_size} <= TTT_EVAL_SEQ_LEN="
                             f"{h.ttt_eval_seq_len} and TTT_BATCH_SIZE={h.ttt_batch_size} >= 1")
        self.model, self.h, self.rank, self.world_size, self.device = model, h, rank, world_size, device
        self.log = log or (lambda message: None)
        model.set_looping(True)
        model.requires_grad_(False)
        self.lora = BatchedLoRA(model, max(h.ttt_batch_size, TTT_MIN_ROWS), h, device)
        self.boost = torch.tensor(h.token_boost, device=device)  # a tensor: no host sync per step
        self.token_losses = ttt_token_losses
        self.graphs = {} if device.type == "cuda" and h.ttt_cuda_graphs else None
        # Autocast's weight cache would outlive a graph capture (torch.cuda.graph's documented restriction).
        self.autocast = (functools.partial(torch.autocast, "cuda", torch.bfloat16, cache_enabled=False)
                         if device.type == "cuda" else contextlib.nullcontext)
        self.graph_pool, self.capture_seconds = torch.cuda.graph_pool_handle() if self.graphs is not None else None, 0.0
        self.capture_stream = torch.cuda.Stream(device) if self.graphs is not None else None
        if device.type == "cuda":
            # Rows and window width vary per step: they are marked dynamic before every call, so that each graph
            # compiles once with only those sizes symbolic. Cold warm-up (H100): 88 s; 209 s with dynamic=True (every
            # size symbolic); 131.8 s with automatic dynamic alone (static first, then again with the sizes changed).
            torch.fx.experimental._config.use_duck_shape = False  # equal sizes (chunk = width) must not become guards
            def dynamic(fn, **dims):
                return with_dynamic_sizes(torch.compile(fn, dynamic=None, fullgraph=True), dims)
            rows, rows_width = (0,), (0, 1)
            block = dict(x=rows_width, x0=rows_width, lane1=rows_width, attn_args=rows, lora=rows)  # attn_args: rope
            # The skips and the final norm stay eager (replayed from CUDA graphs, their kernels cost little there;
            # compiled, they added 20 s of warm-up and 4 s of captures on the H100).
            model.lora_path = (dynamic(GPT.embed.__get__(model), input_ids=rows_width),  # the uncompiled methods
                               [dynamic(b.forward, **block) for b in model.blocks],
                               GPT.skip_mix.__get__(model), GPT.final_norm.__get__(model))
            self.token_losses = dynamic(ttt_token_losses, hidden=rows_width, cols=rows, head=rows, targets=rows,
                                        hints=rows)

    def step(self, x, cols, y, hints, scored, nbytes, positions, training, update_rows: int, trace=None):
        """Score a chunk of every row (tilted, spec 04 §5), then one AdamW step (numbered by set_step) on the untilted
        nll of the rows `training` [rows] marks (spec 04 §3.4); it updates rows [0, update_rows), a superset (0: none).
        x [rows, width] windows, cols [rows, chunk] the chunk's columns -> fp64 [4] sums: loss, bytes, count, pos."""
        model = self.model
        visits, head = self.lora.adapters(x.size(0))
        with self.autocast():
            hidden = model.forward_hidden(x, lora=visits)
            nll, log_q_hint = self.token_losses(hidden, cols, model.tok_emb.weight, head, model.softcap_pos,
                                                model.softcap_neg, y, hints.clamp(min=0))
        score = ngram.tilt_nll(nll.detach(), log_q_hint.detach(), y, hints, hints >= 0, self.boost)
        sums = torch.stack([(score.double() * scored).sum(), (nbytes * scored).sum(dtype=torch.float64),
                            scored.sum(dtype=torch.float64), (positions * scored).sum(dtype=torch.float64)])
        if trace is not None:
            with torch.no_grad():
                logits = ttt_logits(hidden, cols, model.tok_emb.weight, head, model.softcap_pos, model.softcap_neg)
            trace(dict(position=positions[scored], score=score[scored], target=y[scored], hint=hints[scored],
                       log_probs=torch.log_softmax(logits[scored], dim=-1)))
        if update_rows:
            ((nll * (scored & training[:, None])).sum() / self.h.ttt_chunk_size).backward()
            self.lora.update(update_rows)
        return sums

    def graphed_step(self, args: tuple, update: bool) -> torch.Tensor:
        """step() replayed from a CUDA graph, one per (rows, width, update) shape, captured at its first use into
        one shared memory pool: a small step is ~1,000 kernel launches and was bound by the host, not the GPU."""
        x, key = args[0], (*args[0].shape, update)
        if key not in self.graphs:
            start, inputs, graph = time.perf_counter(), [a.clone() for a in args], torch.cuda.CUDAGraph()
            self.model.constants(x.size(1), x.device)  # built from host values: not inside a capture
            update_rows = x.size(0) if update else 0
            self.graphs[key] = (graph, inputs, self.capture(graph, lambda: self.step(*inputs, update_rows)))
            self.capture_seconds += time.perf_counter() - start
        graph, inputs, sums = self.graphs[key]
        for static, value in zip(inputs, args):
            static.copy_(value)
        graph.replay()
        return sums

    def capture(self, graph: torch.cuda.CUDAGraph, record):
        """record() captured into graph, in the shared pool, on one capture stream (the allocator keeps a block for
        the stream it was made on). Not torch.cuda.graph(): it also synchronizes, collects garbage and empties the
        allocator's cache at each capture, and the timed eval captures ~100 graphs."""
        self.capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.capture_stream):
            graph.capture_begin(pool=self.graph_pool, capture_error_mode=CAPTURE_ERROR_MODE)
            try:
                result = record()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.capture_stream)
        return result

    def reserve_graph_memory(self) -> int:
        """Give the graphs' shared pool one block of 1.1x the largest step's memory (all rows, the longest window,
        with its update; run once here): every capture then splits that block. Without it each wider step's capture
        added segments of its own (57 GB of pool on 2,000 documents). -> the block's bytes."""
        rows, width, chunk, device = self.lora.rows, self.h.ttt_eval_seq_len, self.h.ttt_chunk_size, self.device
        x = torch.randint(2, self.model.tok_emb.num_embeddings, (rows, width), device=device)
        cols = torch.arange(width - chunk, width, device=device).repeat(rows, 1)  # not expand: a stride is a guard
        on = torch.ones_like(cols, dtype=torch.bool)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        self.lora.set_step(1)
        targets = x[:, -chunk:].contiguous()  # as score_batch's (a strided one compiled the token losses again)
        self.step(x, cols, targets, targets, on, on.int(), cols, on[:, 0], rows)
        size = int(1.1 * (torch.cuda.max_memory_allocated(device) - base))
        torch.cuda.empty_cache()  # the step's freed memory goes back to the device, for the block
        self.pool_holder = torch.cuda.CUDAGraph()
        self.capture(self.pool_holder, lambda: torch.empty(size, dtype=torch.uint8, device=device)[:1].zero_())
        return size

    def graph_report(self) -> str:
        return "" if self.graphs is None else f" cuda_graphs:{len(self.graphs)} capture:{self.capture_seconds:.1f}s"

    def step_shape(self, rows: int, width: int) -> tuple[int, int]:
        return step_shape(rows, width, self.h, self.graphs is not None)

    def score_batch(self, data: TTTData, index: int, docs: np.ndarray, sums, trace=None) -> None:
        """Every chunk of one batch of documents (longest first), from fresh adapters."""
        h, chunk, graphed = self.h, self.h.ttt_chunk_size, self.graphs is not None and trace is None
        self.lora.reset(index)
        # Rows past the live ones (an ended or a repeated document) fill up the step's rows and are never scored.
        tokens, nbytes, hints, count, stream_start = data.rows(np.resize(docs, self.step_shape(len(docs), 1)[0]))
        longest, span = tokens.size(1) - 1, torch.arange(chunk, device=self.device)
        for c, (live, trained, width) in enumerate(chunk_plan(data.num_targets[docs], h)):
            rows, width = self.step_shape(live, width)
            start, end, first = chunk_window(count[:rows], c, chunk, h.ttt_eval_seq_len)
            window = start[:, None] + torch.arange(width, device=self.device)
            x = torch.where(window < end[:, None], tokens[:rows].gather(1, window.clamp(max=longest)), 0)
            row = torch.arange(rows, device=self.device)
            scored = ((first + span)[None] < end[:, None]) & (row < live)[:, None]
            at = (first + 1 + span).clamp(max=longest).expand(rows, -1)  # the chunk's targets, document positions
            cols = ((first - start)[:, None] + span).clamp(max=width - 1)
            args = (x, cols, tokens[:rows].gather(1, at), hints[:rows].gather(1, at), scored,
                    nbytes[:rows].gather(1, at), stream_start[:rows, None] + at, row < trained)
            self.lora.set_step(c + 1)
            sums += self.graphed_step(args, trained > 0) if graphed else self.step(*args, trained, trace)

    def global_phase(self, tokens: torch.Tensor, num_targets: int, log=None) -> None:
        """Spec 04 §4.3 on targets 1..num_targets (the prefix documents): clipped momentum SGD on all weights, cosine
        lr, rows split over ranks (the same math on any count); softcap_pos/neg get no gradient (fixed softcap, Q3)."""
        h, start, length = self.h, time.perf_counter(), self.h.ttt_eval_seq_len
        steps, params, last_line = -(-num_targets // h.global_ttt_chunk_tokens), list(self.model.parameters()), start
        self.model.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=h.global_ttt_lr, momentum=h.global_ttt_momentum)
        for k in range(steps):
            a, b = k * num_targets // steps, (k + 1) * num_targets // steps
            rows = -(-(b - a) // length)
            for row in range(rows * self.rank // self.world_size, rows * (self.rank + 1) // self.world_size):
                lo, hi = a + row * length, min(a + (row + 1) * length, b)
                self.global_loss(tokens[lo:hi + 1]).mul((hi - lo) / (b - a)).backward()
            for p in params:  # a rank without rows adds zeros
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                if self.world_size > 1:
                    dist.all_reduce(p.grad)
            torch.nn.utils.clip_grad_norm_(params, h.global_ttt_grad_clip)
            optimizer.param_groups[0]["lr"] = h.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * k / steps))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None and (time.perf_counter() - last_line >= TTT_LOG_EVERY_S or k + 1 == steps):
                last_line = time.perf_counter()
                log(f"ttt_global step:{k + 1}/{steps} lr:{optimizer.param_groups[0]['lr']:.6f} "
                    f"elapsed:{last_line - start:.1f}s")
        self.model.requires_grad_(False)

    def global_loss(self, span: torch.Tensor) -> torch.Tensor:
        """Mean training loss of span[:-1] -> span[1:], one row (<= ttt_eval_seq_len targets), segments at BOS. Eager:
        compiling it cost ~30 s of warm-up (H100, cold), more than the whole phase runs."""
        inputs, targets, n = span[:-1], span[1:], span.numel() - 1
        starts = np.flatnonzero(inputs.numpy() == BOS_ID)
        cu_seqlens = torch.from_numpy(build_cu_seqlens(starts, n, n)[0]).to(self.device)
        with autocast(self.device), torch.compiler.set_stance("force_eager"):
            return self.model(inputs[None].to(self.device), targets[None].to(self.device),
                              fit_cu_seqlens(cu_seqlens, n), n)

    @torch.no_grad()
    def hints(self, tokens: np.ndarray, starts, num_targets, docs) -> torch.Tensor:
        """Scoring-order hints on the device: built on rank 0 with all its cores, then broadcast (spec 04 §5.5)."""
        hints = torch.full((int(num_targets.sum()),), -1, dtype=torch.int32, device=self.device)
        if not self.h.ngram_tilt_enabled:
            return hints
        start = time.perf_counter()
        if self.rank == 0:
            hints.copy_(torch.from_numpy(ordered_hints(tokens, starts, num_targets, docs, self.h)))
            gated = int((hints >= 0).sum())
            self.log(f"ngram_tilt:hints total={hints.numel()} gated={gated} token_gate={gated}")
        if self.world_size > 1:
            dist.broadcast(hints, 0)
        synchronize(self.device)
        self.log(f"ngram_tilt:precompute_done elapsed={time.perf_counter() - start:.2f}s total_targets={hints.numel()}")
        return hints

    def warm_up(self) -> float:
        """Compile and capture every graph of the timed pass, on random documents (weights untouched)."""
        h, vocab, device, chunk = self.h, self.model.tok_emb.num_embeddings, self.device, self.h.ttt_chunk_size
        synchronize(device)
        start, generator = time.perf_counter(), torch.Generator().manual_seed(h.seed)
        lengths = [h.ttt_eval_seq_len + 2 * chunk, 3 * chunk] + [chunk] * (h.ttt_batch_size - 2)
        data = synthetic_ttt_data(lengths, vocab, generator, device)
        graphs, self.graphs = self.graphs, None  # compiling cannot happen inside a capture
        self.score_batch(data, 0, np.arange(len(lengths)), torch.zeros(4, dtype=torch.float64, device=device))
        if graphs is not None:
            pool = self.reserve_graph_memory()
            self.graphs = graphs
            self.score_batch(data, 0, np.arange(len(lengths)), torch.zeros(4, dtype=torch.float64, device=device))
            self.log(f"ttt_eval:cuda_graph_pool {pool / 2**30:.1f}GiB")
        synchronize(device)
        steps_seconds = time.perf_counter() - start
        self.model.requires_grad_(True)
        self.global_loss(torch.randint(2, vocab, (h.ttt_eval_seq_len + 1,), generator=generator)).backward()
        self.model.zero_grad(set_to_none=True)
        self.model.requires_grad_(False)
        synchronize(device)
        seconds = time.perf_counter() - start
        self.log(f"ttt_eval:warmup docs:{len(lengths)} longest:{lengths[0]} global_row:{h.ttt_eval_seq_len} "
                 f"time:{seconds:.1f}s (chunk steps {steps_seconds:.1f}s) graphs:{compiled_graph_count()}"
                 f"{self.graph_report()}")
        return seconds

    def run(self, val: ValidationData, trace=None) -> tuple[float, float]:
        """(val_loss, val_bpb), each target 1..N scored once (count and position sum checked); trace: tests' hook."""
        h, tokens = self.h, val.tokens.numpy()
        starts, num_targets = find_documents(tokens)
        batches, num_prefix = ttt_schedule(num_targets, h.phased_ttt_prefix_docs, h.ttt_batch_size)
        docs = np.concatenate(batches)
        data = TTTData(val, starts, num_targets, docs, self.hints(tokens, starts, num_targets, docs), self.device)
        costs = [batch_cost(num_targets[batch], h, self.graphs is not None) for batch in batches]
        phases = [assign_batches(ids, costs, self.world_size)
                  for ids in (range(num_prefix), range(num_prefix, len(batches)))]
        prefix_docs = min(h.phased_ttt_prefix_docs, len(starts))
        global_targets = int(starts[prefix_docs]) if 0 < prefix_docs < len(starts) else 0
        self.log(f"ttt_phased: total_docs:{len(starts)} prefix_docs:{prefix_docs} suffix_docs:"
                 f"{len(starts) - prefix_docs} num_phases:1 batches:{len(batches)} global_targets:{global_targets} "
                 f"batches_per_rank:{[len(a) + len(b) for a, b in zip(*phases)]} lora_rank:{h.ttt_lora_rank} "
                 f"lora_scale:{h.ttt_lora_alpha / h.ttt_lora_rank:g} warm_start_a:0 progress:rank0")
        mine = [i for shares in phases for i in shares[self.rank]]
        total = (sum(len(batches[i]) for i in mine), sum(costs[i] for i in mine))
        bar = Progress("ttt_eval", total[0], self.log, self.rank == 0 and sys.stderr.isatty(), unit=" docs")
        sums, done, start = torch.zeros(4, dtype=torch.float64, device=self.device), (0, 0), time.perf_counter()
        self.last_line = start
        for phase, shares in enumerate(phases):
            if phase == 1 and global_targets:
                self.global_phase(val.tokens, global_targets, self.log)
            for i in shares[self.rank]:
                self.score_batch(data, i, batches[i], sums, trace)
                done = (done[0] + len(batches[i]), done[1] + costs[i])
                self.report(bar, done, total, sums, start)
        bar.close()
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, byte_sum, count, position_sum = sums.tolist()
        n = val.num_targets
        if count != n or position_sum != n * (n + 1) // 2:
            raise RuntimeError(f"TTT eval scored {count:.0f} targets with position sum {position_sum:.0f}; expected "
                               f"each of 1..{n} once (sum {n * (n + 1) // 2})")
        self.log(f"ttt_eval scored_targets:{int(count)} byte_sum:{int(byte_sum)}{self.graph_report()}")
        return loss_sum / count, bits_per_byte(loss_sum, byte_sum)

    def report(self, bar: Progress, done: tuple, total: tuple, sums: torch.Tensor, start: float) -> None:
        """Rank 0's progress, (docs, work) done of total: a tqdm bar on a TTY, else a line every TTT_LOG_EVERY_S."""
        now = time.perf_counter()
        if self.rank or (bar.bar is None and now - self.last_line < TTT_LOG_EVERY_S):
            return
        loss_sum, byte_sum = sums[:2].tolist()
        text = f"bpb:{loss_sum / (math.log(2.0) * max(byte_sum, 1.0)):.4f}"
        if bar.bar is not None:
            return bar.update(done[0], text)
        self.last_line = now
        eta = (now - start) * (total[1] - done[1]) / max(done[1], 1)
        self.log(f"ttt_eval docs:{done[0]}/{total[0]} {text} elapsed:{now - start:.0f}s eta:{eta:.0f}s")


def evaluate_ttt_phased(h: Hyperparameters, val: ValidationData, rank: int, world_size: int, device: torch.device,
                        log) -> tuple[float, float, float]:
    """The scored eval: warm-up, then timed: artifact load, n-gram hints, phased TTT -> (loss, bpb, timed seconds)."""
    if h.ngram_tilt_enabled and rank == 0:
        try:
            ngram.load_native()  # build the C helper before the timer
        except RuntimeError as error:
            log(f"ngram_tilt:warning {error} (the numpy fallback gives the same hints, slower)")
    ttt = PhasedTTT(build_model(h, device, log=lambda message: None), h, rank, world_size, device, log)
    warmup_seconds = ttt.warm_up()
    graphs = compiled_graph_count()
    log("")
    log("beginning TTT eval timer")
    synchronize(device)
    start = time.perf_counter()
    ttt.model.load_state_dict(load_quantized_model(h.quantized_model_path, h, device).state_dict())
    log(f"ttt_eval:artifact_loaded path:{h.quantized_model_path} time:{time.perf_counter() - start:.1f}s")
    val_loss, val_bpb = ttt.run(val)
    synchronize(device)
    seconds = time.perf_counter() - start
    if compiled_graph_count() != graphs:
        log(f"warning: {compiled_graph_count() - graphs} graph(s) compiled inside the timed eval")
    log(f"quantized_ttt_phased val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{1000 * seconds:.0f}ms")
    log(f"total_eval_time:{seconds:.1f}s warmup_time:{warmup_seconds:.1f}s")
    return val_loss, val_bpb, seconds


# === main ===
DEMO_DATA_PATH = "./data/demo"
# Standard-library modules whose pydoc pages form the demo corpus (~2 MB of English technical prose).
DEMO_MODULES = tuple(
    "argparse ast asyncio bisect builtins calendar collections configparser contextlib csv dataclasses datetime "
    "decimal difflib email.message enum fractions functools gzip hashlib heapq html.parser http.client inspect io "
    "ipaddress itertools json logging math operator os pathlib pickle pprint queue random re shutil socket "
    "sqlite3 statistics string struct subprocess tarfile textwrap threading time traceback typing unittest "
    "urllib.parse uuid warnings weakref zipfile".split())


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, world_size, local_rank, device): under torchrun a process per GPU (NCCL) or CPU (gloo), else one."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world_size not in (1, 2, 4, 8):
        raise ValueError(f"WORLD_SIZE={world_size}: a step is {MICRO_BATCHES} micro-batches split evenly over the "
                         f"ranks, so run 1, 2, 4 or 8 processes")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, local_rank, device


def configure_torch(device: torch.device) -> None:
    """TF32 for fp32 matmuls (spec 02 §2.11); dynamo cache room for a dozen per-block graphs on one call path."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024


def make_logger(h: Hyperparameters, rank: int):
    """log(message): rank 0 prints it and appends it to logs/<run_id>.txt; other ranks stay silent."""
    if rank != 0:
        return lambda message: None
    path = Path("logs") / f"{h.run_id or time.strftime('%Y%m%d_%H%M%S') + f'_seed{h.seed}'}.txt"
    path.parent.mkdir(exist_ok=True)
    file = path.open("a")

    def log(message: str) -> None:
        print(message, flush=True)
        print(message, file=file, flush=True)
    log(f"log_file:{path}")
    return log


def demo_corpus(modules=DEMO_MODULES) -> list[str]:
    """Documents that need no download: standard-library pydoc pages in ~4 KB pieces (fixed for one Python version)."""
    import importlib
    import pydoc
    docs = []
    for name in modules:
        text = re.sub(r" at 0x[0-9a-f]+", "", pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
        piece = ""
        for paragraph in re.split(r"\n\s*\n", text):
            piece += paragraph + "\n\n"
            if len(piece) >= 4000:
                docs.append(piece.strip())
                piece = ""
        docs.append(piece.strip())
    docs = [doc for doc in docs if doc]
    random.Random(0).shuffle(docs)
    return docs


def demo_hyperparameters(h: Hyperparameters) -> Hyperparameters:
    """The embedded demo: the record's pipeline at a size that trains in about a minute on 2 CPU cores. Width 192
    makes the MLP matrices (768 x 192) large enough for GPTQ + LQER rather than the float16 pass-through."""
    return dataclasses.replace(
        h, data_path=DEMO_DATA_PATH, num_layers=4, model_dim=192, num_heads=4, num_kv_heads=2, xsa_last_n=4,
        loop_start=1, loop_end=2, num_loops=1, parallel_start_layer=3, train_seq_len=256, eval_seq_len=256,
        train_batch_tokens=8 * 256, val_batch_tokens=8 * 16 * 256, max_wallclock_seconds=60.0, warmup_steps=0,
        val_loss_every=0, train_log_every=10, ema_decay=0.9,  # tens of steps: an EMA horizon of ~10 steps
        ttt_eval_seq_len=256, ttt_chunk_size=128, ttt_batch_size=4, ttt_lora_rank=8, phased_ttt_prefix_docs=4,
        global_ttt_chunk_tokens=2048)


def prepare_demo_data(h: Hyperparameters, log) -> None:
    """Write the demo corpus and turn it into shards with prepare_caseops_data.py (skipped when present)."""
    out = Path(h.data_path)
    if glob.glob(str(out / "fineweb_train_*.bin")):
        log(f"demo: reusing the shards in {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    docs = demo_corpus()
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    log(f"demo: {len(docs)} documents from the pydoc pages of {len(DEMO_MODULES)} standard-library modules")
    script = Path(__file__).resolve().parent / "prepare_caseops_data.py"
    command = [sys.executable, str(script), "--docs", str(out / "docs.jsonl"), "--out", str(out),
               "--val-docs", str(len(docs) // 50), "--tokenizer", h.tokenizer_path]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"demo data preparation failed ({' '.join(command)}):\n{done.stderr[-2000:]}")


def compile_model(model: GPT) -> None:
    """Each block compiled on its own: a dozen graphs compile far faster than whole-model variants (> 10 min cold,
    shared/GPU.md), and looping reuses them. The glue too: eager, the skips and the final norm cost ~7 ms a
    micro-step, and the softcapped CE materializes several [T, V] fp32 temporaries."""
    for block in model.blocks:
        block.compile(dynamic=False, fullgraph=True)
    for name in ("embed", "skip_mix", "final_norm", "training_loss"):
        setattr(model, name, torch.compile(getattr(model, name), dynamic=False, fullgraph=True))


def build_model(h: Hyperparameters, device: torch.device, log) -> GPT:
    """GPT(h), seeded and initialized on the CPU, on `device`. On CUDA the tied embedding is bf16 (the record's only
    bf16 parameter: the bf16 residual stream starts there, spec 02 §2.11, Q5) and the model is compiled."""
    random.seed(h.seed)
    np.random.seed(h.seed)
    torch.manual_seed(h.seed)
    model = GPT(h).to(device)
    if device.type == "cuda":
        model.tok_emb.to(torch.bfloat16)
        compile_model(model)
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    return model


def main() -> None:
    h = Hyperparameters.from_env()
    rank, world_size, _, device = setup_distributed()
    configure_torch(device)
    log = make_logger(h, rank)
    log(f"python:{sys.version.split()[0]} torch:{torch.__version__} device:{device} world_size:{world_size}")
    if h.data_path == Hyperparameters.data_path and not glob.glob(os.path.join(h.data_path, "fineweb_train_*.bin")):
        log(f"no training shards in {h.data_path} (the default DATA_PATH): running the embedded demo")
        h = demo_hyperparameters(h)
        if rank == 0:
            prepare_demo_data(h, log)
        if world_size > 1:
            dist.barrier()
    log_hyperparameters(h, log)
    import brotli  # noqa: F401  (pip: brotli==1.2.1): the compressors fail now, not after training
    import constriction  # noqa: F401  (pip: constriction==0.5.0)
    check_tokenizer_matches(h.tokenizer_path, h.data_path, h.vocab_size)
    train_files = [] if h.eval_only else train_shard_files(h.data_path)  # evaluation needs no training data
    log(f"train_shards:{len(train_files)}")
    val = load_validation(h.data_path, h.eval_seq_len, h.vocab_size)
    log(f"val_tokens:{val.num_targets}")
    if not h.eval_only:  # EVAL_ONLY=1 scores the artifact at QUANTIZED_MODEL_PATH in this fresh process, untrained
        model = build_model(h, device, log)
        if h.gptq_reserve_seconds < 0 and h.max_wallclock_seconds > 0:
            reserve, per_batch = calibration_reserve_seconds(model, h, rank, world_size, device)
            h = dataclasses.replace(h, gptq_reserve_seconds=round(reserve, 2))
            log(f"gptq:measured calibration batch:{per_batch:.3f}s x {h.gptq_calibration_batches} batches")
        trainer = Trainer(h, model, train_files, rank, world_size, device, log)
        log(f"gptq:reserving {h.gptq_reserve_seconds}s effective:{budget_ms(h):.0f}ms")
        trainer.warmup()
        ema = trainer.train(val)
        log("ema:applying EMA weights")
        ema.load_into(model)
        start = time.perf_counter()
        val_loss, val_bpb = evaluate_bpb(model, val, h, rank, world_size, device, log)
        log(f"diagnostic pre-quantization post-ema val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} "
            f"eval_time:{1000 * (time.perf_counter() - start):.0f}ms")
        artifact = quantize_and_write_artifact(model, h, rank, world_size, device, log)
    val_loss, val_bpb, eval_seconds = evaluate_artifact(h, val, rank, world_size, device, log)
    if h.ttt_enabled:
        val_loss, val_bpb, eval_seconds = evaluate_ttt_phased(h, val, rank, world_size, device, log)
    if rank == 0 and not h.eval_only:
        write_submission_json("submission.json", device, world_size, val_bpb=val_bpb, val_loss=val_loss,
                              bytes_total=artifact["bytes_total"], bytes_model=artifact["bytes_model"],
                              bytes_code=artifact["bytes_code"], steps=trainer.steps,
                              train_seconds=trainer.train_seconds + artifact["calibration_seconds"],
                              eval_seconds=eval_seconds, seed=h.seed)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
