"""`llmpy sample` and `llmpy eval` on a run directory of `llmpy train`.

One tiny run (d2, B=2, T=16, checkpoints at steps 1 and 2, a val shard of
exactly 5 batches measured whole) serves every test. References: the run's
own log.jsonl (the val loss training measured), transformers' greedy
generation from the checkpoint directory, and the manifest check that a
damaged checkpoint fails.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data.shards import write_shard
from llmpy.data.tokenizer import Tokenizer

B, T, VAL_BATCHES = 2, 16, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    write_shard(root / "train_000.bin", rng.integers(0, 50257, size=3000))
    # VAL_BATCHES * B windows of T + 1 tokens sharing their ends: one pass is VAL_BATCHES batches
    write_shard(root / "val_000.bin", rng.integers(0, 50257, size=VAL_BATCHES * B * T + 1))
    assert main(["train", "--model", "d2", "-B", str(B), "-T", str(T), "--steps", "2", "--warmup-steps", "1",
                 "--val-every", "2", "--val-steps", str(VAL_BATCHES), "--sample-every", "0", "--sample-tokens", "4",
                 "--checkpoint-every", "1", "--keep", "0", "--no-progress", "--data", str(root / "train_000.bin"),
                 "--val-data", str(root / "val_000.bin"), "--out", str(root / "out")]) == 0
    return root


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_of_a_run_equals_its_logged_val_loss(run, capsys):
    """No -B/-T/--steps: the run's own B and T, one pass over the val shard;
    the number is the val loss training logged for the same batches."""
    logged = [json.loads(line) for line in (run / "out" / "log.jsonl").read_text().splitlines()]
    logged = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    rc, out, err = run_cli(capsys, "eval", str(run / "out"), "--data", str(run / "val_000.bin"), "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert (res["B"], res["T"], res["batches"]) == (B, T, VAL_BATCHES)
    assert res["val_loss"] == pytest.approx(logged, abs=1e-6)       # the log keeps 6 decimals
    assert err.splitlines() == [f"llmpy eval: using {run / 'out' / 'ckpt_00000002'} "
                                "(the newest checkpoint that verifies)"]      # no progress bar off a terminal


def test_eval_never_loops_over_the_data(run, capsys):
    rc, out, err = run_cli(capsys, "eval", str(run / "out"), "--data", str(run / "val_000.bin"), "--steps", "50",
                           "--json")
    assert rc == 0 and json.loads(out)["batches"] == VAL_BATCHES
    assert "--steps 50 is more than one pass" in err and f"using {VAL_BATCHES}" in err
    rc, out, _ = run_cli(capsys, "eval", str(run / "out"), "--data", str(run / "val_000.bin"), "--steps", "2",
                         "--json")
    assert rc == 0 and json.loads(out)["batches"] == 2


def test_eval_defaults_without_a_run(capsys, tmp_path):
    """A model directory without train_state.json: B=4, T=min(block_size, 1024)."""
    import llmpy
    for block, want_T in ((2048, 1024), (64, 64)):
        llmpy.GPT(llmpy.GPTConfig(block_size=block, vocab_size=256, n_layer=1, n_head=1, n_embd=8)).save(
            tmp_path / f"m{block}")
        write_shard(tmp_path / "val.bin", np.random.default_rng(1).integers(0, 256, size=3 * 4 * want_T + 1))
        rc, out, err = run_cli(capsys, "eval", str(tmp_path / f"m{block}"), "--data", str(tmp_path / "val.bin"),
                               "--json")
        assert rc == 0, err
        res = json.loads(out)
        assert (res["B"], res["T"], res["batches"]) == (4, want_T, 3)


def test_sample_of_a_run_is_transformers_greedy(run, capsys):
    """--temperature 0 on the run directory: the newest checkpoint's greedy
    tokens, as transformers generates them from that directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer()
    prompt = "def main():"
    rc, out, err = run_cli(capsys, "sample", str(run / "out"), "--prompt", prompt, "--temperature", "0",
                           "--tokens", "6")
    assert rc == 0, err
    assert err.splitlines() == [f"llmpy sample: using {run / 'out' / 'ckpt_00000002'} "
                                "(the newest checkpoint that verifies)"]
    hm = transformers.GPT2LMHeadModel.from_pretrained(run / "out" / "ckpt_00000002").eval()
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = hm.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eot)
    assert out == prompt + tok.decode(ref[0, len(ids):].tolist()) + "\n"


