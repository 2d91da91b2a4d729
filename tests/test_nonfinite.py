"""A NaN or inf loss or gradient norm: stop naming the step, or skip it
(--skip-nonfinite); never write a checkpoint with non-finite weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

import llmpy.step
from llmpy.cli import main
from llmpy.config import GPTConfig
from llmpy.data.prepare import prepare_pydoc
from llmpy.model import GPT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    info = prepare_pydoc(root / "data")
    return root, ["--data", str(info["train"])]


def tiny(path, poison=False):
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8), seed=0)
    if poison:
        model.params.views["lnfw"][3] = np.nan
    model.save(path)
    return str(path)


def args(model, data, out, *extra):
    return ["train", *data, "--model", model, "-B", "2", "-T", "16", "--steps", "3", "--val-every", "0",
            "--sample-every", "0", "--sample-tokens", "2", "--no-progress", "--out", str(out), *extra]


def test_nan_loss_stops_naming_the_step_and_writes_no_checkpoint(data, tmp_path, capsys):
    root, d = data
    assert main(args(tiny(tmp_path / "nan", poison=True), d, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 1: the loss is nan" in err[0] and "--skip-nonfinite" in err[0], err
    assert not list((tmp_path / "run").glob("*ckpt_*"))


def test_skip_nonfinite_never_checkpoints_nonfinite_weights(data, tmp_path, capsys):
    root, d = data
    assert main(args(tiny(tmp_path / "nan", poison=True), d, tmp_path / "run", "--skip-nonfinite")) == 2
    cap = capsys.readouterr()
    assert "step 1: the loss is nan; skipping this step" in cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "step 3" in err[0] and "NaN or inf" in err[0], err
    assert not list((tmp_path / "run").glob("*ckpt_*"))


def test_skip_nonfinite_skips_a_bad_gradient_and_goes_on(data, tmp_path, capsys, monkeypatch):
    root, d = data
    real = llmpy.step.global_norm
    calls = []

    def inf_at_step_2(model):
        calls.append(1)
        return float("inf") if len(calls) == 2 else real(model)

    monkeypatch.setattr(llmpy.step, "global_norm", inf_at_step_2)
    model = tiny(tmp_path / "ok")
    assert main(args(model, d, tmp_path / "stop")) == 2
    assert "step 2: the gradient norm is inf" in capsys.readouterr().err
    calls.clear()
    assert main(args(model, d, tmp_path / "run", "--skip-nonfinite")) == 0
    assert "step 2: the gradient norm is inf; skipping this step" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 3]
    done = llmpy.load(tmp_path / "run" / "ckpt_00000003")
    assert np.isfinite(done.params.flat).all()
