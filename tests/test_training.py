"""Optimizers, schedules, per-micro-batch clipping, EMA, the timed loop and the diagnostic eval (spec 02 §4-5)."""
import dataclasses
import lzma
import json
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SHARED


def write_shard(path, values):
    values = np.asarray(values, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, len(values)
    path.write_bytes(header.tobytes() + values.tobytes())
    return path


def tiny_h(**overrides) -> tg.Hyperparameters:
    """A 4-layer, 32-wide GPT with looping and a parallel layer; steps of 8 micro-batches of 128 tokens."""
    base = dict(vocab_size=512, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, xsa_last_n=4, loop_start=1,
                loop_end=2, num_loops=1, parallel_start_layer=3, rope_dims=8, gate_window=8, train_seq_len=64,
                eval_seq_len=64, train_batch_tokens=8 * 128, val_batch_tokens=8 * 2 * 64, max_wallclock_seconds=0.0,
                iterations=4, warmup_steps=1, val_loss_every=0, train_log_every=1)
    return dataclasses.replace(tg.Hyperparameters.from_env({}), **{**base, **overrides})


def structured_stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Documents (BOS + 20..150 tokens) whose next token follows from the current one most of the time."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        t = int(rng.integers(8, vocab))
        out.append(tg.BOS_ID)
        for _ in range(int(rng.integers(20, 150))):
            out.append(t)
            t = (5 * t + 3) % (vocab - 8) + 8 if rng.random() < 0.8 else int(rng.integers(8, vocab))
    return np.asarray(out[:n])


def write_dataset(folder, train_tokens: np.ndarray, val_tokens: np.ndarray) -> str:
    write_shard(folder / "fineweb_train_000000.bin", train_tokens)
    write_shard(folder / "fineweb_val_000000.bin", val_tokens)
    write_shard(folder / "fineweb_val_bytes_000000.bin", np.where(val_tokens == tg.BOS_ID, 0, 2 + val_tokens % 3))
    return str(folder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), structured_stream(60_000, 512, 0),
                         structured_stream(3 * 64 * 3 + 1, 512, 1))


def make_trainer(h, data_path, **kwargs) -> tg.Trainer:
    torch.manual_seed(0)
    return tg.Trainer(h, tg.GPT(h), tg.train_shard_files(data_path), log=kwargs.pop("log", lambda m: None), **kwargs)


