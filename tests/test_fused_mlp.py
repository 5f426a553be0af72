"""The MLP's training path (LeakyReluSquaredMLP): the same values and gradients as the plain ops; the Triton kernel
(run by Triton's CPU interpreter when triton is installed, and on a GPU when there is one) computes the fused GEMM +
activation / gradient epilogues; training takes the fused path, no-grad passes (eval, GPTQ calibration) the plain one."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]


def plain_mlp(z, w_up, w_down):
    return F.linear(F.leaky_relu(F.linear(z, w_up), 0.5).square(), w_down)


def values_and_grads(fn, z, w_up, w_down, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (z, w_up, w_down)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_function_equals_the_plain_ops(dtype):
    """Off the Triton path the custom ops run the plain ops: value and all three gradients equal, bit for bit."""
    g = torch.Generator().manual_seed(0)
    z, w_up, w_down = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 7, 16), (64, 16), (16, 64)))
    dy = torch.randn(2, 7, 16, generator=g).to(dtype)
    fused = values_and_grads(tg.LeakyReluSquaredMLP.apply, z, w_up, w_down, dy)
    plain = values_and_grads(plain_mlp, z, w_up, w_down, dy)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (fused[0] != 0).any() and all(t.abs().sum() > 0 for t in fused[1:])


def test_fused_mlp_compiled_equals_the_plain_ops_and_the_ops_pass_opcheck():
    """As the training blocks run it: inside torch.compile (AOTAutograd traces the ops through their fake
    implementations; two outputs sharing one fake tensor once made it alias pre and post: wrong gradients)."""
    g = torch.Generator().manual_seed(1)
    z, w_up, w_down = (torch.randn(*s, generator=g) for s in ((2, 9, 16), (64, 16), (16, 64)))
    dy = torch.randn(2, 9, 16, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(tg.LeakyReluSquaredMLP.apply, dynamic=False, fullgraph=True)
    for a, b in zip(values_and_grads(compiled, z, w_up, w_down, dy), values_and_grads(plain_mlp, z, w_up, w_down, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    x = z.reshape(-1, 16)
    pre, _ = tg.leaky_sq_up(x, w_up)
    torch.library.opcheck(tg.leaky_sq_up, (x, w_up))
    torch.library.opcheck(tg.leaky_sq_grad, (dy.reshape(-1, 16), w_down, pre))


def test_training_takes_the_fused_path_and_no_grad_the_plain_one(monkeypatch):
    calls, fused = [], tg.LeakyReluSquaredMLP

    class Counting(fused):
        @staticmethod
        def forward(ctx, z, w_up, w_down):
            calls.append(z.shape)
            return fused.forward(ctx, z, w_up, w_down)

    monkeypatch.setattr(tg, "LeakyReluSquaredMLP", Counting)
    h = tg.Hyperparameters(vocab_size=64, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=3,
                           loop_start=1, loop_end=1, num_loops=1, parallel_start_layer=2)
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():  # W_down starts at zero, which would leave W_up without gradient
        model.mlp_down_bank.normal_(0, 0.05)
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        model.forward_logits(ids)
    assert calls == []
    model(ids, torch.randint(0, 64, (1, 24))).backward()
    assert len(calls) == 3  # one per layer visit
    assert model.mlp_up_bank.grad.abs().sum() > 0 and model.mlp_down_bank.grad is not None
    model.requires_grad_(False)  # TTT: frozen base weights, plain path even with grad on
    model.forward_logits(ids.clone())
    assert len(calls) == 3


# Triton's interpreter (numpy) in a fresh process: TRITON_INTERPRET is read when the kernel is defined. Its tl.dot
# is wrong for bf16 (triton 3.6), so the kernel is checked in fp16 and fp32: the same code for any dtype.
INTERPRETER_PROBE = r"""
import torch, torch.nn.functional as F
import train_gpt as tg
g = torch.Generator().manual_seed(0)
tile = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)
M, K, N = 100, 48, 96  # M not a multiple of BLOCK_M; 4 row tiles, GROUP_M 2; 3 column tiles
for dtype in (torch.float16, torch.float32):
    x, dy = (torch.randn(M, K, generator=g).to(dtype) for _ in range(2))
    w_up = torch.randn(N, K, generator=g).to(dtype)
    w_down = torch.randn(K, N, generator=g).to(dtype)
    pre, post = tg.leaky_sq_gemm(x, w_up.T, tile=tile)  # B strided (transposed view)
    ref = F.linear(x.double(), w_up.double())
    assert pre.dtype == dtype and pre.shape == (M, N)
    assert ((pre.double() - ref).abs() <= 1e-3 * ref.abs() + 1e-3).all(), "pre != x W_up^T"
    assert torch.equal(post, F.leaky_relu(pre, 0.5).square()), "post != LeakyReLU(pre)^2 of the rounded pre"
    grad = tg.leaky_sq_gemm(dy, w_down, pre, tile=tile)  # B contiguous
    ref = (dy.double() @ w_down.double()).to(dtype).double() * torch.where(pre > 0, 2 * pre, 0.5 * pre).double()
    assert ((grad.double() - ref).abs() <= 2e-3 * ref.abs() + 1e-2).all(), "grad != (dy W_down) * f'(pre)"
    assert (pre < 0).any() and (pre > 0).any()
