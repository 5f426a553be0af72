"""The MLP's fused GEMM epilogues against cuBLAS + Inductor, at the record's micro-batch (one GPU).

Usage (repo root, one CUDA GPU):  python bench/bench_mlp.py [--tokens 98304] [--json out.json]
Times (CUDA events, median of --repeats after warm-up), per 98,304-token micro-batch and one layer visit:
  - cuBLAS alone: the up-projection GEMM z W_up^T and the backward's dy W_down (the floor either fused kernel's GEMM
    part is compared with);
  - train_gpt.leaky_sq_gemm forward / backward for a few tiles (train_gpt's LEAKY_SQ_TILES among them), and the
    candidate variants of candidate_kernels() (TMA, persistent, both);
  - the whole MLP forward + backward (grads of z, W_up, W_down), compiled as the training blocks compile it:
    plain ops (Inductor fuses the activation into elementwise kernels of its own) vs LeakyReluSquaredMLP;
  - the same eagerly at global-TTT row sizes (--eager-rows; that phase runs uncompiled).
--no-sweep skips the kernel and tile sweep.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import timed  # noqa: E402  (it also puts the repo root on sys.path)
import train_gpt as tg  # noqa: E402

TILES = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
]


def candidate_kernels() -> dict:
    """Variants of train_gpt.leaky_sq_gemm_kernel measured here: 'tma' (TMA loads and stores from host-made
    descriptors), 'persistent' (one program per SM looping over tiles, the loop flattened so that the software
    pipeline overlaps a tile's epilogue with the next tile's loads) and 'tma_persistent' (both, the epilogue in two
    column halves). Each: run(a, b, pre=None, tile, b_rows_are_k) like leaky_sq_gemm."""
    try:
        import triton
        import triton.language as tl
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return {}
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    @triton.jit
    def tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), N // BLOCK_N
        group = GROUP_M * tiles_n
        first_m = (tile // group) * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return (first_m + (tile % group) % rows) * BLOCK_M, ((tile % group) // rows) * BLOCK_N

    @triton.jit
    def epilogue_tma(acc, pre_desc, out_desc, off_m, off_n, BACKWARD: tl.constexpr):
        g = acc.to(tl.bfloat16).to(tl.float32)
        if BACKWARD:
            u = pre_desc.load([off_m, off_n]).to(tl.float32)
            out_desc.store([off_m, off_n], (g * tl.where(u > 0, 2.0 * u, 0.5 * u)).to(tl.bfloat16))
        else:
            pre_desc.store([off_m, off_n], g.to(tl.bfloat16))
            act = tl.where(g > 0, g, 0.5 * g)
            out_desc.store([off_m, off_n], (act * act).to(tl.bfloat16))

    @triton.jit
    def mainloop_tma(a_desc, b_desc, off_m, off_n, K: tl.constexpr, B_ROWS_ARE_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(K // BLOCK_K):
            a = a_desc.load([off_m, k * BLOCK_K])
            if B_ROWS_ARE_K:
                b = b_desc.load([k * BLOCK_K, off_n])
            else:
                b = b_desc.load([off_n, k * BLOCK_K]).T
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def tma_kernel(a_desc, b_desc, pre_desc, out_desc, M, N, K: tl.constexpr, BACKWARD: tl.constexpr,
                   B_ROWS_ARE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
        off_m, off_n = tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = mainloop_tma(a_desc, b_desc, off_m, off_n, K, B_ROWS_ARE_K, BLOCK_M, BLOCK_N, BLOCK_K)
        epilogue_tma(acc, pre_desc, out_desc, off_m, off_n, BACKWARD)

    @triton.jit
    def tma_persistent_kernel(a_desc, b_desc, pre_desc, out_desc, M, N, K: tl.constexpr, BACKWARD: tl.constexpr,
                              B_ROWS_ARE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
        start = tl.program_id(0)
        num_tiles = tl.cdiv(M, BLOCK_M) * (N // BLOCK_N)
        tile_c = start - NUM_SMS  # the epilogue's own counter: keeps it apart from the prologue in the pipeline
        for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
            off_m, off_n = tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = mainloop_tma(a_desc, b_desc, off_m, off_n, K, B_ROWS_ARE_K, BLOCK_M, BLOCK_N, BLOCK_K)
            tile_c += NUM_SMS
            off_m, off_n = tile_origin(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            epilogue_tma(acc0, pre_desc, out_desc, off_m, off_n, BACKWARD)
            epilogue_tma(acc1, pre_desc, out_desc, off_m, off_n + BLOCK_N // 2, BACKWARD)

    @triton.jit
    def persistent_kernel(a_ptr, b_ptr, pre_ptr, out_ptr, M, N, K: tl.constexpr, stride_am, stride_bk, stride_bn,
                          BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
        start = tl.program_id(0)
        num_tiles = tl.cdiv(M, BLOCK_M) * (N // BLOCK_N)
        tile_c = start - NUM_SMS
        rk = tl.arange(0, BLOCK_K)
        for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
            off_m, off_n = tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            rm = (off_m + tl.arange(0, BLOCK_M)) % M
            rn = off_n + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(K // BLOCK_K):
                a = tl.load(a_ptr + rm[:, None] * stride_am + (k * BLOCK_K + rk)[None, :])
                b = tl.load(b_ptr + (k * BLOCK_K + rk)[:, None] * stride_bk + rn[None, :] * stride_bn)
                acc = tl.dot(a, b, acc)
            tile_c += NUM_SMS
            off_m, off_n = tile_origin(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            rm = off_m + tl.arange(0, BLOCK_M)
            offsets, in_rows = rm[:, None] * N + (off_n + tl.arange(0, BLOCK_N))[None, :], (rm < M)[:, None]
            g = acc.to(tl.bfloat16).to(tl.float32)
            if BACKWARD:
                u = tl.load(pre_ptr + offsets, mask=in_rows).to(tl.float32)
                tl.store(out_ptr + offsets, (g * tl.where(u > 0, 2.0 * u, 0.5 * u)).to(tl.bfloat16), mask=in_rows)
            else:
                tl.store(pre_ptr + offsets, g.to(tl.bfloat16), mask=in_rows)
                act = tl.where(g > 0, g, 0.5 * g)
                tl.store(out_ptr + offsets, (act * act).to(tl.bfloat16), mask=in_rows)

    def outputs(a, N, pre):
        out = a.new_empty((a.size(0), N))
        return out, (a.new_empty((a.size(0), N)) if pre is None else pre)

    def run_tma(a, b, pre=None, *, tile, b_rows_are_k=True, persistent=False):
        bm, bn, bk = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
        (M, K), N = a.shape, (b.size(1) if b_rows_are_k else b.size(0))
        forward = pre is None
        out, pre = outputs(a, N, pre)
        store_n = bn // 2 if persistent else bn
        descs = (TensorDescriptor.from_tensor(a, [bm, bk]),
                 TensorDescriptor.from_tensor(b, [bk, bn] if b_rows_are_k else [bn, bk]),
                 TensorDescriptor.from_tensor(pre, [bm, store_n]), TensorDescriptor.from_tensor(out, [bm, store_n]))
        tiles = triton.cdiv(M, bm) * (N // bn)
        if persistent:
            tma_persistent_kernel[(min(sms, tiles),)](*descs, M, N, K, BACKWARD=not forward,
                                                      B_ROWS_ARE_K=b_rows_are_k, NUM_SMS=sms, **tile)
        else:
            tma_kernel[(tiles,)](*descs, M, N, K, BACKWARD=not forward, B_ROWS_ARE_K=b_rows_are_k, **tile)
        return (pre, out) if forward else out

    def run_persistent(a, b, pre=None, *, tile, b_rows_are_k=True):
        b = b if b_rows_are_k else b.T
        (M, K), N = a.shape, b.size(1)
        forward = pre is None
        out, pre = outputs(a, N, pre)
        tiles = triton.cdiv(M, tile["BLOCK_M"]) * (N // tile["BLOCK_N"])
        persistent_kernel[(min(sms, tiles),)](a, b, pre, out, M, N, K, a.stride(0), b.stride(0), b.stride(1),
                                              BACKWARD=not forward, NUM_SMS=sms, **tile)
        return (pre, out) if forward else out

    return {"tma": run_tma, "persistent": run_persistent,
            "tma_persistent": lambda *a, **k: run_tma(*a, persistent=True, **k)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=98_304, help="rows of one micro-batch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--eager-rows", default="2560,1999", help="row counts of the eager comparison")
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel and tile sweep")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available() or tg.triton is None:
        sys.exit("bench_mlp.py: needs a CUDA GPU and triton")
    h = tg.Hyperparameters.from_env()
    d, hidden, M = h.model_dim, int(h.mlp_mult * h.model_dim), args.tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(M, d, device="cuda", generator=g).bfloat16()
    dy = torch.randn(M, d, device="cuda", generator=g).bfloat16()
    w_up = (torch.randn(hidden, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    w_down = (torch.randn(d, hidden, device="cuda", generator=g) / hidden ** 0.5).bfloat16()
    results, repeats = {"gpu": torch.cuda.get_device_name(), "tokens": M, "torch": torch.__version__}, args.repeats
    gemm_gflop = 2 * M * d * hidden / 1e9

    def report(name, ms, note="", gflop=gemm_gflop):
        results[name] = ms
        print(f"bench_mlp {name:<44} {ms:7.3f} ms  {gflop / ms:6.0f} TFLOP/s of one GEMM {note}", flush=True)

    report("cublas_up_gemm", timed(lambda: F.linear(z, w_up), repeats)[1])
    report("cublas_down_dgrad_gemm", timed(lambda: dy @ w_down, repeats)[1])
    pre_ref, post_ref = tg.leaky_sq_gemm(z, w_up.T)
    assert torch.equal(post_ref, F.leaky_relu(pre_ref, 0.5).square())
    pre_err = ((pre_ref.float() - F.linear(z, w_up).float()).abs().max() / pre_ref.float().abs().max()).item()
    print(f"bench_mlp check: max |pre - cuBLAS| / max |pre| = {pre_err:.2e}")
    kernels = {"pointer": lambda a, b, pre=None, *, tile, b_rows_are_k=True:
               tg.leaky_sq_gemm(a, b if b_rows_are_k else b.T, pre, tile), **candidate_kernels()}
    for tile in [] if args.no_sweep else TILES:
        name = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}_w{num_warps}_s{num_stages}".format(**tile)
        for kind, run in kernels.items():
            try:
                fwd = lambda: run(z, w_up, tile=tile, b_rows_are_k=False)  # noqa: E731
                bwd = lambda: run(dy, w_down, pre_ref, tile=tile)  # noqa: E731
                pre, post = fwd()
                same = torch.equal(pre, pre_ref) and torch.equal(post, post_ref)
                report(f"{kind}_forward_{name}", timed(fwd, repeats)[1], "" if same else "(MISMATCH)")
                grad = bwd()
                ref = (dy @ w_down) * torch.where(pre_ref > 0, 2 * pre_ref, 0.5 * pre_ref)
                err = ((grad.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                report(f"{kind}_backward_{name}", timed(bwd, repeats)[1], f"(rel err {err:.1e})")
            except Exception as e:  # a tile may not fit in shared memory: report and go on
                print(f"bench_mlp {kind} {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    def plain(z, w_up, w_down):
        return F.linear(F.leaky_relu(F.linear(z, w_up), 0.5).square(), w_down)

    for name, fn in (("mlp_fwd_bwd_plain_compiled", plain),
                     ("mlp_fwd_bwd_fused_compiled", tg.LeakyReluSquaredMLP.apply)):
        compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        leaves = [t.detach().clone().requires_grad_() for t in (z, w_up, w_down)]

        def step():
            for t in leaves:
                t.grad = None
            compiled(*leaves).backward(dy)
        report(name, timed(step, repeats)[1])
    for rows in map(int, args.eager_rows.split(",")):
        for name, fn in (("plain", plain), ("fused", tg.LeakyReluSquaredMLP.apply)):
            leaves = [t.detach().clone().requires_grad_() for t in (z[:rows], w_up, w_down)]
            report(f"eager_{rows}_rows_fwd_bwd_{name}", timed(lambda: fn(*leaves).backward(dy[:rows]), repeats)[1],
                   gflop=gemm_gflop * rows / M)
    saved = results["mlp_fwd_bwd_plain_compiled"] - results["mlp_fwd_bwd_fused_compiled"]
    print(f"bench_mlp fused saves {saved:.3f} ms per layer visit: {11 * saved:.2f} ms per micro-step unlooped (11 "
          f"visits), {17 * saved:.2f} ms looped (17)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
