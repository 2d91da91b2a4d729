"""A run too large for this machine's memory ends in one line (exit 2), before
anything is written: the CPU's training buffers are counted against the
machine's memory (step.check_fits, as on a GPU against the GPU's), and an
allocation that fails anyway (NumPy's MemoryError) is a one-line error too,
not a traceback and not the kernel's out-of-memory kill."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from llmpy import cli, step
from llmpy.config import preset
from llmpy.errors import LlmpyError
from llmpy.model import memory_estimate
from llmpy.ops import cpu

GIB = 2 ** 30


def test_machine_memory_is_this_machines_ram():
    # read independently: MemTotal in /proc/meminfo (kB)
    with open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    got = step.machine_memory()
    assert got is not None and 0 < got <= mem_total * 1.01
    limit = "/sys/fs/cgroup/memory.max"
    if not (os.path.exists(limit) and open(limit).read().strip().isdigit()):
        assert got >= mem_total * 0.99          # no container limit: the RAM itself


def test_check_fits_on_the_cpu_counts_fp32_buffers_against_the_machine(monkeypatch):
    # d12 B=64 T=1024 in float32 on the CPU: ~2 GiB of weights, gradients and
    # AdamW state, the rest activations (the CPU backend's own scratch rule)
    cfg = preset("d12")
    model = SimpleNamespace(config=cfg, dtype="fp32", memory_estimate=memory_estimate, ops=cpu)
    need = memory_estimate(cfg, 64, 1024, "fp32", flash=False, device="cpu")["total"]
    monkeypatch.setattr(step, "machine_memory", lambda: need - 1)
    with pytest.raises(LlmpyError) as e:
        step.check_fits(model, 64, 1024)
    msg = str(e.value)
    fits = 32
    while memory_estimate(cfg, fits, 1024, "fp32", flash=False, device="cpu")["total"] > 0.9 * (need - 1):
        fits //= 2
    assert "\n" not in msg and f"~{need / GIB:.1f} GiB" in msg and "this machine has" in msg
    assert f"-B {fits} needs" in msg
    monkeypatch.setattr(step, "machine_memory", lambda: need)
    step.check_fits(model, 64, 1024)                                     # fits exactly: no error
    monkeypatch.setattr(step, "machine_memory", lambda: None)            # unknown: no check
    step.check_fits(model, 64, 1024)


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_too_large_for_the_machine_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    # d2's weights, gradients and AdamW state alone are ~6 MiB: a "machine" of 1 MiB holds no -B
    monkeypatch.setattr(step, "machine_memory", lambda: 2 ** 20)
    out = tmp_path / "run"
    rc, _, err = _run(capsys, ["train", "--model", "d2", "-B", "4", "-T", "32", "--steps", "1",
                               "--out", str(out), "--data", str(tmp_path / "none_*.bin")])
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "this machine has 0.0 GiB; even -B 1 does not fit: a smaller model" in err
    assert not out.exists()


def test_bench_too_large_for_the_machine_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(step, "machine_memory", lambda: 2 ** 20)
    rc, out, err = _run(capsys, ["bench", "--model", "d2", "-B", "2", "-T", "16", "--steps", "5"])
    assert rc == 2 and out == "" and err.count("\n") == 1 and "this machine has" in err, err


def test_a_failed_allocation_is_one_line(tmp_path, capsys, monkeypatch):
    # what NumPy raises for an array larger than the machine (here without allocating one)
    from llmpy import families

    def build(*a, **k):
        raise MemoryError("Unable to allocate 179. GiB for an array with shape (48025517760,) and data type float32")
    monkeypatch.setattr(families, "build", build)
    rc, _, err = _run(capsys, ["train", "--model", "d99", "--out", str(tmp_path / "o"), "--steps", "1"])
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("llmpy train: error: out of memory (Unable to allocate 179. GiB") and "-B" in err
    assert not (tmp_path / "o").exists()
