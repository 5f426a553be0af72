"""Benchmark of the post-training phase: Hessian collection, GPTQ + LQER, the artifact's entropy coder against
byte compressors (zpaq, brotli-11, lzma) with and without the record's row-similarity sort, decompression, and
bits per value against the order-0 entropy of the codes.

Usage (from the repo root):
    python bench/bench_quant.py --preset record --device cuda [--data-path DIR] [--checkpoint model.pt]
        the whole phase at the record's shapes (random N(0, 0.02) weights unless --checkpoint holds a GPT state
        dict); calibration on DIR's training shards, or on random-token shards written to a temporary folder
    python bench/bench_quant.py --synthetic [--column-sigma 0.3]
        compressors only, on Gaussian RTN codes with the record's 67 shapes and step sizes; --column-sigma gives
        the columns log-normal scales (trained input channels differ in magnitude; the coder's column classes
        model that, the byte compressors see it only through context); --heavy-rows F makes a fraction F of the
        rows Laplace-distributed (a row-shape mix, e.g. trained vs barely-trained embedding rows)
    python bench/bench_quant.py --artifact final_model.int6.ptz
        compressors only, on the codes of a real artifact (the way to compare them on trained weights)
    --preset tiny|mid: small models for CPU (tensors above 4,096 values are quantized there).
    --compressors rans,rans1,zpaq,brotli,lzma   --orders none,greedy,pca   --zpaq-threads N (0 = all cores)
"rans" is the artifact's coder (row x column class grid), "rans1" the same with one model per tensor (order-0).
Byte compressors get the record's layout: per tensor rows in --orders order, transposed, tensors in name order.
Optional packages (zpaq, brotli) are skipped with a note when missing. Timings are wall seconds.
"""
import argparse
import json
import lzma
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

PRESETS = {
    "tiny": dict(vocab_size=1024, num_layers=3, model_dim=128, num_heads=2, num_kv_heads=1, mlp_mult=4.0,
                 xsa_last_n=3, loop_start=1, loop_end=1, num_loops=2, parallel_start_layer=2, train_seq_len=256,
                 train_batch_tokens=8 * 2048, gptq_calibration_batches=4),
    "mid": dict(vocab_size=8192, num_layers=6, model_dim=384, num_heads=6, num_kv_heads=3, xsa_last_n=6,
                loop_start=2, loop_end=3, num_loops=2, parallel_start_layer=4, train_seq_len=1024,
                train_batch_tokens=8 * 8192, gptq_calibration_batches=8),
    "record": {},
}


def timed(fn, *args, device=torch.device("cpu"), **kwargs):
    tg.synchronize(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    tg.synchronize(device)
    return out, time.perf_counter() - start


def order0_bits(codes: np.ndarray) -> float:
    counts = np.bincount(codes.ravel().astype(np.int64) + 128)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum() * codes.size)


def greedy_chain(codes: torch.Tensor) -> torch.Tensor:
    """The reference's row order (spec 03 §5.2) for a stack [n, rows, cols]: from row 0, repeatedly the unused
    row nearest in L1 (lowest index on ties), all n chains at once and without host syncs."""
    n, rows, _ = codes.shape
    q, batch = codes.to(torch.int16), torch.arange(n, device=codes.device)
    used = torch.zeros(n, rows, dtype=torch.bool, device=codes.device)
    order = torch.zeros(n, rows, dtype=torch.long, device=codes.device)
    current = torch.zeros(n, dtype=torch.long, device=codes.device)
    used[:, 0] = True
    for t in range(1, rows):
        dist = (q - q[batch, current][:, None, :]).abs().sum(-1, dtype=torch.int32)
        current = dist.masked_fill_(used, torch.iinfo(torch.int32).max).argmin(dim=1)
        order[:, t] = current
        used[batch, current] = True
    return order


def pca_order(codes: torch.Tensor) -> torch.Tensor:
    """A cheap alternative order: rows sorted by their projection on the first principal direction."""
    x = codes.float() - codes.float().mean(dim=1, keepdim=True)
    direction = torch.linalg.svd(x, full_matrices=False)[2][:, 0]  # [n, cols]
    return torch.argsort(torch.einsum("nrc,nc->nr", x, direction), dim=1, stable=True)


def row_orders(codes: dict, kind: str, device) -> tuple[dict, float]:
    """name -> row permutation (None for the identity) and the seconds it took."""
    if kind == "none":
        return {name: None for name in codes}, 0.0
    by_shape, orders, start = {}, {}, time.perf_counter()
    for name, c in codes.items():
        by_shape.setdefault(tuple(c.shape), []).append(name)
    for names in by_shape.values():
        stack = torch.stack([codes[n] for n in names]).to(device)
        found = (greedy_chain if kind == "greedy" else pca_order)(stack).cpu()
        orders.update(zip(names, found))
    tg.synchronize(device)
    return orders, time.perf_counter() - start


def record_layout(codes: dict, orders: dict) -> bytes:
    """The record's Q-section bytes: tensors in name order, rows permuted, transposed to [cols, rows]."""
    parts = []
    for name in sorted(codes):
        c = codes[name] if orders[name] is None else codes[name][orders[name]]
        parts.append(c.T.contiguous().numpy().tobytes())
    return b"".join(parts)


