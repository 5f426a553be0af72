"""Compressors compared on the codes of a real artifact, per group of quantized values (attention matrices, MLP
matrices, the int7 embedding, all 67 together) and on the non-code remainder (row scales, LQER factors, float16
tensors): the order-0 entropy, the artifact's own coder (a fitted static rANS model per tensor, fit_code_model +
ans_encode as encode_artifact runs them), brotli-11, lzma 9e, zpaq (the `zpaq` package, in memory) and lrzip when
its binary is on PATH. Byte compressors see the int8 codes (one byte per value, tensors in name order) in three
layouts: `rows` (as stored), `cols` (each tensor transposed) and `sorted` (the record's: rows in the greedy L1
similarity order, then transposed, plus 2 bytes per row for the stored permutation; spec 03 §5.2). Every decode is
checked to give its input back exactly; times are wall seconds, the best of 3 when a run takes under 2 s.

Usage (from the repo root):
    python bench/bench_compress.py carry/final_model.int6.ptz [--json out.json] [--groups attn,mlp,embed,all]
        [--layouts rows,cols,sorted] [--zpaq 3 4 5 5:16 x6,0c256c256,0,255m8,24]
--zpaq takes libzpaq levels (1-5) or method strings ("x", block size, preprocessing, then model components), each
with an optional ":threads" (default 1, one block; N threads write N blocks, as an N-core host would).
The default run takes ~45 min on 2 cores, most of it zpaq 4/5 and brotli-11 on the 36 MB "all" group.
"""
import argparse
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

GROUPS, LAYOUTS = ("attn", "mlp", "embed", "all"), ("rows", "cols", "sorted")


def group_of(name: str) -> str:
    return "embed" if "tok_emb" in name else "mlp" if ".mlp." in name else "attn"


def order0_bits(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols.ravel().astype(np.int64) + 128)
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum() * symbols.size)


def timed(fn, *args):
    """(result, wall seconds): the best of 3 runs when the first takes under 2 s."""
    start = time.perf_counter()
    out = fn(*args)
    best = time.perf_counter() - start
    for _ in range(2 if best < 2.0 else 0):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


def similarity_order(stack: torch.Tensor) -> torch.Tensor:
    """The record's row order (spec 03 §5.2) for a stack [n, rows, cols] of code matrices: from row 0, repeatedly the
    unused row nearest in L1 to the last placed one, lowest index on ties. Unused rows stay packed at the front (the
    placed row's slot takes the last unused row), so a step scans only them, in int8 (|a - b| <= 126)."""
    if int(stack.abs().max()) > 63:
        raise ValueError(f"similarity sort: |code| up to {int(stack.abs().max())}, int8 differences need <= 63")
    n, rows, _ = stack.shape
    rest, ids, batch = stack.clone(), torch.arange(rows).repeat(n, 1), torch.arange(n)
    order, slot, last = torch.zeros(n, rows, dtype=torch.long), torch.zeros(n, dtype=torch.long), stack[:, 0]
    for t in range(1, rows):
        left = rows - t
        rest[batch, slot], ids[batch, slot] = rest[:, left].clone(), ids[:, left].clone()
        dist = (rest[:, :left] - last[:, None]).abs_().sum(-1, dtype=torch.int32)  # [n, left]
        ties = dist == dist.min(1, keepdim=True).values
        slot = torch.where(ties, ids[:, :left], rows).argmin(1)
        order[:, t], last = ids[batch, slot], rest[batch, slot].clone()
    return order


def similarity_orders(codes: dict) -> tuple[dict, dict]:
    """name -> row order, and the sort's seconds per group (same-shape tensors are sorted together)."""
    by_shape, orders, seconds = {}, {}, dict.fromkeys(GROUPS, 0.0)
    for name in sorted(codes):
        by_shape.setdefault(tuple(codes[name].shape), []).append(name)
    for names in by_shape.values():
        start = time.perf_counter()
        orders.update(zip(names, similarity_order(torch.stack([codes[n] for n in names]))))
        for name in names:
            for group in (group_of(name), "all"):
                seconds[group] += (time.perf_counter() - start) / len(names)
    return orders, seconds


def layout_bytes(codes: dict, names: list, layout: str, orders: dict) -> bytes:
    mats = (codes[n] if layout == "rows" else (codes[n][orders[n]] if layout == "sorted" else codes[n]).T
            for n in names)
    return b"".join(m.contiguous().numpy().tobytes() for m in mats)