# --- Muon ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 32, 96), (2, 128, 32)])
@pytest.mark.parametrize("dtype, band", [(torch.float32, (0.8589, 1.1411)), (torch.bfloat16, (0.84, 1.16))])
def test_polar_express_maps_singular_values_into_the_band(shape, dtype, band):
    """Inputs whose singular values, relative to the Frobenius norm, are spread over [4e-3, 1] leave with all of
    them in the Polar-Express band (spec 02 §4.2: [0.8589, 1.1411] for [1e-3, 1]; bf16 widens it a little)."""
    gen = torch.Generator().manual_seed(0)
    batch, rows, cols = shape
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(batch, rows, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(batch, cols, k, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(-2, 0, k, dtype=torch.float64).expand(batch, k) * 7.0
    x = (u * s[:, None, :]) @ v.mT
    sv = torch.linalg.svdvals(tg.polar_express(x.to(dtype), 5).double())
    assert sv.shape == (batch, k)
    assert band[0] <= sv.min().item() and sv.max().item() <= band[1], (sv.min().item(), sv.max().item())


def _muon(params, **kwargs):
    args = dict(lr=0.1, momentum=0.9, weight_decay=0.0, backend_steps=5, row_normalize=True)
    return tg.Muon(params, **{**args, **kwargs})


def test_muon_update_is_lr_times_shape_scale_times_near_orthogonal():
    """Zero momentum and decay: the step is lr * sqrt(max(1, out/in)) * O, O near-orthogonal; only the tall
    (MLP-up shaped) bank gets scale 2."""
    gen = torch.Generator().manual_seed(1)
    square, wide, tall = (torch.nn.Parameter(torch.zeros(s)) for s in ((2, 32, 32), (2, 16, 32), (2, 128, 32)))
    for p in (square, wide, tall):
        p.grad = torch.randn(p.shape, generator=gen)
    _muon([square, wide, tall], momentum=0.0).step()
    for p, scale in ((square, 1.0), (wide, 1.0), (tall, 2.0)):
        sv = torch.linalg.svdvals(-p.detach() / 0.1)
        assert 0.8 * scale < sv.min() and sv.max() < 1.2 * scale


def test_muon_nesterov_row_normalization_and_decay_match_the_formula():
    """Two steps against spec 02 §4.2 written out by hand (orthogonalization replaced by the identity)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(3, 8, 4, generator=gen))
    grads = [torch.randn(3, 8, 4, generator=gen) for _ in range(2)]
    opt = _muon([p], lr=0.05, momentum=0.9, weight_decay=0.1, orthogonalize=lambda x, steps: x)
    expected, buf = p.detach().clone(), torch.zeros(3, 8, 4)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        u = g + 0.9 * buf
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        expected = expected * (1 - 0.05 * 0.1) - 0.05 * math.sqrt(8 / 4) * u  # shape scale sqrt(max(1, out/in))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_ignores_zero_matrices_and_keeps_them_zero():
    p = torch.nn.Parameter(torch.zeros(2, 8, 8))
    p.grad = torch.zeros(2, 8, 8)
    p.grad[0] = torch.randn(8, 8)
    _muon([p]).step()
    assert torch.count_nonzero(p.detach()[1]) == 0 and torch.count_nonzero(p.detach()[0]) > 0


def test_optimizer_groups_follow_the_parameter_table():
    h = tiny_h()
    model = tg.GPT(h)
    adamw, muon = tg.build_optimizers(model, h)
    names = {id(p): n for n, p in model.named_parameters()}
    tok, scalar = ([names[id(p)] for p in g["params"]] for g in adamw.param_groups)
    assert tok == ["tok_emb.weight"]
    assert sorted(names[id(p)] for p in muon.param_groups[0]["params"]) == sorted(tg.MUON_BANKS)
    assert not {"softcap_pos", "softcap_neg", *tg.MUON_BANKS, "tok_emb.weight"} & set(scalar)
    assert len(scalar) + 1 + 4 + 2 == len(names)
    assert [(g["lr"], g["weight_decay"]) for g in adamw.param_groups] == [(0.03, 0.085), (0.02, 0.02)]
    assert adamw.defaults["betas"] == (0.9, 0.99) and adamw.defaults["eps"] == 1e-8
    assert (muon.param_groups[0]["lr"], muon.param_groups[0]["weight_decay"]) == (0.028, 0.095)


# --- schedules -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frac, expected", [(0.0, 1.0), (0.1499, 1.0), (0.15, 1.0), (0.35, 0.7647), (0.5, 0.5882),
                                            (0.75, 0.2941), (0.9, 0.1176), (0.915, 0.1), (1.0, 0.1)])
def test_lr_multiplier_at_the_spec_points(frac, expected):
    assert tg.lr_multiplier(frac, tiny_h(**{})) == pytest.approx(expected, abs=1e-4)


def test_training_fraction_is_wallclock_based_with_the_gptq_reserve():
    h = dataclasses.replace(tg.Hyperparameters.from_env({}), max_wallclock_seconds=600.0, gptq_reserve_seconds=0.5)
    assert tg.budget_ms(h) == 599_500
    assert tg.training_fraction(209_825, 7, h) == pytest.approx(0.35)
    assert tg.training_fraction(123.0, 500, dataclasses.replace(h, max_wallclock_seconds=0.0)) == 500 / 20000


def test_muon_momentum_warmup():
    h = tg.Hyperparameters.from_env({})
    assert [tg.muon_momentum(s, h) for s in (0, 750, 1500, 4000)] == pytest.approx([0.92, 0.945, 0.97, 0.97])


# --- per-micro-batch clipping ----------------------------------------------------------------------------------


def _params_with_grads(seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 3), (5,), (2, 3, 3))]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("scale", [0.01, 10.0])  # clipping idle / binding
def test_clipping_one_micro_batch_equals_clip_grad_norm(scale):
    params, reference = _params_with_grads(0, scale), _params_with_grads(0, scale)
    total = torch.nn.utils.clip_grad_norm_(reference, 0.3)
    assert (total > 0.3) == (scale > 1)
    grad_sum = tg.ClippedGradientSum(params[:2], params[2:], 0.3)
    grad_sum.add_micro_batch()
    assert all(p.grad is None for p in params)
    grad_sum.install(num_micro_batches=1, world_size=1)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)


def test_clipping_is_per_micro_batch_and_the_same_on_one_or_two_ranks():
    """mean_k clip(g_k): two micro-batches in one process, or one on each of two ranks (their sums added as the
    all-reduce does) give bit-identical gradients."""
    micro = [_params_with_grads(1, 10.0), _params_with_grads(2, 0.01)]
    expected = [torch.zeros_like(p) for p in micro[0]]
    for params in micro:
        clipped = [p.grad.clone() for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
        for e, g in zip(expected, clipped):
            e += g * min(1.0, 0.3 / (norm.item() + 1e-6)) / 2
    one_process = [torch.nn.Parameter(torch.zeros_like(p)) for p in micro[0]]
    grad_sum = tg.ClippedGradientSum(one_process, [], 0.3)
    for params in micro:
        for target, p in zip(one_process, params):
            target.grad = p.grad.clone()
        grad_sum.add_micro_batch()
    grad_sum.install(num_micro_batches=2, world_size=1)
    ranks = []
    for params in micro:
        rank_sum = tg.ClippedGradientSum([torch.nn.Parameter(torch.zeros_like(p)) for p in params], [], 0.3)
        for target, p in zip(rank_sum.params, params):
            target.grad = p.grad.clone()
        rank_sum.add_micro_batch()
        rank_sum.flat.div_(2)
        ranks.append(rank_sum.flat)
    torch.testing.assert_close(grad_sum.flat, ranks[0] + ranks[1], rtol=0, atol=0)
    for p, e in zip(one_process, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)


# --- EMA -------------------------------------------------------------------------------------------------------


def test_ema_closed_form_and_a_constant_tensor_stays_bit_identical():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(30.0)  # like the frozen softcaps: never moves
    ema = tg.EMA(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.fill_(2.0)
        ema.update()
    assert torch.equal(ema.shadow["bias"], torch.full((2,), 30.0))
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 3), 2.0 - 0.9 ** 3), rtol=1e-6, atol=1e-6)
    ema.load_into(model)
    torch.testing.assert_close(model.weight.detach(), torch.full((2, 3), 2.0 - 0.729))


# --- configuration ---------------------------------------------------------------------------------------------

TRAINING_FIELDS = ["iterations", "max_wallclock_seconds", "gptq_reserve_seconds", "warmup_steps",
                   "train_batch_tokens", "train_log_every", "val_loss_every", "val_batch_tokens",
                   "enable_looping_at", "matrix_lr", "tied_embed_lr", "scalar_lr", "muon_momentum",
                   "muon_momentum_warmup_start", "muon_momentum_warmup_steps", "muon_backend_steps",
                   "muon_row_normalize", "muon_wd", "beta1", "beta2", "adam_eps", "adam_wd", "embed_wd",
                   "warmdown_frac", "min_lr", "grad_clip_norm", "ema_decay", "run_id"]
SAMPLE = {"int": ("7", 7), "float": ("0.125", 0.125), "bool": ("0", False), "str": ("abc", "abc")}


def test_every_training_knob_parses_from_its_env_var_and_is_logged():
    fields = {f.name: f for f in dataclasses.fields(tg.Hyperparameters)}
    assert set(TRAINING_FIELDS) <= set(fields)
    env = {name.upper(): SAMPLE[fields[name].type][0] for name in TRAINING_FIELDS}
    h = tg.Hyperparameters.from_env(env)
    lines = []
    tg.log_hyperparameters(h, lines.append)
    for name in TRAINING_FIELDS:
        assert getattr(h, name) == SAMPLE[fields[name].type][1], name
        assert f"  {name}: {getattr(h, name)}  (env)" in lines
    assert tg.Hyperparameters.from_env({"MUON_ROW_NORMALIZE": "1"}).muon_row_normalize is True


@pytest.mark.parametrize("name, raw", [("ITERATIONS", "1e3"), ("MATRIX_LR", "fast"), ("MUON_ROW_NORMALIZE", "yes"),
                                       ("WARMUP_STEPS", "")])
def test_junk_env_values_raise_naming_the_variable(name, raw):
    with pytest.raises(ValueError, match=name):
        tg.Hyperparameters.from_env({name: raw})


def test_record_defaults_of_the_training_group():
    h = tg.Hyperparameters.from_env({})
    assert h.train_batch_tokens // tg.MICRO_BATCHES == 98_304
    assert (h.warmup_steps, h.ema_decay, h.grad_clip_norm) == (20, 0.9965, 0.3)
    assert (h.warmdown_frac, h.min_lr, h.enable_looping_at, h.muon_backend_steps) == (0.85, 0.1, 0.35, 5)


# --- the loop --------------------------------------------------------------------------------------------------


class FakeClockTrainer(tg.Trainer):
    """Each step takes exactly 10 ms of a fake clock and trains nothing; records the LR multiplier it got."""

    def __init__(self, *args, **kwargs):
        self.t, self.lr_scales = 0.0, []
        super().__init__(*args, now=lambda: self.t, **kwargs)

    def step(self, step, lr_scale, batches=None):
        self.t += 0.010
        self.lr_scales.append(lr_scale)
        return torch.zeros(())


def test_looping_switches_on_at_the_configured_fraction_and_the_loop_stops_at_the_budget(dataset):
    lines = []
    h = tiny_h(max_wallclock_seconds=1.25, gptq_reserve_seconds=0.25, iterations=1000, train_log_every=50)
    trainer = FakeClockTrainer(h, make_trainer(h, dataset).model, tg.train_shard_files(dataset), log=lines.append)
    trainer.train(val=None)
    switch = [line for line in lines if line.startswith("layer_loop")]
    assert switch == ["layer_loop:enabled step:35 frac:0.350 encoder:[0, 1, 2] decoder:[1, 2, 3]"]
    assert trainer.model.looping
    assert len(trainer.lr_scales) == 100 and lines[-1] == "stopping_early:wallclock_cap train_time:1000ms step:100/1000"
    assert trainer.lr_scales[50] == pytest.approx(tg.lr_multiplier(0.5, h))
    assert trainer.lr_scales[99] == pytest.approx(h.min_lr)


def one_shape_dataset(folder) -> str:
    """One document per 129-token micro-batch span (tiny_h), cut once at train_seq_len 64: every micro-batch has the
    same 3 cu_seqlens entries, so a graph key never changes within a looping mode."""
    stream = np.random.default_rng(0).integers(8, 512, 40 * 129)
    stream[::129] = tg.BOS_ID
    return write_dataset(folder, stream, structured_stream(3 * 64 * 3 + 1, 512, 1))


class StandInGraph:
    """A captured micro-step on CPU: capturing records the call, replay() runs it on the captured tensors."""

    def __init__(self, trainer, static):
        self.trainer, self.static, self.replays = trainer, static, 0

    def replay(self):
        self.replays += 1
        self.trainer.micro_step(*self.static)


class StandInGraphTrainer(tg.Trainer):
    """Trainer.graphed_micro_step's logic with StandInGraph for CUDA graphs; counts eager micro-steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graphs, self.eager_runs, self.releases = {}, 0, 0

    def capture_micro_step(self, static):
        return StandInGraph(self, static)

    def micro_step(self, *batch):
        self.eager_runs += 1
        super().micro_step(*batch)

    def release_graphs(self):
        self.releases += bool(self.graphs)
        super().release_graphs()


def test_graph_replay_logic_gives_the_eager_steps(tmp_path):
    """Micro-steps through graphed_micro_step (stand-in graphs that replay micro_step on their captured tensors): the
    same losses and weights as plain steps, bit for bit, which needs each batch copied into the replayed graph's
    tensors and nothing run at capture. A shape runs eagerly once (nothing compiles on CPU), is captured twice at its
    next use and then replayed in turn; switching to looping runs the new shape eagerly after freeing the graphs."""
    h = tiny_h()
    data = one_shape_dataset(tmp_path)
    plain = make_trainer(h, data)
    torch.manual_seed(0)
    graphed = StandInGraphTrainer(h, tg.GPT(h), tg.train_shard_files(data), log=lambda m: None)
    for trainer in (plain, graphed):
        trainer.losses = []
        for k in range(4):
            trainer.model.set_looping(k >= 2)
            trainer.losses.append(trainer.step(k, 1.0).item())
    assert graphed.losses == plain.losses
    for (name, a), b in zip(plain.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(graphed.graphs) == {(True, 3)} and graphed.releases == 1  # looping's eager run freed the unlooped ones
    assert [graph.replays for graph, _ in graphed.graphs[(True, 3)]] == [8, 7]  # 16 micro-batches: 1 eager, 15 replays
    assert graphed.eager_runs == 2 * 16  # one eager run per shape + one run per replay, none at capture
    assert graphed.settled_keys == {(False, 3), (True, 3)}


def test_warmup_leaves_graphs_for_both_modes_and_the_timed_loop_captures_none(tmp_path):
    """With graphs, the warm-up ends with an unlooped step: the looped eager runs freed the unlooped graphs, and a
    capture in the timed loop would count against the training budget."""
    lines = []
    h = tiny_h(warmup_steps=1, iterations=4)
    data = one_shape_dataset(tmp_path)
    torch.manual_seed(0)
    trainer = StandInGraphTrainer(h, tg.GPT(h), tg.train_shard_files(data), log=lines.append)
    trainer.warmup()
    assert set(trainer.graphs) == {(False, 3), (True, 3)} and not trainer.model.looping
    captures = len([line for line in lines if line.startswith("train_cuda_graph ")])
    trainer.train(val=None)
    assert trainer.model.looping and trainer.steps == 4
    assert len([line for line in lines if line.startswith("train_cuda_graph ")]) == captures == 3


def test_warmup_is_fully_reverted(dataset):
    h = tiny_h(warmup_steps=1)
    trainer = make_trainer(h, dataset)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    first_batch = [t.clone() for t in trainer.loader.next_batch()]
    trainer.loader = trainer.new_loader()
    trainer.warmup()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert not trainer.adamw.state and not trainer.muon.state
    assert not trainer.model.looping
    assert all(torch.equal(a, b) for a, b in zip(trainer.loader.next_batch(), first_batch))


def real_text_tokens(num_docs: int) -> np.ndarray:
    import sentencepiece as spm
    import lossless_caps
    sp = spm.SentencePieceProcessor(model_file=str(SHARED / "golden" / "caseops_v1_reserved_sp8192.model"))
    tokens = []
    with lzma.open(SHARED / "data" / "english_mix_v1.jsonl.xz", "rt") as f:
        for _, line in zip(range(num_docs), f):
            tokens += [tg.BOS_ID] + sp.encode(lossless_caps.encode(json.loads(line)["text"]))
    return np.asarray(tokens)


def test_loss_falls_on_real_text(tmp_path):
    tokens = real_text_tokens(120)
    data = write_dataset(tmp_path, tokens[4096:], tokens[:3 * 64 * 4 + 1])
    h = tiny_h(vocab_size=8192, model_dim=64, num_heads=4, num_kv_heads=2, iterations=12, val_batch_tokens=8 * 4 * 64)
    lines = []
    trainer = make_trainer(h, data, log=lines.append)
    val = tg.load_validation(data, h.eval_seq_len, h.vocab_size)
    start_loss, _ = tg.evaluate_bpb(trainer.model, val, h)
    ema = trainer.train(val)
    end_loss, end_bpb = tg.evaluate_bpb(trainer.model, val, h)
    assert start_loss == pytest.approx(math.log(8192), abs=0.05)  # identity blocks at init: ~uniform
    assert end_loss < start_loss - 1.0, (start_loss, end_loss)
    assert lines[-1].startswith(f"step:12/12 val_loss:{end_loss:.4f} val_bpb:{end_bpb:.4f} eval_time:")
    ema.load_into(trainer.model)
    assert trainer.model.softcap_pos.item() == 30.0 and trainer.model.softcap_neg.item() == 30.0  # Q2: untouched


@pytest.mark.parametrize("world_size", [3, 6, 16])
def test_world_sizes_that_do_not_divide_the_step_are_rejected(dataset, monkeypatch, world_size):
    with pytest.raises(ValueError, match=f"world size {world_size}"):
        make_trainer(tiny_h(), dataset, world_size=world_size)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError, match=f"WORLD_SIZE={world_size}"):
        tg.setup_distributed()


# --- diagnostic eval -------------------------------------------------------------------------------------------


class BigramModel(torch.nn.Module):
    """forward_logits depends only on the current token: every target's loss is known in closed form."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)))
        self.calls = []

    def forward_logits(self, ids, cu_seqlens=None, max_seqlen=None):
        self.calls.append((ids.shape, cu_seqlens))
        return self.table[ids]


def test_eval_scores_every_target_once_with_its_bytes():
    h = tiny_h(eval_seq_len=64, val_batch_tokens=8 * 3 * 64)  # 3 rows per forward; 7 rows -> 3 + 3 + 1 (padded)
    stream = torch.from_numpy(structured_stream(7 * 64 + 1, 512, 5))
    val = tg.ValidationData(stream, torch.where(stream == tg.BOS_ID, 0, 1 + stream % 4).int())
    model = BigramModel(512)
    loss, bpb = tg.evaluate_bpb(model, val, h)
    nll = torch.nn.functional.cross_entropy(model.table[stream[:-1]].double(), stream[1:], reduction="sum").item()
    assert loss == pytest.approx(nll / (7 * 64), rel=1e-6)
    assert bpb == pytest.approx(nll / (math.log(2) * val.token_bytes[1:].double().sum().item()), rel=1e-6)
    assert [shape for shape, _ in model.calls] == [(1, 3 * 64)] * 3
    cu = model.calls[0][1]
    assert cu[0] == 0 and cu[-1] == 3 * 64 and {0, 64, 128} <= set(cu.tolist())
    bos = torch.nonzero(stream[:3 * 64] == tg.BOS_ID).flatten().tolist()
    assert set(bos) <= set(cu.tolist())


def test_eval_packing_equals_scoring_each_row_alone(dataset):
    h = tiny_h()
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():  # non-trivial blocks (Wo, Wdown are zero at init)
        model.qo_bank.normal_(0, 0.2)
        model.mlp_down_bank.normal_(0, 0.1)
    val = tg.load_validation(dataset, h.eval_seq_len, h.vocab_size)
    loss, _ = tg.evaluate_bpb(model, val, h)
    total = 0.0
    with torch.no_grad():
        for row in range(val.num_targets // 64):
            x, y = val.tokens[row * 64:row * 64 + 64], val.tokens[row * 64 + 1:row * 64 + 65]
            cu, _ = tg.build_cu_seqlens(np.flatnonzero(x.numpy() == tg.BOS_ID), 64, 64)
            logits = model.forward_logits(x[None], torch.from_numpy(cu), 64)[0]
            total += torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum").item()
    assert loss == pytest.approx(total / val.num_targets, rel=1e-5)


# --- embedded demo ---------------------------------------------------------------------------------------------


def test_demo_corpus_is_deterministic_and_free_of_object_addresses():
    docs = tg.demo_corpus(("json", "textwrap"))
    assert docs == tg.demo_corpus(("json", "textwrap")) and len(docs) >= 5
    assert all(doc.strip() == doc and doc for doc in docs)
    assert not any(" at 0x" in doc for doc in docs)


def test_demo_configuration_builds_a_looping_model():
    h = tg.demo_hyperparameters(tg.Hyperparameters.from_env({}))
    model = tg.GPT(h)
    model.set_looping(True)
    assert sum(len(layers) for layers in model.schedule()) > h.num_layers
    assert h.train_batch_tokens % tg.MICRO_BATCHES == 0 and h.data_path == tg.DEMO_DATA_PATH