print("ok")
"""


def test_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


HOPPER = torch.cuda.is_available() and tg.triton is not None and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU and triton")
def test_triton_path_on_gpu_matches_the_plain_ops():
    """bf16 at the record's MLP shape: the kernels' outputs equal eager's to a bf16 ulp or two (GEMM order)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    M, d = tg.LEAKY_SQ_MIN_ROWS + 77, 512
    z = torch.randn(M, d, device="cuda", generator=g).bfloat16()
    w_up = (torch.randn(4 * d, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    w_down = (torch.randn(d, 4 * d, device="cuda", generator=g) / (4 * d) ** 0.5).bfloat16()
    dy = torch.randn(M, d, device="cuda", generator=g).bfloat16()
    assert tg.leaky_sq_gemm_fits(z, w_up.T) and tg.leaky_sq_gemm_fits(dy, w_down)
    assert not tg.leaky_sq_gemm_fits(z[:tg.LEAKY_SQ_MIN_ROWS - 1], w_up.T)  # too few rows: the plain ops
    fused = values_and_grads(tg.LeakyReluSquaredMLP.apply, z, w_up, w_down, dy)
    plain = values_and_grads(plain_mlp, z, w_up, w_down, dy)
    for a, b in zip(fused, plain):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 0.02 * scale, (a.float() - b.float()).abs().max() / scale
    pre, post = tg.leaky_sq_gemm(z, w_up.T)
    assert torch.equal(post, F.leaky_relu(pre, 0.5).square())


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU and triton")
def test_triton_kernel_compiles_once_per_direction_for_any_row_count():
    """Global TTT rows have every length: a compile per row count would land in the timed eval."""
    def compiled_variants():
        return sum(len(cache[0]) for cache in tg.leaky_sq_gemm_kernel.device_caches.values())
    d = 512
    w_up, w_down = (torch.randn(4 * d, d, device="cuda").bfloat16(), torch.randn(d, 4 * d, device="cuda").bfloat16())
    before = None
    for rows in (2560, 2000, 1999, 17, 1):
        pre, _ = tg.leaky_sq_gemm(torch.randn(rows, d, device="cuda").bfloat16(), w_up.T)
        tg.leaky_sq_gemm(torch.randn(rows, d, device="cuda").bfloat16(), w_down, pre)
        before = compiled_variants() if before is None else before
        assert compiled_variants() == before, f"recompiled for {rows} rows"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast runs pow in fp32; CPU autocast does not")
@pytest.mark.parametrize("rows", [2561, tg.LEAKY_SQ_MIN_ROWS])
def test_the_function_under_cuda_autocast_equals_the_plain_ops(rows):
    """As global TTT runs it (eager, bf16 autocast; 2,561 rows take the plain fallback inside the custom ops) and as
    training does (the Triton path on Hopper): the fallback's LeakyReLU^2 is computed in fp32 by autocast and must come
    back as bf16 (it once returned fp32, and the backward's dy^T @ post failed on mixed dtypes). Values and gradients
    agree with the plain ops under the same autocast to a bf16 ulp or two."""
    g = torch.Generator(device="cuda").manual_seed(0)
    d = 512
    z = torch.randn(rows, d, device="cuda", generator=g).bfloat16()
    w_up = (torch.randn(4 * d, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    w_down = (torch.randn(d, 4 * d, device="cuda", generator=g) / (4 * d) ** 0.5).bfloat16()
    dy = torch.randn(rows, d, device="cuda", generator=g).bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        pre, post = tg.leaky_sq_up(z, w_up)
        assert pre.dtype == post.dtype == torch.bfloat16
        fused = values_and_grads(tg.LeakyReluSquaredMLP.apply, z, w_up, w_down, dy)
        plain = values_and_grads(plain_mlp, z, w_up, w_down, dy)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 0.02 * scale, (a.float() - b.float()).abs().max() / scale
