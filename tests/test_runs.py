"""Runs that never lose work: a reused --out, --resume that remembers the run,
Ctrl-C and SIGTERM, and the plain-line log of a batch job. Every run here is a
real `python -m llmpy train` process, signals included."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmpy.config import GPTConfig
from llmpy.data.prepare import prepare_pydoc
from llmpy.model import GPT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    info = prepare_pydoc(root / "data")
    # GPT-2's vocabulary (the shards hold GPT-2 ids), everything else tiny
    GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8), seed=0).save(root / "tiny")
    args = ["--data", str(info["train"]), "--val-data", str(info["val"]), "--model", str(root / "tiny"),
            "-B", "2", "-T", "16", "--lr", "3e-3", "--warmup-steps", "2", "--val-every", "0",
            "--sample-every", "0", "--sample-tokens", "2", "--no-progress"]
    return root, args


def _env(extra=None):
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {}))


def train(root, *args, extra_env=None):
    return subprocess.run([sys.executable, "-m", "llmpy", "train", *args], cwd=root, env=_env(extra_env),
                          capture_output=True, text=True, timeout=300)


def files(ckpt: Path) -> dict:
    return {n: (ckpt / n).read_bytes() for n in ("model.safetensors", "optimizer.safetensors")}


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- the output directory


def test_a_reused_out_is_refused_untouched_and_overwrite_starts_over(env):
    root, args = env
    r = train(root, *args, "--steps", "4", "--checkpoint-every", "2", "--out", "reuse")
    assert r.returncode == 0, r.stderr
    before = {p.relative_to(root / "reuse"): p.stat().st_mtime_ns for p in (root / "reuse").rglob("*")}
    r = train(root, *args, "--steps", "1", "--keep", "2", "--out", "reuse")
    assert r.returncode == 2
    assert r.stderr.strip() == ("llmpy train: error: reuse holds a run at step 4: --resume continues it, "
                                "--overwrite starts over (or choose another --out)")
    assert {p.relative_to(root / "reuse"): p.stat().st_mtime_ns for p in (root / "reuse").rglob("*")} == before
    r = train(root, *args, "--steps", "1", "--keep", "2", "--out", "reuse", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "overwrite: removed the run at step 4" in r.stdout
    assert sorted(p.name for p in (root / "reuse").glob("ckpt_*")) == ["ckpt_00000001"]
    assert steps_logged(root / "reuse") == [1]


def test_resume_with_no_checkpoint_that_verifies_names_each_and_writes_nothing(env):
    root, args = env
    r = train(root, *args, "--steps", "4", "--checkpoint-every", "2", "--keep", "0", "--out", "broken")
    assert r.returncode == 0, r.stderr
    for name in ("ckpt_00000002", "ckpt_00000004"):
        (root / "broken" / name / "model.safetensors").write_bytes(b"damaged")
    before = (root / "broken" / "log.jsonl").read_bytes()
    r = train(root, *args, "--steps", "8", "--out", "broken", "--resume")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "no checkpoint verifies" in err and "ckpt_00000004: model.safetensors" in err \
        and "ckpt_00000002: model.safetensors" in err, err
    assert (root / "broken" / "log.jsonl").read_bytes() == before


def test_keep_removes_only_this_runs_older_checkpoints(env):
    # resuming from step 2 because ckpt 4 fails to verify: the new ckpt 3 must
    # not be pruned in favour of the higher-numbered broken one
    root, args = env
    r = train(root, *args, "--steps", "4", "--checkpoint-every", "2", "--keep", "0", "--out", "keep")
    assert r.returncode == 0, r.stderr
    (root / "keep" / "ckpt_00000004" / "model.safetensors").write_bytes(b"damaged")
    r = train(root, *args, "--out", "keep", "--resume", "--stop-at", "3", "--checkpoint-every", "1", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert "continuing from keep/ckpt_00000002" in r.stdout
    assert sorted(p.name for p in (root / "keep").glob("ckpt_*")) == ["ckpt_00000003", "ckpt_00000004"]


# ---------------------------------------------------------------------- resume remembers


def test_resume_keeps_the_saved_flags_names_changes_and_extends(env):
    root, args = env
    straight = train(root, *args, "--steps", "6", "--lr-schedule", "linear", "--out", "straight")
    assert straight.returncode == 0, straight.stderr
    r = train(root, *args, "--steps", "6", "--lr-schedule", "linear", "--stop-at", "3", "--out", "remember")
    assert r.returncode == 0, r.stderr
    assert "done: loss" in r.stdout and "no val loss in these steps" in r.stdout     # not "val loss nan"
    # a --stop-at the run has already reached: one line, exit 0, nothing written (not a run of no steps)
    before = {p: p.stat().st_mtime_ns for p in (root / "remember").rglob("*")}
    for stop in ("2", "3"):
        r = train(root, "--out", "remember", "--resume", "--stop-at", stop)
        assert r.returncode == 0, r.stderr
        assert f"already at step 3, at or past --stop-at {stop}: nothing to do" in r.stdout, r.stdout
        assert "done:" not in r.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "remember").rglob("*")} == before
    # no --steps, --lr-schedule: the saved ones; the result equals the run that never stopped
    r = train(root, "--out", "remember", "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resume: --" not in r.stdout            # nothing given differs
    assert files(root / "remember/ckpt_00000006") == files(root / "straight/ckpt_00000006")
    lrs = [json.loads(line)["lr"] for line in (root / "remember/log.jsonl").read_text().splitlines()]
    ref = [json.loads(line)["lr"] for line in (root / "straight/log.jsonl").read_text().splitlines()]
    assert lrs == ref
    # finished: one line, exit 0, nothing written
    before = {p: p.stat().st_mtime_ns for p in (root / "remember").rglob("*")}
    r = train(root, "--out", "remember", "--resume")
    assert r.returncode == 0 and "already at step 6 of 6; --steps M extends it" in r.stdout, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in (root / "remember").rglob("*")} == before
    # changed flags are listed, a batch change is named, --steps extends the schedule
    r = train(root, "--out", "remember", "--resume", "--steps", "8", "-B", "4", "--lr", "1e-3", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resume: --batch-size 2 -> 4, --lr 0.003 -> 0.001, --steps 6 -> 8" in r.stdout, r.stdout
    assert "--batch-size changed" in r.stdout and "not bitwise" in r.stdout
    assert "the LR schedule is recomputed over 8 steps" in r.stdout
    assert steps_logged(root / "remember") == list(range(1, 9))


# ---------------------------------------------------------------------- signals


def _start(root, *args, extra_env=None):
    return subprocess.Popen([sys.executable, "-m", "llmpy", "train", *args], cwd=root, env=_env(extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, path: Path, what: str, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and what in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what!r}: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"no {what!r} after {timeout} s")


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                            (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_checkpoints_and_resume_equals_the_run_never_interrupted(env, sig, code, said):
    root, args = env
    name = f"sig{int(sig)}"
    ref = train(root, *args, "--steps", "300", "--checkpoint-every", "1000", "--out", f"{name}_straight")
    assert ref.returncode == 0, ref.stderr
    proc = _start(root, *args, "--steps", "300", "--checkpoint-every", "1000", "--out", name)
    _wait_for(proc, root / name / "log.jsonl", '"step": 5,')
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"llmpy train: {said} at step ") and "--resume continues" in last, err
    step = int(last.split(" at step ")[1].split(":")[0])
    assert 5 <= step < 300
    assert [p.name for p in (root / name).glob("ckpt_*")] == [f"ckpt_{step:08d}"]
    r = train(root, "--out", name, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert files(root / name / "ckpt_00000300") == files(root / f"{name}_straight" / "ckpt_00000300")
    assert steps_logged(root / name) == list(range(1, 301))


def test_a_second_ctrl_c_aborts_without_a_checkpoint_that_looks_valid(env):
    from llmpy import checkpoint as ckpt
    root, args = env
    proc = _start(root, *args, "--steps", "300", "--checkpoint-every", "1000", "--out", "abort",
                  extra_env={"LLMPY_TEST_SLOW_CHECKPOINT": "0.2"})
    _wait_for(proc, root / "abort" / "log.jsonl", '"step": 3,')
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    while not list((root / "abort").glob(".ckpt_*.tmp")) and time.monotonic() - t0 < 60:
        time.sleep(0.005)                      # the checkpoint is being written (slowly)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "llmpy train: interrupted", err
    assert "Traceback" not in err
    for p in ckpt.list_checkpoints(root / "abort"):     # whatever is there verifies
        assert ckpt.verify_checkpoint(p) is None


# ---------------------------------------------------------------------- logs and small things


def test_without_a_terminal_plain_lines_with_mfu_and_eta(env):
    root, args = env
    # the progress bar is on (no --no-progress), but stdout is a pipe, not a terminal
    r = train(root, *[a for a in args if a != "--no-progress"], "--steps", "40", "--out", "plain")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert "\r" not in r.stdout + r.stderr
    # the first step, then every --log-every (default: steps / 20 = 2)
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, *range(2, 41, 2)]
    assert lines[0].startswith("step 1/40 ") and lines[-1].startswith("step 40/40 ")
    assert all(" mfu " in line and " eta " in line and " norm " in line for line in lines)
    assert "mfu: model FLOPs (6N + 12LTC per token) over the sgemm rate measured now" in r.stdout
    assert all("mfu" in json.loads(line) for line in (root / "plain/log.jsonl").read_text().splitlines())


def test_no_val_data_is_said_and_zero_stage_1_alone_is_refused(env):
    root, args = env
    no_val = [a for i, a in enumerate(args) if a != "--val-data" and args[i - 1] != "--val-data"]
    r = train(root, *no_val, "--steps", "1", "--out", "noval")
    assert r.returncode == 0 and "no val data (--val-data not given)" in r.stdout, r.stdout + r.stderr
    r = train(root, *args, "--steps", "1", "--out", "zero1", "--zero-stage", "1")
    assert r.returncode == 2 and "this is one process" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_files_and_directories_get_the_umasks_modes(env):
    root, args = env
    r = train(root, *args, "--steps", "1", "--out", "modes", extra_env=None)
    assert r.returncode == 0, r.stderr
    mask = os.umask(0)
    os.umask(mask)
    ckpt = root / "modes" / "ckpt_00000001"
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~mask
    for f in ckpt.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_overfit_batch_drives_the_loss_down_on_one_batch(env):
    root, args = env
    r = train(root, *args, "--steps", "60", "--lr", "1e-2", "--overfit-batch", "--out", "overfit")
    assert r.returncode == 0, r.stderr
    losses = [json.loads(line)["loss"] for line in (root / "overfit/log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]


def test_version():
    r = subprocess.run([sys.executable, "-m", "llmpy", "--version"], env=_env(), capture_output=True, text=True)
    import llmpy
    assert r.returncode == 0 and r.stdout.strip() == f"llmpy {llmpy.__version__}"


def test_hellaswag_during_training_logs_the_accuracy_eval_gives(env):
    root, args = env
    fixture = Path(__file__).parent / "fixtures" / "hellaswag_val_sample.jsonl"
    model_args = [a if a != str(root / "tiny") else "d2" for a in args]      # GPT-2's context: whole examples
    r = train(root, *model_args, "--steps", "4", "--hellaswag", str(fixture), "--hellaswag-every", "2",
              "--out", "hs")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (root / "hs/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "hellaswag_acc_norm" in r] == [2, 4]
    ev = subprocess.run([sys.executable, "-m", "llmpy", "eval", "hs/ckpt_00000004", "--hellaswag", str(fixture),
                         "--json"], cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    assert recs[-1]["hellaswag_acc_norm"] == json.loads(ev.stdout)["acc_norm"]
    r = train(root, *model_args, "--steps", "4", "--hellaswag", str(fixture), "--out", "hs2")
    assert r.returncode == 2 and "go together" in r.stderr


def test_val_steps_minus_one_is_one_whole_pass_as_eval_measures_it(env):
    root, args = env
    r = train(root, *[a if a != "0" or args[i - 1] != "--val-every" else "2" for i, a in enumerate(args)],
              "--steps", "2", "--val-steps", "-1", "--out", "valpass")
    assert r.returncode == 0, r.stderr
    logged = json.loads((root / "valpass/log.jsonl").read_text().splitlines()[-1])["val_loss"]
    ev = subprocess.run([sys.executable, "-m", "llmpy", "eval", "valpass", "--data", args[3], "--json"], cwd=root,
                        env=_env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert abs(res["val_loss"] - logged) <= 1e-6 * logged
    assert res["batches"] > 10                # one whole pass of the val shard, not the default 10 batches
