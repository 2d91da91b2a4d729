"""Fine-tuning: `llmpy train --model` from pretrained weights, run as a user runs it.

The weights really are the file's: the first step's loss equals transformers'
loss of that model on the first batch the DataLoader gives (and its gradient
norm, torch's), for a model saved by transformers (a Hugging Face directory),
for the same model as an llm.c .bin written here with NumPy from the HF
tensors (not by llmpy's writer), and for the same model served by a stand-in
for the Hugging Face hub on 127.0.0.1 (tests/fixtures/hub_server.py), the
second time from huggingface_hub's cache with HF_HUB_OFFLINE=1. A fine-tune
then goes through the same loop as any run: stop + --resume equals the
uninterrupted run byte for byte, two ranks equal one process accumulating.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from llmpy.data.prepare import prepare_pydoc
from llmpy.data.shards import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fixtures.hub_server import HubServer  # noqa: E402

B, T = 4, 32
RUN = ["-B", str(B), "-T", str(T), "--lr", "1e-3", "--warmup-steps", "2", "--val-every", "0",
       "--sample-every", "0", "--sample-tokens", "4", "--no-progress"]


def llmpy(*args, cwd, env=None):
    """`llmpy ARGS` in one process; the Hugging Face settings are the test's
    alone (none inherited: HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, ...)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX", "HF_", "HUGGINGFACE_"))}
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "llmpy", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=300)


def init_line(stdout: str) -> str:
    """The line after `llmpy train`'s header."""
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("llmpy train: model"))
    return lines[i + 1]


