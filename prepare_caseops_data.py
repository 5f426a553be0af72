"""Turn JSONL documents into the challenge's CaseOps token shards and validation byte sidecar.

Each document's `text` is CaseOps-encoded (lossless_caps.py), tokenized with a SentencePiece model and written
as BOS + ids (no EOS). The first --val-docs documents form the validation stream, with a per-token count of
ORIGINAL UTF-8 bytes (the BPB denominator); the rest form the training stream. Formats: shared/spec/01-data.md.

Usage:
    python prepare_caseops_data.py --docs docs.jsonl[.gz|.xz] --out OUTDIR --tokenizer MODEL [--val-docs 50000]
    python prepare_caseops_data.py --docs docs.jsonl.xz --out OUTDIR --train-tokenizer [--tokenizer-train-bytes B]
    python prepare_caseops_data.py --download --out OUTDIR [--train-shards 80]   # fetch the canonical export

OUTDIR receives fineweb_{train,val,val_bytes}_%06d.bin and manifest.json (and tokenizer.model when trained).
"""
import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import sys
import time
from collections import deque
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lossless_caps import CONTROL_SYMBOLS, encode as caseops_encode

TOOL_VERSION = "prepare_caseops_data 1"
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1
CHUNK_DOCS = 256  # documents per worker task
CANONICAL_REPO_ID = "romeerp/parameter-golf-caseops-v1"  # HF dataset that PR #2135's README downloads from
CANONICAL_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
CANONICAL_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
MAX_SENTENCE_BYTES = 4192  # the reference tokenizer's trainer setting; spm skips longer sentences
TOKENIZER_OPTIONS = dict(  # spec 01 section 2, read from the reference model's proto
    model_type="bpe", byte_fallback=True, split_digits=True, max_sentencepiece_length=16,
    character_coverage=0.999, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    remove_extra_whitespaces=True, hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    user_defined_symbols=list(CONTROL_SYMBOLS), seed_sentencepiece_size=1_000_000, shrinking_factor=0.75,
    max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=0, split_by_whitespace=True,
    split_by_unicode_script=True, split_by_number=True, treat_whitespace_as_suffix=False)


# === tokenizer ===
def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model and check the canonical CaseOps id layout (spec 01 section 2)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(Path(path).read_bytes())
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece
    want = ([(p, kind.CONTROL) for p in ("<pad>", "<s>", "</s>")] + [("<unk>", kind.UNKNOWN)]
            + [(c, kind.USER_DEFINED) for c in CONTROL_SYMBOLS] + [(f"<0x{b:02X}>", kind.BYTE) for b in range(256)])
    found = [(p.piece, p.type) for p in proto.pieces[:len(want)]] + [(None, None)] * len(want)
    for i, (got, expected) in enumerate(zip(found, want)):
        if got != expected:
            raise ValueError(f"{path}: piece id {i} is {got[0]!r} (type {got[1]}), expected {expected[0]!r} "
                             f"(type {expected[1]}) of the canonical CaseOps layout")
    if not proto.trainer_spec.byte_fallback or len(proto.pieces) > 65536:
        raise ValueError(f"{path}: need byte_fallback=true and <= 65536 pieces (uint16 shards), found "
                         f"byte_fallback={proto.trainer_spec.byte_fallback}, {len(proto.pieces)} pieces")
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def normalized_piece_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """UTF-8 length of each piece as it stands in the normalized text (a byte piece stands for 1 byte)."""
    return np.array([1 if sp.is_byte(i) else 0 if sp.is_control(i) else len(sp.id_to_piece(i).encode())
                     for i in range(sp.get_piece_size())], dtype=np.int64)


def training_sentences(encoded: str):
    """Cut a CaseOps-encoded document into training sentences of <= MAX_SENTENCE_BYTES at line breaks (kept
    inside a sentence, so line-initial words keep their '▁' as in real encoding); an overlong line at spaces."""
    for segment in _pack(encoded.split("\n"), "\n"):
        yield from [segment] if len(segment.encode()) <= MAX_SENTENCE_BYTES else _pack(segment.split(" "), " ")