def byte_compressors(zpaq_threads: int) -> dict:
    found = {"lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    try:
        import brotli
        found["brotli"] = (lambda b: brotli.compress(b, quality=11), brotli.decompress)
    except ImportError:
        print("brotli: not installed, skipped")
    try:
        import zpaq
        found["zpaq"] = (lambda b: zpaq.compress(b, level=5, threads=zpaq_threads), zpaq.decompress)
    except ImportError:
        print("zpaq: not installed, skipped")
    return found


def bench_rans(codes: dict, single_model: bool) -> dict:
    saved = tg.ANS_ROW_CLASSES, tg.ANS_COLUMN_CLASSES
    if single_model:
        tg.ANS_ROW_CLASSES, tg.ANS_COLUMN_CLASSES = (1,), (1,)
    try:
        start, encoded = time.perf_counter(), {}
        for name, c in codes.items():
            model = tg.fit_code_model(c.numpy())
            encoded[name] = (tg.ans_encode(c.numpy(), model), model)
        encode_s, start = time.perf_counter() - start, time.perf_counter()
        for name, (words, model) in encoded.items():
            if not np.array_equal(tg.ans_decode(words, tuple(codes[name].shape), model, name), codes[name].numpy()):
                raise RuntimeError(f"rANS round trip differs for {name}")
        decode_s = time.perf_counter() - start
    finally:
        tg.ANS_ROW_CLASSES, tg.ANS_COLUMN_CLASSES = saved
    model_bytes = round(sum(2 * m.freqs.size + (m.row_classes.size * np.log2(m.freqs.shape[0]) + m.col_classes.size
                                                 * np.log2(m.freqs.shape[1])) / 8 for _, m in encoded.values()))
    grids = sorted({m.freqs.shape[:2] for _, m in encoded.values()})
    return {"bytes": sum(w.nbytes for w, _ in encoded.values()) + model_bytes, "model_bytes": model_bytes,
            "encode_s": encode_s, "decode_s": decode_s, "grids": [list(g) for g in grids],
            "by_tensor": {n: w.nbytes for n, (w, _) in encoded.items()}}


def compare_compressors(codes: dict, args, device) -> list[dict]:
    values = sum(c.numel() for c in codes.values())
    entropy = sum(order0_bits(c.numpy()) for c in codes.values())
    print(f"codes: {len(codes)} tensors, {values} values, order-0 entropy {entropy / values:.4f} bits/value "
          f"= {entropy / 8:.0f} bytes")
    wanted, results = args.compressors.split(","), []
    for name in ("rans", "rans1"):
        if name in wanted:
            r = bench_rans(codes, single_model=name == "rans1")
            results.append({"compressor": name, "order": "-", **{k: v for k, v in r.items() if k != "by_tensor"}})
            print(f"  {name} class grids (rows x columns) used: {r['grids']}")
            if name == "rans":
                report_groups(codes, r["by_tensor"])
    available = byte_compressors(args.zpaq_threads)
    for kind in args.orders.split(","):
        orders, order_s = row_orders(codes, kind, device)
        blob = record_layout(codes, orders)
        perm_bytes = 0 if kind == "none" else 2 * sum(c.shape[0] for c in codes.values())
        for name in wanted:
            if name in available:
                compress, decompress = available[name]
                packed, encode_s = timed(compress, blob)
                restored, decode_s = timed(decompress, packed)
                if restored != blob:
                    raise RuntimeError(f"{name} round trip differs")
                results.append({"compressor": name, "order": kind, "bytes": len(packed) + perm_bytes,
                                "perm_bytes": perm_bytes, "order_s": order_s, "encode_s": encode_s,
                                "decode_s": decode_s})
    for r in results:
        r["bits_per_value"] = 8 * r["bytes"] / values
        r["vs_order0"] = 8 * r["bytes"] / entropy - 1
        print(f"{r['compressor']:>7} order:{r['order']:<6} bytes:{r['bytes']:>10} bits/value:{r['bits_per_value']:.4f} "
              f"vs_order0:{100 * r['vs_order0']:+.2f}% encode:{r['encode_s']:.2f}s decode:{r['decode_s']:.2f}s"
              + (f" order:{r['order_s']:.2f}s" if r.get("order_s") else ""))
    return results


def report_groups(codes: dict, by_tensor: dict) -> None:
    groups = {}
    for name, c in codes.items():
        role = "embed" if "tok_emb" in name else "mlp" if ".mlp." in name else "attn"
        g = groups.setdefault(role, [0, 0, 0.0])
        g[0], g[1], g[2] = g[0] + c.numel(), g[1] + by_tensor[name], g[2] + order0_bits(c.numpy())
    for role, (values, nbytes, bits) in sorted(groups.items()):
        print(f"  group {role}: values:{values} bytes:{nbytes} bits/value:{8 * nbytes / values:.4f} "
              f"order0:{bits / values:.4f}")


def synthetic_codes(column_sigma: float, heavy_rows: float, seed: int = 0) -> dict:
    """Gaussian RTN codes with the record's shapes and step sizes (spec 03 §1.1)."""
    h, rng = tg.Hyperparameters(), np.random.default_rng(seed)
    shapes = {"tok_emb.weight": (8192, 512)}
    for i in range(11):
        shapes.update({f"blocks.{i}.attn.c_q.weight": (512, 512), f"blocks.{i}.attn.proj.weight": (512, 512),
                       f"blocks.{i}.attn.c_k.weight": (256, 512), f"blocks.{i}.attn.c_v.weight": (256, 512),
                       f"blocks.{i}.mlp.fc.weight": (2048, 512), f"blocks.{i}.mlp.proj.weight": (512, 2048)})
    codes = {}
    for name, shape in shapes.items():
        weight = rng.standard_normal(shape) * np.exp(rng.normal(0.0, column_sigma, shape[1]))
        heavy = rng.random(shape[0]) < heavy_rows
        weight[heavy] = rng.laplace(size=(int(heavy.sum()), shape[1])) * np.exp(rng.normal(0.0, column_sigma, shape[1]))
        bits, clip = tg.quant_format(name, torch.empty(shape), h)
        qmax = 2 ** (bits - 1) - 1
        step = clip * weight.std(axis=1, ddof=1, keepdims=True) / qmax
        codes[name] = torch.from_numpy(np.clip(np.rint(weight / step), -qmax, qmax).astype(np.int8))
    return codes


def write_random_shards(folder: Path, vocab: int, tokens: int = 4_000_000, count: int = 2) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        ids = rng.integers(2, vocab, tokens)
        ids[rng.random(tokens) < 1 / 800] = tg.BOS_ID
        header = np.zeros(tg.SHARD_HEADER_BYTES // 4, dtype="<i4")
        header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, tokens)
        (folder / f"fineweb_train_{i:06d}.bin").write_bytes(header.tobytes() + ids.astype("<u2").tobytes())


def bench_pipeline(args, device) -> dict:
    h = tg.Hyperparameters(**PRESETS[args.preset], max_wallclock_seconds=0.0)
    if args.preset != "record":
        tg.PASSTHROUGH_MAX_NUMEL = 4096
    torch.manual_seed(0)
    model = tg.build_model(h, device, log=print)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location=device))
    else:
        with torch.no_grad():
            for name in tg.BANK_ROLES:
                getattr(model, name).normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = args.data_path or tmp
        if not args.data_path:
            write_random_shards(Path(tmp), h.vocab_size)
        (loader, load_s) = timed(tg.CalibrationLoader, tg.train_shard_files(data_path), 0, 1, h.train_seq_len,
                                 h.train_batch_tokens // tg.MICRO_BATCHES // h.train_seq_len, h.vocab_size)
        (hessians, info), hess_s = timed(tg.collect_hessians, model, loader, h.gptq_calibration_batches, device,
                                         device=device)
    print(f"calibration: loader {load_s:.2f}s, Hessians {hess_s:.2f}s for {info['batches_total']} batches "
          f"({info['tokens_total']} tokens, {hess_s / info['batches_total'] * 1000:.0f} ms/batch) -> "
          f"{load_s + hess_s:.1f}s of the training budget (gptq_reserve_seconds default "
          f"{tg.Hyperparameters.gptq_reserve_seconds})")
    flat = tg.unbank_state_dict({n: t.detach() for n, t in model.state_dict().items()})
    qw, gptq_s = timed(tg.quantize_weights, flat, hessians, h, device, device=device)
    print(f"GPTQ + LQER: {gptq_s:.2f}s for {len(qw.codes)} tensors on {device}")
    (blob, stats), pack_s = timed(tg.encode_artifact, qw)
    back, unpack_s = timed(tg.decode_artifact, blob, "bench")
    print(f"artifact: {len(blob)} bytes (Q {stats['q_bytes']}, remainder {stats['remainder_bytes']}), "
          f"encode {pack_s:.2f}s, decode {unpack_s:.2f}s")
    return {"preset": args.preset, "calibration_loader_s": load_s, "hessians_s": hess_s, "gptq_s": gptq_s,
            "artifact_bytes": len(blob), "encode_s": pack_s, "decode_s": unpack_s, "codes": qw.codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--column-sigma", type=float, default=0.0)
    parser.add_argument("--heavy-rows", type=float, default=0.0)
    parser.add_argument("--artifact", default="")
    parser.add_argument("--compressors", default="rans,rans1,zpaq,brotli,lzma")
    parser.add_argument("--orders", default="none,greedy")
    parser.add_argument("--zpaq-threads", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__} device {device} cpus {os.cpu_count()}")
    summary = {}
    if args.artifact:
        codes = tg.decode_artifact(Path(args.artifact).read_bytes(), args.artifact).codes
    elif args.synthetic:
        codes = synthetic_codes(args.column_sigma, args.heavy_rows)
    else:
        summary = bench_pipeline(args, device)
        codes = summary.pop("codes")
    summary["compressors"] = compare_compressors(codes, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
