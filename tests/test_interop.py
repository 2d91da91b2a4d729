"""Hugging Face interop both ways, on random models of several shapes, and the
hub/offline and pytorch_model.bin branches of llmpy.load."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmpy
from llmpy.errors import LlmpyError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 1, 8, 50, 8), (2, 4, 32, 100, 16), (3, 2, 48, 257, 12)]   # L, H, C, V, maxT


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def hf_model(L, H, C, V, T, seed=0):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("L, H, C, V, T", SHAPES)
def test_llmpy_save_loads_in_transformers(tmp_path, L, H, C, V, T):
    model = llmpy.GPT(llmpy.GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=C), seed=L)
    model.params.flat[:] += 0.1 * np.random.default_rng(0).standard_normal(model.params.flat.size).astype(np.float32)
    model.params.views["wte"][V:] = 0
    model.save(tmp_path / "m")
    hm = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ids = np.random.default_rng(1).integers(0, V, (2, T))
    with torch.no_grad():
        want = hm(torch.from_numpy(ids)).logits.numpy()
    got, _ = model.forward(ids)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("L, H, C, V, T", SHAPES)
def test_transformers_save_loads_in_llmpy(tmp_path, L, H, C, V, T, safe):
    """safetensors, and pytorch_model.bin (torch is installed here)."""
    hm = hf_model(L, H, C, V, T)
    hm.save_pretrained(tmp_path / "m")
    if not safe:   # what older transformers wrote: a pickled state dict (recent ones write safetensors only)
        (tmp_path / "m" / "model.safetensors").unlink()
        torch.save(hm.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    model = llmpy.load(tmp_path / "m")
    ids = np.random.default_rng(1).integers(0, V, (2, T))
    with torch.no_grad():
        want = hm(torch.from_numpy(ids)).logits.numpy()
    got, _ = model.forward(ids)
    assert rel(got, want) < 1e-5


def run_offline(code, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf_home"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_hub_name_offline_says_it_needs_a_local_directory(tmp_path):
    code = ("import llmpy\n"
            "try:\n    llmpy.load('gpt2')\n"
            "except llmpy.LlmpyError as e:\n    print('LLMPYERROR', e)\n")
    r = run_offline(code, tmp_path)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("LLMPYERROR gpt2:") and "local" in line and "directory" in line, line
    r = run_offline("import sys, llmpy.cli; sys.exit(llmpy.cli.main(['convert', 'gpt2', 'out.bin', '--to', 'llmc']))",
                    tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "gpt2" in r.stderr, r.stderr


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(LlmpyError, match="no such model directory or file"):
        llmpy.load(tmp_path / "nowhere")


def test_bf16_directory_loads_upcast(tmp_path):
    """transformers can save bfloat16 weights; llmpy upcasts them exactly."""
    hm = hf_model(2, 2, 16, 60, 8).to(torch.bfloat16)
    hm.save_pretrained(tmp_path / "m")
    model = llmpy.load(tmp_path / "m")
    ids = np.random.default_rng(1).integers(0, 60, (2, 8))
    with torch.no_grad():
        want = hm.float()(torch.from_numpy(ids)).logits.numpy()
    got, _ = model.forward(ids)
    assert rel(got, want) < 1e-5