def _pack(parts, sep):
    current, size = [], 0
    for part in parts:
        if current and size + len(part.encode()) + 1 > MAX_SENTENCE_BYTES:
            yield sep.join(current)
            current, size = [], 0
        current.append(part)
        size += len(part.encode()) + 1
    if current:
        yield sep.join(current)


def train_tokenizer(args, model_path: Path) -> None:
    """Train the CaseOps BPE tokenizer on the training documents (those after --val-docs), optionally capped."""
    docs = n_bytes = 0
    max_docs, max_bytes = args.tokenizer_train_docs or sys.maxsize, args.tokenizer_train_bytes or sys.maxsize

    def sentences():
        nonlocal docs, n_bytes
        for index, (lineno, line) in enumerate(iter_doc_lines(args.docs)):
            if index >= args.val_docs:
                if docs >= max_docs or n_bytes >= max_bytes:
                    return
                text = parse_doc(args.docs, lineno, line)
                docs, n_bytes = docs + 1, n_bytes + len(text.encode())
                yield from training_sentences(caseops_encode(text))

    start, model = time.perf_counter(), io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, vocab_size=args.vocab_size,
                                   num_threads=args.workers, **TOKENIZER_OPTIONS)
    model_path.write_bytes(model.getvalue())
    log(f"tokenizer trained docs:{docs} bytes:{n_bytes} vocab:{args.vocab_size} "
        f"time:{time.perf_counter() - start:.1f}s path:{model_path}")


# === byte sidecar ===
def piece_spans(sp, piece_bytes: np.ndarray, encoded_utf8: bytes):
    """Token ids of `encoded_utf8` and each piece's byte span [begin, end) in it (its surface): exactly the
    begin/end of sp.encode(..., out_type='proto'), computed from the same normalizer alignment without the proto
    (1.5x faster). Of the byte-fallback pieces of one character the last spans it, the others are empty."""
    normalized, norm_to_orig = sp.normalize(encoded_utf8, with_offsets=True)
    ids = sp.encode(encoded_utf8, out_type="numpy")
    if not normalized:
        return ids, np.zeros(0, np.int64), np.zeros(0, np.int64)
    bounds = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(piece_bytes[ids], out=bounds[1:])
    if bounds[-1] != len(normalized):
        raise ValueError(f"pieces cover {bounds[-1]} normalized bytes, the normalizer gave {len(normalized)}")
    orig = np.asarray(norm_to_orig, np.int64)[bounds]
    return ids, orig[:-1], orig[1:]


def original_byte_prefix(encoded_utf8: bytes) -> np.ndarray:
    """prefix[i] = ORIGINAL text bytes in encoded_utf8[:i], as the case decoder counts them (spec 01 section 4):
    control symbols weigh 0, every other byte 1 (a symbol after ESC is literal text: 3 bytes)."""
    raw = np.frombuffer(encoded_utf8, np.uint8)
    weight = np.ones(len(raw), np.int64)
    if len(raw) >= 3:  # U+E001..U+E004 are EE 80 81..84 in UTF-8, and 0xEE is always a lead byte
        lead = np.flatnonzero((raw[:-2] == 0xEE) & (raw[1:-1] == 0x80) & (raw[2:] >= 0x81) & (raw[2:] <= 0x84))
        if len(lead) and (raw[lead + 2] == 0x84).any():  # drop the symbols that an ESC makes literal
            control, literal_at = [], -1
            for start in lead.tolist():
                if start != literal_at:
                    control.append(start)
                    literal_at = start + 3 if raw[start + 2] == 0x84 else -1
            lead = np.array(control, np.int64)
        for k in range(3):
            weight[lead + k] = 0
    prefix = np.zeros(len(raw) + 1, np.int64)
    np.cumsum(weight, out=prefix[1:])
    return prefix


def document_tokens(sp, piece_bytes, text: str, with_bytes: bool):
    """BOS + token ids of one document and, if asked, its sidecar ([0] for BOS, then one count per token)."""
    encoded = caseops_encode(text).encode()
    if not with_bytes:
        return np.concatenate([[BOS_ID], sp.encode(encoded, out_type="numpy")]), None
    ids, begin, end = piece_spans(sp, piece_bytes, encoded)
    prefix = original_byte_prefix(encoded)
    counts = prefix[end] - prefix[begin]
    if len(counts) and counts.max() > 65535:
        raise ValueError(f"a token covers {counts.max()} original bytes, more than uint16 can hold")
    return np.concatenate([[BOS_ID], ids]), np.concatenate([[0], counts])