def lrzip(data: bytes, decompress: bool = False) -> bytes:
    """The reference's calls (spec 03 §5.3): a temp file, `lrzip -z -L 9 -o F.lrz F` or `lrzip -d -o F F.lrz`."""
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed = Path(tmp) / "q.bin", Path(tmp) / "q.bin.lrz"
        (packed if decompress else plain).write_bytes(data)
        args = ["-d", "-o", plain, packed] if decompress else ["-z", "-L", "9", "-o", packed, plain]
        subprocess.run(["lrzip", *map(str, args)], check=True, capture_output=True)
        return (plain if decompress else packed).read_bytes()


def byte_coders(zpaq_specs: list) -> dict:
    """name -> (compress, decompress) for every byte compressor available here."""
    import brotli

    coders = {"brotli-11": (lambda b: brotli.compress(b, quality=11), brotli.decompress),
              "lzma-9e": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    try:
        import zpaq  # pip: zpaq==0.3.7
    except ImportError:
        print("zpaq: not installed (pip install zpaq==0.3.7), not measured")
        zpaq_specs = []
    for spec in zpaq_specs:
        method, _, threads = spec.partition(":")
        options = {"threads": int(threads or 1), **({"method": method} if method.startswith("x")
                                                    else {"level": int(method)})}
        coders[f"zpaq {spec}"] = (lambda b, o=options: zpaq.compress(b, **o), lambda b: zpaq.decompress(b, threads=0))
    if shutil.which("lrzip"):
        coders["lrzip -z -L 9"] = (lrzip, lambda b: lrzip(b, decompress=True))
    else:
        print("lrzip: no binary on PATH, not measured")
    return coders


def bench_rans(codes: dict) -> dict:
    """Per tensor: rANS stream bytes, the model's side info (kept in the artifact's brotli remainder), encode
    (fit + encode) and decode seconds."""
    out = {}
    for name, tensor in codes.items():
        c = tensor.numpy()
        model, fit_s = timed(tg.fit_code_model, c)
        words, encode_s = timed(tg.ans_encode, c, model)
        back, decode_s = timed(tg.ans_decode, words, c.shape, model, name)
        if not np.array_equal(back, c):
            raise RuntimeError(f"rANS round trip differs for {name}")
        side = model.row_classes.tobytes() + model.col_classes.tobytes() + model.freqs.astype("<u2").tobytes()
        out[name] = {"bytes": words.nbytes, "side": side, "encode_s": fit_s + encode_s, "decode_s": decode_s}
    return out


def rans_row(group: str, names: list, rans: dict) -> dict:
    import brotli

    model_bytes = len(brotli.compress(b"".join(rans[n]["side"] for n in names), quality=11))
    return {"group": group, "coder": "rANS (artifact)", "layout": "-", "extra_bytes": model_bytes,
            "bytes": sum(rans[n]["bytes"] for n in names) + model_bytes,
            **{k: sum(rans[n][k] for n in names) for k in ("encode_s", "decode_s")}}


def run_coders(coders: dict, data: bytes, label: dict, extra_bytes: int = 0) -> list:
    rows = []
    for name, (compress, decompress) in coders.items():
        packed, encode_s = timed(compress, data)
        back, decode_s = timed(decompress, packed)
        if back != data:
            raise RuntimeError(f"{name} round trip differs on {label}")
        rows.append({**label, "coder": name, "bytes": len(packed) + extra_bytes, "extra_bytes": extra_bytes,
                     "encode_s": encode_s, "decode_s": decode_s})
        print(" ".join(f"{k}:{v:.2f}" if isinstance(v, float) else f"{k}:{v}" for k, v in rows[-1].items()), flush=True)
    return rows


def remainder_payload(qw: tg.QuantizedWeights) -> bytes:
    """What the artifact's brotli section holds besides metadata and coder models: fp16 row scales, LQER factors
    (int8 codes, fp16 scales) and fp16 passthrough tensors, in name order."""
    parts = [t for name in sorted(qw.codes) for t in (qw.scales[name], *qw.lqer.get(name, ()))]
    parts += [qw.passthrough[name] for name in sorted(qw.passthrough)]
    return b"".join(t.contiguous().numpy().tobytes() for t in parts)


def shuffled(coder: tuple) -> tuple:
    """The reference's remainder transform (spec 03 §5.4): even bytes, then odd bytes, before compressing."""
    compress, decompress = coder

    def unshuffle(packed):
        raw = decompress(packed)
        out, half = bytearray(len(raw)), (len(raw) + 1) // 2
        out[0::2], out[1::2] = raw[:half], raw[half:]
        return bytes(out)
    return (lambda b: compress(b[0::2] + b[1::2]), unshuffle)


def print_table(report: dict) -> None:
    print("\n| group | coder | layout | bytes | bits/value | vs order-0 | encode s | decode s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for group, info in report["groups"].items():
        print(f"| {group} | order-0 entropy (per tensor; pooled {info['order0_pooled_bits'] / info['values']:.4f}) | - "
              f"| {info['order0_bits'] / 8:,.0f} | {info['order0_bits'] / info['values']:.4f} | 0 | - | - |")
        for r in (r for r in report["rows"] if r["group"] == group):
            print(f"| {group} | {r['coder']} | {r['layout']} | {r['bytes']:,} | {r['bits_per_value']:.4f} | "
                  f"{100 * r['vs_order0']:+.2f}% | {r['encode_s']:.2f} | {r['decode_s']:.2f} |")
    rem = report["remainder"]
    print(f"\nremainder payload {rem['raw_bytes']:,} raw bytes (byte order-0 {rem['order0_bits'] / 8:,.0f} bytes); "
          f"artifact's remainder with metadata + coder models: {rem['artifact_raw']:,} -> {rem['artifact_bytes']:,}")
    print("| coder | bytes | encode s | decode s |\n|---|---:|---:|---:|")
    for r in rem["rows"]:
        print(f"| {r['coder']} | {r['bytes']:,} | {r['encode_s']:.3f} | {r['decode_s']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--zpaq", nargs="*", default=["3", "4", "5", "x6,0c256c256,0,255m8,24"])
    args = parser.parse_args()
    blob = Path(args.artifact).read_bytes()
    qw, artifact_decode_s = timed(tg.decode_artifact, blob, args.artifact)
    (frame, stats), artifact_encode_s = timed(tg.encode_artifact, qw)
    if frame != blob:
        raise RuntimeError(f"{args.artifact}: re-encoding gives {len(frame)} other bytes (coder changed since?)")
    report = {"artifact": args.artifact, "artifact_bytes": len(blob), "artifact_encode_s": artifact_encode_s,
              "artifact_decode_s": artifact_decode_s, "torch": torch.__version__, "cpus": os.cpu_count(),
              "python": platform.python_version(), "groups": {}, "rows": []}
    print(f"{args.artifact}: {len(blob):,} bytes, encode_artifact {artifact_encode_s:.2f}s, "
          f"decode_artifact {artifact_decode_s:.2f}s, cpus {os.cpu_count()}", flush=True)
    layouts, coders, rans = args.layouts.split(","), byte_coders(args.zpaq), bench_rans(qw.codes)
    orders, sort_s = similarity_orders(qw.codes) if "sorted" in layouts else ({}, {})
    for group in args.groups.split(","):
        names = sorted(n for n in qw.codes if group in ("all", group_of(n)))
        pooled = np.concatenate([qw.codes[n].numpy().ravel() for n in names])
        report["groups"][group] = {"tensors": len(names), "values": pooled.size, "sort_s": sort_s.get(group),
                                   "order0_bits": sum(order0_bits(qw.codes[n].numpy()) for n in names),
                                   "order0_pooled_bits": order0_bits(pooled)}
        report["rows"].append(rans_row(group, names, rans))
        for layout in layouts:
            perm_bytes = 2 * sum(qw.codes[n].shape[0] for n in names) if layout == "sorted" else 0
            data = layout_bytes(qw.codes, names, layout, orders)
            report["rows"] += run_coders(coders, data, {"group": group, "layout": layout}, perm_bytes)
    for r in report["rows"]:
        info = report["groups"][r["group"]]
        r["bits_per_value"], r["vs_order0"] = 8 * r["bytes"] / info["values"], 8 * r["bytes"] / info["order0_bits"] - 1
    payload = remainder_payload(qw)
    coders = {**coders, "brotli-11 shuffled": shuffled(coders["brotli-11"])}
    report["remainder"] = {"raw_bytes": len(payload), "order0_bits": order0_bits(np.frombuffer(payload, np.int8)),
                           "artifact_raw": stats["remainder_raw"], "artifact_bytes": stats["remainder_bytes"],
                           "rows": run_coders(coders, payload, {"group": "remainder", "layout": "-"})}
    print(f"similarity sort seconds per group: { {g: round(s, 2) for g, s in sort_s.items()} }")
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
