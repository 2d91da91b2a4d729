"""`llmpy train` end to end, run as a user runs it: a subprocess in a fresh directory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from llmpy.data.prepare import prepare_pydoc

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "d2", "-B", "4", "-T", "32", "--lr", "3e-3", "--warmup-steps", "2",
        "--val-every", "4", "--val-steps", "2", "--sample-every", "0", "--sample-tokens", "8", "--no-progress"]


def llmpy(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llmpy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    info = prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")
    return ["--data", str(info["train"]), "--val-data", str(info["val"])]


def test_train_end_to_end(tmp_path, pydoc):
    """Loss falls; log.jsonl, loss.png and a checkpoint that transformers' layout expects appear."""
    r = llmpy("train", *pydoc, *TINY, "--steps", "16", "--checkpoint-every", "8", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    for rec in records:
        assert {"step", "loss", "lr", "grad_norm", "ms", "tokens_per_s"} <= rec.keys()
    assert "val_loss" in records[3] and "val_loss" in records[15]
    first, last = np.mean([r["loss"] for r in records[:2]]), np.mean([r["loss"] for r in records[-2:]])
    assert last < first - 1.0, (first, last)   # from ~10.8 (uniform over 50257) clearly down
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted(p.name for p in out.glob("ckpt_*"))
    assert ckpts == ["ckpt_00000008", "ckpt_00000016"]
    sd = load_file(str(out / "ckpt_00000016" / "model.safetensors"))
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (128, 384)
    assert "sample after 16 steps" in r.stdout


def test_resume_is_bitwise_identical(tmp_path, pydoc):
    """Stop at step N, --resume to 2N == an uninterrupted 2N-step run, byte for byte."""
    args = [*pydoc, *TINY, "--steps", "10", "--checkpoint-every", "100"]
    r = llmpy("train", *args, "--out", "straight", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = llmpy("train", *args, "--out", "split", "--stop-at", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "split" / "ckpt_00000010").exists()
    r = llmpy("train", *args, "--out", "split", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "continuing from" in r.stdout and "ckpt_00000005" in r.stdout
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = (tmp_path / "straight" / "ckpt_00000010" / name).read_bytes()
        b = (tmp_path / "split" / "ckpt_00000010" / name).read_bytes()
        assert a == b, name
    losses = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("straight") == losses("split")


def test_resume_skips_a_checkpoint_that_does_not_verify(tmp_path, pydoc):
    args = [*pydoc, *TINY, "--steps", "6", "--checkpoint-every", "3", "--keep", "0"]
    assert llmpy("train", *args, "--out", "run", "--stop-at", "6", cwd=tmp_path).returncode == 0
    weights = tmp_path / "run" / "ckpt_00000006" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = llmpy("train", *args, "--out", "run", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipping" in r.stdout and "ckpt_00000006" in r.stdout and "sha256" in r.stdout
    assert "continuing from" in r.stdout and "ckpt_00000003" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--data", "nowhere/*.bin"], "nowhere/*.bin"),
    (["--model", "d999"], "d999"),
    (["--total-batch-size", "1000"], "total-batch-size"),
    (["--steps", "0"], "--steps"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, pydoc, args, needle):
    base = pydoc if "--data" not in args else []
    r = llmpy("train", *base, *TINY, "--steps", "2", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_sample_and_eval_from_a_checkpoint(tmp_path, pydoc):
    assert llmpy("train", *pydoc, *TINY, "--steps", "2", "--out", "run", cwd=tmp_path).returncode == 0
    ckpt = str(tmp_path / "run" / "ckpt_00000002")
    r = llmpy("sample", ckpt, "--prompt", "The list", "--tokens", "5", "--seed", "1", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("The list"), r.stderr
    r = llmpy("eval", ckpt, "--data", pydoc[3], "--steps", "2", "-T", "32", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["perplexity"] == pytest.approx(np.exp(res["val_loss"]))


def test_bench_json_reports_the_required_fields(tmp_path):
    r = llmpy("bench", "--model", "d2", "-B", "2", "-T", "16", "--steps", "5", "--compare", "torch", "--json",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("ms_per_step", "tokens_per_s", "sgemm_gflops", "floor_share", "torch_ms_per_step", "ratio"):
        assert res[key] > 0, key
    assert res["ratio"] == pytest.approx(res["ms_per_step"] / res["torch_ms_per_step"], rel=0.01)


def test_device_cuda_without_a_gpu_is_one_clear_line(tmp_path, pydoc):
    from conftest import gpu_unavailable_reason
    if gpu_unavailable_reason() is None:
        pytest.skip("this machine has a GPU")
    r = llmpy("train", *pydoc, "--device", "cuda", "--model", "d2", "--steps", "1", "--out", "run", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmpy train: error: --device cuda"), r.stderr
    assert "Traceback" not in r.stderr
