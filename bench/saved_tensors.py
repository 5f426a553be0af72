"""What one compiled training block saves for its backward (CPU; the partition is AOTAutograd's, as on the GPU).

Each saved activation is written by the forward and read back by the backward: on the GPU, at the record's 98,304-token
micro-batch, every [T, d] bf16 tensor is ~100 MB of HBM traffic each way per layer visit (17 visits a looped micro-step).
Attention runs as an opaque custom op with FA4's interface and saved set (q, k, v, out, lse), computed here by the exact
CPU path; the MLP takes its training path (LeakyReluSquaredMLP's custom ops, plain on CPU).
--memory-budget B sets torch._functorch.config.activation_memory_budget (1.0: the default partition; lower values
make the partitioner recompute more and save less).
Usage: python bench/saved_tensors.py [--tokens 4096] [--layer 4] [--parallel] [--memory-budget 1.0]
"""
import argparse
import sys
from pathlib import Path

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def cpu_fa4_op():
    """train_gpt.fa4_varlen_op over the exact CPU attention forward; lse and the gradients are zeros (only the graph's
    structure matters here)."""
    def forward(q, k, v, cu_seqlens_q, max_seqlen_q, **_):
        out = tg.varlen_causal_attention(q, k, v, cu_seqlens_q, max_seqlen_q, "sdpa")
        return out, q.new_zeros((q.size(1), q.size(0)), dtype=torch.float32)

    def backward(q, k, v, out, dout, lse, **_):  # zeros: what it reads is what counts here
        return [torch.zeros_like(t) for t in (q, k, v)]
    return tg.fa4_varlen_op(forward, backward, name="cpu_fa4_probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--parallel", action="store_true", help="the two-lane parallel-residual block")
    parser.add_argument("--memory-budget", type=float, default=1.0)
    args = parser.parse_args()
    torch._functorch.config.activation_memory_budget = args.memory_budget
    h = tg.Hyperparameters.from_env()
    tg.load_attention_kernels()["fa4"] = cpu_fa4_op()
    T, d = args.tokens, h.model_dim
    saved = []

    def forward_compiler(gm, example_inputs):
        for node in [n for n in gm.graph.nodes if n.op == "output"][0].args[0]:
            value = getattr(node, "meta", {}).get("val")
            if isinstance(value, torch.Tensor):
                saved.append((node.name, value.dtype, tuple(value.shape), value.numel() * value.element_size()))
        return gm

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    block = torch.compile(tg.Block(h, args.layer), backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x, x0, lane1 = (torch.randn(1, T, d, generator=g).bfloat16().requires_grad_() for _ in range(3))
    kv = h.num_kv_heads * d // h.num_heads
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (int(h.mlp_mult * d), d), (d, int(h.mlp_mult * d))]
    weights = [torch.randn(*s, generator=g).bfloat16().requires_grad_() for s in shapes]
    cu = torch.tensor([0, T // 4, T // 2 + 100, T], dtype=torch.int32)
    attn_args = (tg.rope_tables(T, h.rope_dims, h.rope_base, "cpu"), cu, T, "fa4")
    extra = dict(lane1=lane1, lambdas=(torch.ones(2), torch.ones(2, 2))) if args.parallel else {}
    out = block(x, x0, weights, torch.tensor(1.0), attn_args, **extra)
    sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    unit = T * d * 2
    activations = [s for s in saved if s[2][:1] not in {(d,), (kv,), (int(h.mlp_mult * d),)} or len(s[2]) != 2]
    print(f"saved_tensors block:{'parallel' if args.parallel else 'sequential'} tokens:{T} "
          f"memory_budget:{args.memory_budget} (sizes in [T, d] bf16 units)")
    for name, dtype, shape, nbytes in sorted(activations, key=lambda s: -s[3]):
        print(f"  {name:28s} {str(dtype):16s} {str(shape):24s} {nbytes / unit:5.2f}")
    print(f"saved_tensors total:{sum(s[3] for s in activations) / unit:.2f} "
          f"fp32:{sum(s[3] for s in activations if s[1] == torch.float32) / unit:.2f}")


if __name__ == "__main__":
    main()
