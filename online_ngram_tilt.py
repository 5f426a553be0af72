"""Causal token n-gram hints and the closed-form n-gram tilt of the PR #2135 record (spec 05).

Usage:
    import online_ngram_tilt as ngram
    ngram.load_native()                          # early prerequisite check: builds the C helper or raises
    hint, gate = ngram.token_hints(val_tokens)   # whole stream, BOS = 1 at document starts
    # entry t belongs to the target val_tokens[t] and is built from val_tokens[:t] only; entry 0 is never gated
    score = ngram.tilted_nll(log_probs, targets, hint_t, gate_t)   # scored loss of gated/ungated targets

Only the token channel exists here: the record's within-word and word-start channels cannot fire under
its configuration (spec 05 section 6). The channel keeps the reference's XOR context key and shared
pair-count table, hash collisions included, so its hints are bit-identical to the record's.

The state machine is `online_ngram_state.c`, compiled on first use (never at import) with $CC or
cc/gcc/clang into $NGRAM_CACHE_DIR (default ~/.cache/parameter-golf/ngram), one file per hash of
source + compiler + flags + CPU, written atomically so that concurrent ranks can build at once.
Without a compiler `load_native` raises RuntimeError; `token_hints(backend="auto")` then warns and uses
a numpy version of the same algorithm (same output, about 10x slower).
"""
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

# === configuration (the record's values, spec 05 section 1) ===
TOKEN_ORDER = 16  # 15 context tokens + the predicted one
TOKEN_THRESHOLD = 0.8  # gate when float32(count ratio) >= float32(0.8)
TOKEN_BOOST = 2.625  # tilt strength beta in nats at a gated target

# Key arithmetic of the reference (spec 05 section 3.3); only the numpy fallback needs it here.
COEFFS = (36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
          1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
          2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973)
PAIR_MULTIPLIER = 1000003
MAX_ORDER = len(COEFFS) + 1  # the reference indexes COEFFS[j] for j < order - 1 without wrap-around
MAX_TOKEN_ID = 65535  # ids travel as uint16, as in the reference

# === native build and loading ===
C_SOURCE = Path(__file__).resolve().with_name("online_ngram_state.c")
ABI_VERSION = 3
NATIVE_FLAGS = ("-O3", "-march=native")
PORTABLE_FLAGS = ("-O2",)
COMMON_FLAGS = ("-shared", "-fPIC", "-pthread", "-std=c11")
_native = None


