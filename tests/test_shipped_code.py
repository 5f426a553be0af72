"""The shipped code (`submission/`): the counted code bytes are exactly the shipped files' sizes, the shipped
files are smaller than the source, and the shipped train_gpt.py and online_ngram_tilt.py compute what the
source computes (a tiny GPT's logits, the n-gram hints), with __name__, __file__ and imports the stubs'."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter with `folder` first on sys.path: what `import train_gpt` finds there is tested.
PROBE = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(1)
import train_gpt as t
h = t.Hyperparameters(vocab_size=256, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=3,
                      loop_start=1, loop_end=1, num_loops=2, parallel_start_layer=2, train_seq_len=32)
torch.manual_seed(0)
model = t.GPT(h)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    logits = model.forward_logits(torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1)))
stream = np.random.default_rng(2).integers(0, 6, 3000)
hint, gate = t.ngram.token_hints(np.concatenate([stream, stream[:500]]), order=4)
torch.save({"logits": logits, "hint": torch.from_numpy(hint), "gate": torch.from_numpy(gate)}, sys.argv[2])
print(json.dumps({"name": t.__name__, "file": t.__file__, "ngram": t.ngram.__file__,
                  "c_source": str(t.ngram.C_SOURCE), "gated": int(gate.sum()),
                  "mlp_source": inspect.getsource(t.LeakyReluSquaredMLP)}))
"""


def run_probe(folder: Path, out: Path, cache: Path) -> dict:
    env = {**os.environ, "NGRAM_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(out)], capture_output=True, text=True,
                            env=env, cwd=out.parent, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"probe in {folder} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_counted_code_bytes_are_the_shipped_files_and_smaller_than_the_source(tmp_path):
    sizes = tg.write_shipped_code(ROOT, tmp_path / "submission")
    files = sorted((tmp_path / "submission").iterdir())
    assert [f.name for f in files] == sorted(tg.EVAL_CODE_FILES)
    assert sizes == {f.name: f.stat().st_size for f in files}
    raw = {name: (ROOT / name).stat().st_size for name in tg.EVAL_CODE_FILES}
    assert sum(sizes.values()) < sum(raw.values())
    assert sizes["train_gpt.py"] < raw["train_gpt.py"] // 2
    c_file = "online_ngram_state.c"
    assert (tmp_path / "submission" / c_file).read_bytes() == (ROOT / c_file).read_bytes()
    for name in ("train_gpt.py", "online_ngram_tilt.py"):
        stub = (tmp_path / "submission" / name).read_bytes()
        assert stub.startswith(tg.SHIPPED_STUB_PREFIX) and stub.count(b"\n") == 1
    again = tg.write_shipped_code(tmp_path / "submission", tmp_path / "submission")  # a shipped run ships itself
    assert again == sizes


def test_a_stub_runs_as_main_with_its_own_file(tmp_path):
    (tmp_path / "hello.py").write_bytes(tg.shipped_python(b"import sys\nprint(__name__, __file__, sys.path[0])\n"))
    out = subprocess.run([sys.executable, str(tmp_path / "hello.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["__main__", str(tmp_path / "hello.py"), str(tmp_path)]


def test_shipped_code_computes_what_the_source_computes(tmp_path):
    shipped = tmp_path / "submission"
    tg.write_shipped_code(ROOT, shipped)
    source_info = run_probe(ROOT, tmp_path / "source.pt", tmp_path / "cache_source")
    shipped_info = run_probe(shipped, tmp_path / "shipped.pt", tmp_path / "cache_shipped")
    assert shipped_info["name"] == "train_gpt" and shipped_info["file"] == str(shipped / "train_gpt.py")
    assert shipped_info["ngram"] == str(shipped / "online_ngram_tilt.py")
    assert shipped_info["c_source"] == str(shipped / "online_ngram_state.c")
    assert source_info["file"] == str(ROOT / "train_gpt.py") and shipped_info["gated"] > 100
    # triton.jit reads its kernel's source: the stub must make inspect.getsource work in the shipped module
    assert shipped_info["mlp_source"] == source_info["mlp_source"] and "class LeakyReluSquaredMLP" in \
        source_info["mlp_source"]
    source, from_shipped = torch.load(tmp_path / "source.pt"), torch.load(tmp_path / "shipped.pt")
    assert torch.equal(source["logits"], from_shipped["logits"]) and torch.isfinite(source["logits"]).all()
    assert torch.equal(source["hint"], from_shipped["hint"]) and torch.equal(source["gate"], from_shipped["gate"])
    assert list((tmp_path / "cache_shipped").iterdir()), "the shipped online_ngram_tilt built no native library"