def test_sample_skips_a_checkpoint_that_does_not_verify(run, capsys, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(run / "out", out_dir)
    weights = out_dir / "ckpt_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc, out, err = run_cli(capsys, "sample", str(out_dir), "--temperature", "0", "--tokens", "3")
    assert rc == 0, err
    assert err.splitlines() == [
        f"llmpy sample: skipping {out_dir / 'ckpt_00000002'}: model.safetensors fails its sha256 check",
        f"llmpy sample: using {out_dir / 'ckpt_00000001'} (the newest checkpoint that verifies)"]
    (out_dir / "ckpt_00000001" / "manifest.json").unlink()
    rc, out, err = run_cli(capsys, "sample", str(out_dir))
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no checkpoint verifies" in err and "ckpt_00000002: model.safetensors fails its sha256 check" in err
    assert "ckpt_00000001: no manifest.json" in err


def test_sample_num_samples_prompt_file_and_errors(run, capsys, tmp_path):
    ckpt = str(run / "out" / "ckpt_00000002")
    rc, out, _ = run_cli(capsys, "sample", ckpt, "--num-samples", "2", "--seed", "3", "--tokens", "5")
    assert rc == 0
    heads = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert heads == ["--- sample 1/2 (seed 3) ---", "--- sample 2/2 (seed 4) ---"]
    second = out.split("--- sample 2/2 (seed 4) ---\n", 1)[1]
    assert run_cli(capsys, "sample", ckpt, "--seed", "4", "--tokens", "5")[1] == second

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Ünïcode prompt\n", encoding="utf-8")
    rc, out, _ = run_cli(capsys, "sample", ckpt, "--prompt-file", str(prompt), "--tokens", "2")
    assert rc == 0 and out.startswith("Ünïcode prompt\n")
    prompt.write_bytes(b"caf\xe9\n")                    # Latin-1, not UTF-8
    for argv, says in ((["--prompt-file", str(prompt)], "not UTF-8"),
                       (["--prompt-file", str(tmp_path / "missing.txt")], "No such file"),
                       (["--prompt", "x", "--prompt-file", str(prompt)], "not both"),
                       (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
                       (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
                       (["--top-k", "0"], "--top-k 0: must be an integer >= 1"),
                       (["--tokens", "-2"], "--tokens -2"), (["--num-samples", "0"], "--num-samples 0")):
        rc, out, err = run_cli(capsys, "sample", ckpt, *argv)
        assert rc == 2 and out == "" and len(err.splitlines()) == 1 and says in err, (argv, err)


def test_not_a_run_directory(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "sample", str(tmp_path))
    assert rc == 2 and "no config.json and no ckpt_* checkpoints" in err and len(err.splitlines()) == 1


def test_a_bad_model_writes_nothing(capsys, tmp_path, monkeypatch):
    # a misspelt --model or --tokenizer is one line before anything exists: no --out
    # directory, and no data prepared (the default data is pydoc, under ./data)
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "train", "--model", "llama3-tny", "--steps", "1", "--out", "runs/x")
    assert rc == 2 and len(err.splitlines()) == 1 and "--model llama3-tny" in err and "llama3-tiny" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    rc, out, err = run_cli(capsys, "train", "--model", "d2", "--tokenizer", "nope", "--steps", "1", "--out", "runs/x")
    assert rc == 2 and len(err.splitlines()) == 1 and "nope" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