def first_record(out: Path) -> dict:
    return json.loads((out / "log.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")["train"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small GPT-2 saved by transformers, weights drawn wider than GPT-2's
    init (std 0.2) so its loss (11.15) is far from a fresh init's ln(50257) = 10.82."""
    d = tmp_path_factory.mktemp("pretrained") / "hf"
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  initializer_range=0.2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def transformers_first_step(model_dir: Path, data: str, seed: int = 0) -> tuple[float, float]:
    """(loss, gradient norm) of the HF model in model_dir on the first batch
    that `llmpy train --seed seed` reads."""
    x, y = DataLoader(data, B, T, seed=seed).next_batch()
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).float()
    logits = model(torch.from_numpy(x.astype(np.int64))).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                             torch.from_numpy(y.astype(np.int64)).view(-1))
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def llmc_bin_from_hf(model_dir: Path, path: Path):
    """llm.c's model file (fp32, version 3) of an HF GPT-2, written from the
    format's definition (llm.c's train_gpt2.py write_model): a 256-int32
    header, then the tensors in llm.c's order, HF's Conv1D weights (in, out)
    transposed to llm.c's (out, in), wte padded with zero rows to a multiple
    of 128."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sd = load_file(str(model_dir / "model.safetensors"))
    V, maxT, L, NH, C = (cfg[k] for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"))
    Vp = (V + 127) // 128 * 128
    h = lambda l, name: sd[f"transformer.h.{l}.{name}"]   # noqa: E731
    layers = lambda name, t=False: np.stack([h(l, name).T if t else h(l, name) for l in range(L)])  # noqa: E731
    wte = np.zeros((Vp, C), np.float32)
    wte[:V] = sd["transformer.wte.weight"]
    tensors = [wte, sd["transformer.wpe.weight"], layers("ln_1.weight"), layers("ln_1.bias"),
               layers("attn.c_attn.weight", True), layers("attn.c_attn.bias"),
               layers("attn.c_proj.weight", True), layers("attn.c_proj.bias"),
               layers("ln_2.weight"), layers("ln_2.bias"), layers("mlp.c_fc.weight", True),
               layers("mlp.c_fc.bias"), layers("mlp.c_proj.weight", True), layers("mlp.c_proj.bias"),
               sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    header = np.zeros(256, "<i4")
    header[:8] = [20240326, 3, maxT, V, L, NH, C, Vp]
    path.write_bytes(header.tobytes() + b"".join(np.ascontiguousarray(t, "<f4").tobytes() for t in tensors))


def assert_first_step_is_transformers(out: Path, model_dir: Path, data: str):
    loss, norm = transformers_first_step(model_dir, data)
    rec = first_record(out)
    assert abs(rec["loss"] - loss) < 2e-5, (rec["loss"], loss)
    assert abs(rec["grad_norm"] - norm) < 1e-4 * norm, (rec["grad_norm"], norm)
    assert loss > 11          # a fresh init gives ln(50257) = 10.82: the weights decide it


def test_finetune_from_a_hugging_face_directory(tmp_path, data, pretrained):
    r = llmpy("train", "--model", str(pretrained), "--data", data, *RUN, "--steps", "1", "--out", "run",
              cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert init_line(r.stdout) == f"init: pretrained weights from {pretrained} (Hugging Face directory)"
    assert_first_step_is_transformers(tmp_path / "run", pretrained, data)


@pytest.mark.slow
def test_finetune_from_an_llmc_bin_stop_and_resume_bitwise(tmp_path, data, pretrained):
    model = tmp_path / "gpt2_tiny.bin"
    llmc_bin_from_hf(pretrained, model)
    args = ["--model", str(model), "--data", data, *RUN, "--steps", "4", "--checkpoint-every", "100"]
    r = llmpy("train", *args, "--out", "straight", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert init_line(r.stdout) == f"init: pretrained weights from {model} (llm.c model file)"
    assert_first_step_is_transformers(tmp_path / "straight", pretrained, data)

    r = llmpy("train", *args, "--out", "split", "--stop-at", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = llmpy("train", *args, "--out", "split", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "steps 2->4" in r.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "split/ckpt_00000004" / name).read_bytes() == \
            (tmp_path / "straight/ckpt_00000004" / name).read_bytes(), name


def _mpirun():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpirun") or shutil.which("mpirun", path=str(Path(sys.executable).parent))


@pytest.mark.slow
@pytest.mark.skipif(_mpirun() is None, reason="needs mpirun and mpi4py: pip install -e '.[dist]'")
def test_finetune_two_ranks_equal_one_process_accumulating(tmp_path, data, pretrained):
    """One process, accum 2, reads windows [0, B) then [B, 2B) of each step;
    two ranks, accum 1, read the same windows, one each: the same steps."""
    args = ["--model", str(pretrained), "--data", data, *RUN, "--steps", "2", "--total-batch-size", str(2 * B * T)]
    r = llmpy("train", *args, "--out", "one", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accum=2" in r.stdout
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    r = subprocess.run([_mpirun(), "-np", "2", sys.executable, "-m", "llmpy", "train", *args, "--out", "two"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x 2 ranks" in r.stdout and "accum=1" in r.stdout
    assert init_line(r.stdout).startswith("init: pretrained weights from")
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert np.allclose(losses[0], losses[1], rtol=1e-5, atol=0), losses
    one, two = (load_file(str(tmp_path / d / "ckpt_00000002" / "model.safetensors")) for d in ("one", "two"))
    a, b = (np.concatenate([sd[k].ravel() for k in sorted(sd)]) for sd in (one, two))
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-6     # the sums differ in order only


# ---------------------------------------------------------------------- the hub


@pytest.fixture
def hub(pretrained):
    server = HubServer()
    files = {name: (pretrained / name).read_bytes() for name in ("config.json", "model.safetensors")}
    server.add_repo("gpt2", dict(files, **{"README.md": b"# a tiny stand-in for gpt2\n"}))
    yield server
    server.close()


@pytest.mark.slow
def test_finetune_gpt2_from_the_hub_then_from_its_cache_offline(tmp_path, data, pretrained, hub):
    cache = tmp_path / "hf_home" / "hub"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    args = ["train", "--model", "gpt2", "--data", data, *RUN, "--steps", "1"]
    r = llmpy(*args, "--out", "online", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    line = init_line(r.stdout)
    m = re.fullmatch(r"init: pretrained weights from gpt2 \(Hugging Face hub, cached in (.+)\)", line)
    assert m, line
    snapshot = Path(m.group(1))
    assert snapshot.parent.parent == cache / "models--gpt2"          # huggingface_hub's cache layout
    assert (snapshot / "model.safetensors").read_bytes() == (pretrained / "model.safetensors").read_bytes()
    assert ("GET", "/gpt2/resolve/" + snapshot.name + "/model.safetensors") in hub.requests
    assert not any("README" in path for _, path in hub.requests)     # only what llmpy reads
    assert_first_step_is_transformers(tmp_path / "online", pretrained, data)

    # the second run needs no network: the hub is gone, HF_HUB_OFFLINE says so
    hub.close()
    r = llmpy(*args, "--out", "offline", cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert init_line(r.stdout) == line
    assert first_record(tmp_path / "offline")["loss"] == first_record(tmp_path / "online")["loss"]


def test_gpt2_offline_without_a_cache_is_one_line_naming_the_cache(tmp_path, data, hub):
    empty = tmp_path / "empty_home"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(empty), "HF_HUB_OFFLINE": "1"}
    r = llmpy("train", "--model", "gpt2", "--data", data, *RUN, "--steps", "1", "--out", "run", cwd=tmp_path,
              env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(empty / "hub") in err and "HF_HUB_OFFLINE" in err, err
    assert hub.requests == []                                         # offline means no request at all

    # a hub that does not answer (no HF_HUB_OFFLINE): also one line
    hub.close()
    r = llmpy("train", "--model", "gpt2", "--data", data, *RUN, "--steps", "1", "--out", "run", cwd=tmp_path,
              env={"HF_ENDPOINT": hub.url, "HF_HOME": str(empty), "HF_HUB_ETAG_TIMEOUT": "2"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "\n" not in r.stderr.strip() and str(empty / "hub") in r.stderr, r.stderr


# ---------------------------------------------------------------------- the rule


def test_a_preset_is_a_random_init_from_the_seed_and_gpt2_is_not_a_preset(monkeypatch):
    from llmpy import families
    from llmpy.formats import hf
    model, init = families.build("d2", seed=7, seq_len=32)
    assert init == "random (seed 7)" and model.config.n_layer == 2
    assert np.array_equal(model.params.flat, families.build("d2", seed=7, seq_len=32)[0].params.flat)

    class AskedTheHub(Exception):
        pass

    def from_hub(name):
        raise AskedTheHub(name)
    monkeypatch.setattr(hf, "from_hub", from_hub)
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):     # config.PRESETS has them as shapes
        with pytest.raises(AskedTheHub, match=name):
            families.build(name)


def test_a_missing_model_path_is_one_line(tmp_path, data):
    r = llmpy("train", "--model", "runs/nope/ckpt_00000010", "--data", data, *RUN, "--steps", "1", cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and "runs/nope/ckpt_00000010" in err and "gpt2" in err and "d12" in err, err