# === input ===
def iter_doc_lines(path: Path):
    """(line number, raw line) of every non-blank line of a .jsonl, .jsonl.gz or .jsonl.xz file."""
    with {".gz": gzip.open, ".xz": lzma.open}.get(Path(path).suffix, open)(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def parse_doc(path, lineno: int, line: bytes) -> str:
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text', found {line[:80]!r}")
    return doc["text"]


def iter_tasks(path, val_docs: int):
    """Chunks (path, is_val, [(lineno, line)]) of documents; a chunk never mixes validation and training."""
    chunk, chunk_is_val = [], True
    for index, numbered_line in enumerate(iter_doc_lines(path)):
        if chunk and (len(chunk) == CHUNK_DOCS or (index < val_docs) != chunk_is_val):
            yield str(path), chunk_is_val, chunk
            chunk = []
        chunk_is_val = index < val_docs
        chunk.append(numbered_line)
    if chunk:
        yield str(path), chunk_is_val, chunk


# === workers ===
_worker = {}


def init_worker(model_path: str) -> None:
    _worker["sp"] = sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker["piece_bytes"] = normalized_piece_bytes(sp)


def encode_task(task):
    path, is_val, numbered_lines = task
    ids, counts = [], []
    for lineno, line in numbered_lines:
        try:
            doc_ids, doc_counts = document_tokens(_worker["sp"], _worker["piece_bytes"],
                                                  parse_doc(path, lineno, line), is_val)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(path) else f"{path}:{lineno}: {e}") from None
        ids.append(doc_ids)
        counts.append(doc_counts)
    return is_val, len(numbered_lines), np.concatenate(ids), np.concatenate(counts) if is_val else None


