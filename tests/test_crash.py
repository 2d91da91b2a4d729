"""Crash safety: training killed with SIGKILL in the middle of checkpoint writes.

One chain of runs on one output directory: each run resumes, trains, and is
killed at a random moment while a checkpoint is being written (the test hook
LLMPY_TEST_SLOW_CHECKPOINT makes every file write of a checkpoint take a few
milliseconds, so the moments are really inside the writes). After every kill,
every ckpt_* directory must verify and the next run must continue from the
newest one. A last run finishes the training; its weights and AdamW state
must equal, byte for byte, those of one uninterrupted run.

The runs are forked children of the test process (which has already imported
llmpy and built the tokenizer), so that twenty-odd runs take seconds, not the
minutes of as many fresh interpreters. Killing a forked child with SIGKILL is
exactly what `kill -9` does to a training process.
"""
from __future__ import annotations

import os
import random
import re
import signal
import sys
import time

import pytest

from llmpy import checkpoint as ckpt
from llmpy.config import GPTConfig, TrainConfig
from llmpy.data.prepare import prepare_pydoc
from llmpy.model import GPT

KILLS = 20
STEPS = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    info = prepare_pydoc(root / "data")
    # GPT-2's vocabulary (the shards hold GPT-2 ids), everything else tiny: a checkpoint is ~5 MB
    GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8), seed=0).save(root / "tiny")
    from llmpy.data.tokenizer import Tokenizer
    Tokenizer()                          # built once here, inherited by every forked run
    import matplotlib.pyplot  # noqa: F401  (same: imported once)
    return root, info


def config(root, info, out, steps=STEPS, **kw):
    return TrainConfig(data=str(info["train"]), val_data=None, model=str(root / "tiny"), batch_size=2, seq_len=16,
                       lr=3e-3, warmup_steps=2, steps=steps, val_every=0, sample_every=0, sample_tokens=4,
                       out=str(out), progress=False, **kw)


def fork_train(tc: TrainConfig, log_path, slow: float | None = None) -> int:
    """Run train(tc) in a forked child writing its output to log_path; returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sys.stdout = sys.stderr = open(log_path, "w", buffering=1)
        if slow:
            os.environ["LLMPY_TEST_SLOW_CHECKPOINT"] = str(slow)
        from llmpy.train import train
        train(tc)
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


def wait(pid) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def kill_during_a_checkpoint(pid, out, log, rng) -> bool:
    """SIGKILL the run at a random moment inside its 1st-3rd checkpoint write
    after it has resumed (and removed what the previous kill left behind).
    False if it finished first."""
    target, seen, last = rng.randint(1, 3), 0, None
    while not re.search("continuing from|no checkpoint", log.read_text()):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(0.001)
    while True:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        building = sorted(p.name for p in out.glob(f".{ckpt.CKPT_PREFIX}*.tmp")) if out.exists() else []
        if building and building[-1] != last:
            last, seen = building[-1], seen + 1
            if seen == target:
                time.sleep(rng.uniform(0, 0.08))    # a checkpoint takes ~0.06 s with the hook
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return True
        time.sleep(0.0005)


def test_sigkill_during_checkpoints_then_resume_equals_uninterrupted(setup, tmp_path):
    root, info = setup
    ref = tmp_path / "straight"
    assert wait(fork_train(config(root, info, ref, checkpoint_every=0), tmp_path / "straight.log")) == 0

    out, rng = tmp_path / "crashed", random.Random(1234)
    kills, resumed_from, cleaned = 0, [], 0
    for trial in range(3 * KILLS):
        if kills == KILLS:
            break
        newest = ckpt.list_checkpoints(out)
        for p in newest:        # a kill must never leave a ckpt_* that does not verify
            assert ckpt.verify_checkpoint(p) is None, (p, ckpt.verify_checkpoint(p))
        log = tmp_path / f"run{trial}.log"
        log.touch()
        pid = fork_train(config(root, info, out, checkpoint_every=1, keep=2, resume=True), log, slow=0.01)
        killed = kill_during_a_checkpoint(pid, out, log, rng)
        text = log.read_text()
        assert "Traceback" not in text, text
        cleaned += "left behind by an interrupted run" in text
        m = re.search(r"continuing from \S+ckpt_(\d+) \(step (\d+)\)", text)
        if newest:
            assert m and int(m.group(1)) == int(newest[-1].name[5:]) == int(m.group(2)), text
            resumed_from.append(int(m.group(2)))
        else:
            assert "no checkpoint" in text, text
        assert killed, f"run {trial} finished before it was killed; raise STEPS"
        kills += 1
    assert kills == KILLS
    assert len(set(resumed_from)) > KILLS // 3, resumed_from     # the chain made progress
    assert cleaned >= KILLS // 4, cleaned      # many kills really landed inside a checkpoint write

    r = wait(fork_train(config(root, info, out, checkpoint_every=0, resume=True), tmp_path / "final.log"))
    assert r == 0, (tmp_path / "final.log").read_text()
    final = f"ckpt_{STEPS:08d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (out / final / name).read_bytes() == (ref / final / name).read_bytes(), name


def test_keep_leaves_the_newest_n(setup, tmp_path):
    """--keep 2 with a checkpoint every step: only the last two remain, and no
    hidden temporaries."""
    root, info = setup
    out = tmp_path / "keep"
    assert wait(fork_train(config(root, info, out, steps=5, checkpoint_every=1, keep=2), tmp_path / "keep.log")) == 0
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt_00000004", "ckpt_00000005"]


def test_resume_onto_other_data_names_the_state_file(setup, tmp_path, capsys):
    """A data position that does not fit the data now given is one line naming train_state.json."""
    from llmpy.cli import main
    from llmpy.data.shards import write_shard
    root, info = setup
    write_shard(tmp_path / "small.bin", list(range(40)))
    common = ["train", "--model", str(root / "tiny"), "-B", "2", "-T", "16", "--steps", "6", "--val-every", "0",
              "--sample-every", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*common, "--data", str(info["train"]), "--stop-at", "4"]) == 0
    capsys.readouterr()
    assert main([*common, "--data", str(tmp_path / "small.bin"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt_00000004/train_state.json" in err[0] and "DataLoader state" in err[0], err
