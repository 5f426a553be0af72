"""Training micro-steps replayed from CUDA graphs (Trainer.graphed_micro_step): the same losses and weights as the
micro-steps issued op by op, graphs per (looping, cu_seqlens entries) captured only after an eager run of that shape
compiled nothing, eager runs only with no graphs held, and the graphs' memory given back after training. GPU only: CUDA graphs have no CPU form (on CPU
the trainer issues every micro-step eagerly, which the other training tests cover)."""
import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_training import structured_stream, tiny_h, write_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def gpu_h(**overrides) -> tg.Hyperparameters:
    """Head dim 64 (every attention backend takes it) and 16,384-token micro-batches: the MLP takes its fused Triton
    path (>= LEAKY_SQ_MIN_ROWS rows) on Hopper, so the captures hold those kernels too."""
    return tiny_h(model_dim=128, num_heads=2, num_kv_heads=1, rope_dims=16, train_seq_len=1024,
                  train_batch_tokens=8 * 16_384, **overrides)


@pytest.fixture(scope="module")
def gpu_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("gpu_data"), structured_stream(600_000, 512, 0),
                         structured_stream(3 * 64 * 3 + 1, 512, 1))


def run_steps(h: tg.Hyperparameters, data: str, steps: int, looping_from: int, log=None):
    device = torch.device("cuda", 0)
    tg.configure_torch(device)
    model = tg.build_model(h, device, lambda m: None)
    trainer = tg.Trainer(h, model, tg.train_shard_files(data), 0, 1, device, log=log or (lambda m: None))
    losses = []
    for k in range(steps):
        model.set_looping(k >= looping_from)
        losses.append(trainer.step(k, 1.0).item())
    weights = {name: t.detach().float().clone() for name, t in model.state_dict().items()}
    return trainer, losses, weights


def test_graphed_steps_equal_eager_steps_and_release_their_memory(gpu_dataset):
    lines = []
    eager, eager_losses, eager_weights = run_steps(gpu_h(train_cuda_graphs=False), gpu_dataset, 6, 3)
    assert eager.graphs is None
    del eager
    graphed, losses, weights = run_steps(gpu_h(), gpu_dataset, 6, 3, lines.append)
    captures = [line for line in lines if line.startswith("train_cuda_graph ")]
    assert [line.split()[1] for line in captures] == ["looping:0", "looping:1"], captures
    # the looped shape's eager runs freed the unlooped graphs (their pool would have held memory beside them)
    assert {looping for looping, _ in graphed.graphs} == {True}
    assert all(np.isfinite(losses))
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4, atol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(value, eager_weights[name], rtol=2e-3, atol=2e-5, msg=name)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    graphed.release_graphs()
    assert not graphed.graphs and torch.cuda.memory_reserved() < before


def test_a_shape_is_captured_only_after_an_eager_run_that_compiled_nothing(gpu_dataset):
    """One step = 8 micro-batches of one cu_seqlens shape: the first compiles, the second compiles nothing and settles
    the shape, the third is captured (twice: the replays alternate); so after one step one shape has graphs, and later
    steps capture none."""
    lines = []
    trainer, losses, _ = run_steps(gpu_h(), gpu_dataset, 1, 99, lines.append)
    (key,) = trainer.graphs
    assert key in trainer.settled_keys and key[0] is False and len(trainer.graphs[key]) == 2
    trainer.step(1, 1.0)
    assert len([line for line in lines if line.startswith("train_cuda_graph ")]) == 1


def test_the_timed_loop_runs_from_graphs_and_frees_them(gpu_dataset):
    lines = []
    h = dataclasses.replace(gpu_h(), iterations=4, warmup_steps=1, train_log_every=1)
    device = torch.device("cuda", 0)
    model = tg.build_model(h, device, lambda m: None)
    trainer = tg.Trainer(h, model, tg.train_shard_files(gpu_dataset), 0, 1, device, log=lines.append)
    trainer.warmup()  # unlooped, looped (its eager runs free the unlooped graphs), then unlooped captured again
    assert set(trainer.graphs) == {(False, 256), (True, 256)}
    captures = [line.split()[1] for line in lines if line.startswith("train_cuda_graph ")]
    assert captures == ["looping:0", "looping:1", "looping:0"], captures
    trainer.train(val=None)  # nothing captured in the timed loop
    assert trainer.steps == 4 and not trainer.graphs
    assert len([line for line in lines if line.startswith("train_cuda_graph ")]) == 3
    step_lines = [line for line in lines if line.startswith("step:")]
    assert len(step_lines) == 4 and "step:4/4" in step_lines[-1]