def cache_dir():
    if os.environ.get("NGRAM_CACHE_DIR"):
        return Path(os.environ["NGRAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "parameter-golf" / "ngram"


def find_compiler():
    """argv of the C compiler: $CC if set, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        argv = shlex.split(os.environ["CC"])
        if argv and shutil.which(argv[0]):
            return argv
        looked_for = f"$CC={os.environ['CC']!r}"
    else:
        for name in ("cc", "gcc", "clang"):
            if shutil.which(name):
                return [shutil.which(name)]
        looked_for = "cc, gcc, clang"
    raise RuntimeError(
        f"online_ngram_tilt: no C compiler to build {C_SOURCE.name}: looked for {looked_for} on "
        f"PATH={os.environ.get('PATH', '')!r}. Install one (e.g. `apt-get install gcc`) or set CC to a "
        f"compiler's path; otherwise the numpy fallback is used (same output, much slower).")


def _cpu_fingerprint():
    """-march=native output only runs on the CPU it was built for: key the cache on the CPU's flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}"


def _library_path(folder, source_text, compiler, compiler_version, flags):
    key = "\0".join([source_text, " ".join(compiler), compiler_version, " ".join(flags), _cpu_fingerprint()])
    return Path(folder) / f"online_ngram_state-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"


def _compile(compiler, flags, source, target):
    """Compile to a temporary name in target's folder, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([*compiler, *flags, *COMMON_FLAGS, "-o", tmp, str(source)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return result.stderr.strip()
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_native(source=None, folder=None):
    """Path of the compiled helper for `source`, compiling it unless the cache already holds it."""
    source = Path(source or C_SOURCE)
    folder = Path(folder or cache_dir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RuntimeError(f"online_ngram_tilt: cannot create the build cache {folder} ({error}); "
                           f"set NGRAM_CACHE_DIR to a writable folder") from error
    compiler = find_compiler()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    text = source.read_text()
    candidates = [(flags, _library_path(folder, text, compiler, version, flags))
                  for flags in (NATIVE_FLAGS, PORTABLE_FLAGS)]
    for _, path in candidates:
        if path.exists():
            return path
    errors = []
    for flags, path in candidates:
        error = _compile(compiler, flags, source, path)
        if error is None:
            return path
        errors.append(f"{' '.join(compiler)} {' '.join(flags)}: {error[-500:]}")
    raise RuntimeError(f"online_ngram_tilt: cannot compile {source}:\n" + "\n".join(errors))


def _declare(lib, path):
    lib.ngram_abi_version.restype = ctypes.c_int32
    lib.ngram_abi_version.argtypes = []
    if lib.ngram_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version {lib.ngram_abi_version()}, expected {ABI_VERSION}")
    lib.ngram_token_channel.restype = ctypes.c_int32
    lib.ngram_token_channel.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
    return lib


def load_native():
    """The loaded C helper (built on first call). Raises RuntimeError if it cannot be built."""
    global _native
    if _native is None:
        path = build_native()
        _native = _declare(ctypes.CDLL(str(path)), path)
    return _native


# === the token channel ===
def _as_stream(tokens):
    """The stream as contiguous uint16, after checking shape and id range."""
    stream = np.asarray(tokens)
    if stream.ndim != 1:
        raise ValueError(f"token_hints: tokens must be 1-D, got shape {stream.shape}")
    if stream.size and stream.dtype != np.uint16:
        if not np.issubdtype(stream.dtype, np.integer):
            raise ValueError(f"token_hints: tokens must be integer ids, got dtype {stream.dtype}")
        low, high = int(stream.min()), int(stream.max())
        if low < 0 or high > MAX_TOKEN_ID:
            raise ValueError(f"token_hints: token ids must lie in [0, {MAX_TOKEN_ID}], found [{low}, {high}]")
    if stream.size > 2**32:
        raise ValueError(f"token_hints: at most 2^32 tokens (uint32 counters), got {stream.size}")
    return np.ascontiguousarray(stream, dtype=np.uint16)


def _check_order(order):
    if not 2 <= order <= MAX_ORDER:
        raise ValueError(f"token_hints: order must be in [2, {MAX_ORDER}], got {order}")


def _channel_native(targets, context_length, threads, top, conf):
    """Fills top/conf (uint16/float32, len(targets)); returns the C call's peak working memory in bytes."""
    lib = load_native()
    work_bytes = ctypes.c_int64(0)
    rc = lib.ngram_token_channel(targets.ctypes.data, len(targets), context_length, threads,
                                 top.ctypes.data, conf.ctypes.data, ctypes.byref(work_bytes))
    if rc != 0:
        reason = "out of memory" if rc == -2 else "bad arguments"
        raise RuntimeError(f"{C_SOURCE.name}: ngram_token_channel returned {rc} ({reason}) "
                           f"for {len(targets)} targets, context length {context_length}")
    return work_bytes.value


def _exclusive_segment_max(values, segment_start):
    """values[k] -> max of values[segment_start[k] .. k-1] (0 where empty), by log-step doubling."""
    running = values.copy()
    index = np.arange(len(values))
    step = 1
    longest = int((index - segment_start).max(initial=0)) + 1
    while step < longest:
        inside = index[step:] - step >= segment_start[step:]
        running[step:] = np.where(inside, np.maximum(running[step:], running[:-step]), running[step:])
        step *= 2
    shifted = np.zeros_like(running)
    earlier = index > segment_start
    shifted[earlier] = running[index[earlier] - 1]
    return shifted


def _rank_in_group(sorted_keys):
    """Per element of a sorted array: its 0-based index among the equal keys, and its group's start."""
    index = np.arange(len(sorted_keys))
    new_group = np.ones(len(sorted_keys), bool)
    new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
    start = np.maximum.accumulate(np.where(new_group, index, 0))
    return index - start, start


def _channel_numpy(targets, context_length):
    """Spec 05 section 3.7: the same outputs as the sequential state machine, from two stable sorts."""
    n = len(targets)
    top, conf = np.zeros(n, np.uint16), np.zeros(n, np.float32)
    first = context_length - 1
    if n <= first:
        return top, conf
    y = targets.astype(np.uint64)
    history = np.concatenate([y[:1], y])  # seeded with the first target (spec 05 section 3.2)
    m = n - first
    keys = np.zeros(m, np.uint64)
    for j in range(context_length):
        keys ^= history[j:j + m] * np.uint64(COEFFS[j])
    pairs = (keys * np.uint64(PAIR_MULTIPLIER)) ^ (y[first:] * np.uint64(COEFFS[context_length % 32]))
    order = np.argsort(pairs, kind="stable")
    counts = np.empty(m, np.uint64)
    counts[order] = _rank_in_group(pairs[order])[0] + 1
    order = np.argsort(keys, kind="stable")
    seen, start = _rank_in_group(keys[order])
    # larger = more counts, then earlier position: the first follower to reach the best count keeps it
    packed = (counts[order] << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - order.astype(np.uint64))
    best = _exclusive_segment_max(packed, start)
    found = seen > 0
    winner = (np.uint64(0xFFFFFFFF) - (best[found] & np.uint64(0xFFFFFFFF))).astype(np.int64)
    top[first + order[found]] = targets[first + winner]
    conf[first + order[found]] = (best[found] >> np.uint64(32)).astype(np.float32) / seen[found].astype(np.float32)
    return top, conf


def default_threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def token_channel(tokens, order=TOKEN_ORDER, *, backend="auto", threads=None):
    """Raw candidate and confidence per stream position: (top_token uint16[N], top_prob float32[N]).

    Entry t concerns the target tokens[t] and is computed from tokens[:t] (entries 0..order-2 are 0).
    backend: "c" (raise if the helper cannot be built), "numpy", or "auto" (C, else numpy with a warning).
    """
    _check_order(order)
    stream = _as_stream(tokens)
    targets = stream[1:]  # the state never sees stream[0] (spec 05 section 2)
    top, conf = np.zeros(len(stream), np.uint16), np.zeros(len(stream), np.float32)
    if len(targets) == 0:
        return top, conf
    if backend == "auto":
        try:
            load_native()
            backend = "c"
        except RuntimeError as error:
            warnings.warn(f"{error}\nUsing the numpy fallback.", RuntimeWarning, stacklevel=2)
            backend = "numpy"
    if backend == "c":
        _channel_native(targets, order - 1, threads or default_threads(), top[1:], conf[1:])
    elif backend == "numpy":
        top[1:], conf[1:] = _channel_numpy(targets, order - 1)
    else:
        raise ValueError(f"token_channel: backend must be 'auto', 'c' or 'numpy', got {backend!r}")
    return top, conf


def token_hints(tokens, order=TOKEN_ORDER, threshold=TOKEN_THRESHOLD, *, backend="auto", threads=None):
    """Hint and gate per stream position: (hint int64[N], gate bool[N]).

    Entry t is for predicting tokens[t] from tokens[:t]; gate[t] = float32(confidence) >= float32(threshold),
    hint[t] = the candidate where gated, else 0 (a gated hint can be 0: decide by gate). Entry 0 is never gated.
    """
    top, conf = token_channel(tokens, order, backend=backend, threads=threads)
    gate = conf >= np.float32(threshold)
    hint = np.where(gate, top, np.int64(0))
    return hint, gate


# === the tilt (spec 05 section 7) ===
def tilt_nll(nll, log_q_hint, target, hint, gate, boost=TOKEN_BOOST):
    """Loss of the target under the tilted distribution p'(a) = p(a) e^(beta [a == hint]) / Z.

    nll = -log p(target), log_q_hint = log p(hint); where gated: nll - beta [target == hint] +
    log1p(q expm1(beta)), q = exp(min(log_q_hint, 0)); elsewhere nll. Same float32 op order as the record.
    """
    beta = torch.as_tensor(boost, dtype=nll.dtype, device=nll.device)
    q = log_q_hint.to(nll.dtype).clamp(max=0.0).exp()
    hit = (target == hint).to(nll.dtype)
    tilted = nll - beta * hit + torch.log1p(q * torch.expm1(beta))
    return torch.where(gate.bool(), tilted, nll)


def tilted_nll(log_probs, target, hint, gate, boost=TOKEN_BOOST):
    """Tilted loss per position from full log-softmax rows log_probs [..., V]; target/hint/gate [...].

    For the SCORED loss only: TTT and the global phase train on the untilted nll (spec 04 section 5.4).
    boost may be a float or a tensor broadcastable to target (the record: 2.625 where gated)."""
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    log_q_hint = log_probs.gather(-1, hint.unsqueeze(-1)).squeeze(-1)
    return tilt_nll(nll, log_q_hint, target, hint, gate, boost)


def tilt_log_probs(log_probs, hint, gate, boost=TOKEN_BOOST):
    """The whole tilted log-distribution [..., V] (for checks: it must sum to 1 over the vocabulary)."""
    boost = torch.as_tensor(boost, dtype=log_probs.dtype, device=log_probs.device)
    beta = torch.where(gate.bool(), boost, 0.0).unsqueeze(-1)
    index = hint.unsqueeze(-1)
    q = log_probs.gather(-1, index).clamp(max=0.0).exp()
    bonus = torch.zeros_like(log_probs).scatter(-1, index, beta)
    return log_probs + bonus - torch.log1p(q * torch.expm1(beta))