def encoded_chunks(tasks, model_path: Path, workers: int):
    """encode_task over `tasks`, in input order, on `workers` processes with at most 2 tasks per worker in
    flight (Pool.imap would read the whole input ahead into memory)."""
    if workers == 1:
        init_worker(str(model_path))
        yield from map(encode_task, tasks)
        return
    with Pool(workers, init_worker, (str(model_path),)) as pool:
        in_flight = deque()
        for task in tasks:
            in_flight.append(pool.apply_async(encode_task, (task,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


# === output ===
class ShardWriter:
    """Cuts a uint16 stream into files of exactly `shard_tokens` entries (the last one shorter)."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.pending, self.n_pending, self.total, self.shards = [], 0, 0, []

    def add(self, values: np.ndarray) -> None:
        self.pending.append(values.astype("<u2"))
        self.n_pending += len(values)
        self.total += len(values)
        while self.n_pending >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> list:
        if self.n_pending:
            self._write(self.n_pending)
        return self.shards

    def _write(self, n: int) -> None:
        stream = np.concatenate(self.pending)
        header = np.zeros(HEADER_INTS, "<i4")
        header[:3] = SHARD_MAGIC, SHARD_VERSION, n
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        (self.out_dir / name).write_bytes(header.tobytes() + stream[:n].tobytes())
        self.shards.append({"file": name, "tokens": n})
        self.pending, self.n_pending = [stream[n:]], len(stream) - n


def log(message: str) -> None:
    print(f"prepare {message}", file=sys.stderr, flush=True)


# === main ===
def prepare(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "tokenizer.model" if args.train_tokenizer else args.tokenizer
    if args.train_tokenizer:
        train_tokenizer(args, model_path)
    load_tokenizer(model_path)
    writers = {name: ShardWriter(args.out, f"fineweb_{name}", args.shard_tokens)
               for name in ("train", "val", "val_bytes")}
    docs, val_bytes = {"train": 0, "val": 0}, 0
    start = last_log = time.perf_counter()
    bar = None
    if sys.stderr.isatty():  # a bar on a terminal, periodic log lines otherwise
        from tqdm import tqdm
        bar = tqdm(unit="doc", desc="prepare")
    for is_val, n_docs, ids, counts in encoded_chunks(iter_tasks(args.docs, args.val_docs), model_path, args.workers):
        docs["val" if is_val else "train"] += n_docs
        writers["val" if is_val else "train"].add(ids)
        if is_val:
            writers["val_bytes"].add(counts)
            val_bytes += int(counts.sum())
        if bar is not None:
            bar.update(n_docs)
        elif time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log(f"docs:{sum(docs.values())} tokens:{writers['train'].total + writers['val'].total} "
                f"elapsed:{last_log - start:.0f}s")
    if bar is not None:
        bar.close()
    shards = {name: w.close() for name, w in writers.items()}
    manifest = {  # nothing time- or machine-dependent: same input and options give the same bytes
        "tool_version": TOOL_VERSION,
        "args": {k: v if v is None or isinstance(v, (bool, int)) else str(v)
                 for k, v in sorted(vars(args).items()) if k not in ("out", "workers")},
        "tokenizer_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
        "val": {"docs": docs["val"], "tokens": writers["val"].total, "original_bytes": val_bytes,
                "shards": shards["val"], "byte_shards": shards["val_bytes"]},
        "train": {"docs": docs["train"], "tokens": writers["train"].total, "shards": shards["train"]},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    elapsed = time.perf_counter() - start
    log(f"done docs:{sum(docs.values())} val_tokens:{writers['val'].total} train_tokens:{writers['train'].total} "
        f"time:{elapsed:.1f}s docs_per_s:{sum(docs.values()) / max(elapsed, 1e-9):.0f}")


def download(args) -> None:
    """Fetch the canonical export: val and val_bytes shards, the first --train-shards train shards, tokenizer."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise ValueError("--download needs huggingface_hub (pip install huggingface_hub)") from None
    files = HfApi().list_repo_files(args.repo_id, repo_type="dataset")
    shards = sorted(f for f in files if f"fineweb10B_{CANONICAL_VARIANT}/fineweb_" in f and f.endswith(".bin"))
    train = [f for f in shards if "/fineweb_train_" in f][:args.train_shards]
    wanted = ([f for f in shards if "/fineweb_val" in f] + train
              + [f for f in files if f.endswith((f"/{CANONICAL_TOKENIZER}", "manifest.json"))])
    for name in wanted:
        log(f"download {name} -> {hf_hub_download(args.repo_id, name, repo_type='dataset', local_dir=args.out)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, help="input JSONL (.gz/.xz ok), one {'text': ...} object per line")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model with the canonical CaseOps id layout")
    p.add_argument("--train-tokenizer", action="store_true", help="train OUT/tokenizer.model on the train docs")
    p.add_argument("--vocab-size", type=int, default=8192, help="pieces of the trained tokenizer")
    p.add_argument("--tokenizer-train-docs", type=int, help="use at most this many train docs for the tokenizer")
    p.add_argument("--tokenizer-train-bytes", type=int, help="stop adding tokenizer docs at this many text bytes")
    p.add_argument("--val-docs", type=int, default=50_000, help="first N docs are validation (canonical: 50000)")
    p.add_argument("--shard-tokens", type=int, default=10_000_000, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--download", action="store_true", help="download the canonical CaseOps FineWeb export and "
                   f"tokenizer from the Hugging Face dataset --repo-id (default {CANONICAL_REPO_ID}) instead")
    p.add_argument("--repo-id", default=CANONICAL_REPO_ID, help="Hugging Face dataset repo for --download")
    p.add_argument("--train-shards", type=int, default=80, help="train shards to download (record: 80)")
    args = p.parse_args(argv)
    if not args.download and (args.docs is None or (args.tokenizer is None) == (not args.train_tokenizer)):
        p.error("give --docs and exactly one of --tokenizer / --train-tokenizer (or --download)")
    if args.shard_tokens < 1 or args.val_docs < 0 or args.workers < 1:
        p.error("--shard-tokens and --workers must be >= 1, --val-docs >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        download(args) if args.download else prepare(args)
    except (ValueError, OSError) as e:
        sys.exit(f"prepare_caseops_data: error: {e}")


if __name__ == "__main__":
    main()
