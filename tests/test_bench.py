"""`llmpy bench` and its PyTorch yardstick, on the CPU: correctness only, no
timing assertions (benchmarks are scripts, DESIGN.md section 7). The CUDA path
(torch.compile + autocast + fused AdamW on a GPU, MFU against the measured
matmul peak) is exercised by running `llmpy bench --device cuda` on a GPU."""
import json

import pytest

torch = pytest.importorskip("torch")

from llmpy import cli  # noqa: E402
from llmpy.bench import flops_per_token, matmul_flops, n_params_for_flops  # noqa: E402
from llmpy.bench_torch import TorchGPT, torch_step  # noqa: E402
from llmpy.config import preset  # noqa: E402

TINY = preset("d2", block_size=32, vocab_size=256)


def _losses(dtype, compile=False, n=6):
    step, _ = torch_step(TINY, B=4, T=16, device="cpu", dtype=dtype, compile=compile, lr=1e-3)
    return [float(step()) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_reference_step_learns_its_batch(dtype):
    """fp32, and bf16 under torch.autocast("cpu"): the loss on the fixed batch falls."""
    losses = _losses(dtype)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
def test_torch_reference_step_compiled():
    """torch.compile of the reference works here (~30 s of Inductor compile on a CPU)."""
    losses = _losses("bf16", compile=True, n=4)
    assert losses[-1] < losses[0], losses


def test_flops_per_token_is_palm_formula_over_the_real_module():
    """6N + 12*L*T*C with N counted independently: every parameter of the
    PyTorch module except the position embeddings (the tied wte is one tensor)."""
    T = 16
    model = TorchGPT(TINY)
    N = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("wpe"))
    assert n_params_for_flops(TINY) == N
    assert flops_per_token(TINY, T) == 6 * N + 12 * TINY.n_layer * T * TINY.n_embd
    # the per-token matmul count differs from it only by biases and layernorms (12 C + 78 C L)
    L, C = TINY.n_layer, TINY.n_embd
    assert flops_per_token(TINY, T) - matmul_flops(TINY, 1, T) / T == 6 * (2 * C + 13 * C * L)


def _bench_json(capsys, *args):
    rc = cli.main(["bench", "--model", "d2", "-B", "2", "-T", "16", "--steps", "5", "--json", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bench_json_cpu(capsys):
    rc, out, err = _bench_json(capsys, "--compare", "torch")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    res = json.loads(out)
    assert res["device"] == "cpu" and res["dtype"] == "fp32" and res["torch_compile"] is False
    for key in ("ms_per_step", "tokens_per_s", "sgemm_gflops", "floor_share", "torch_ms_per_step",
                "torch_tokens_per_s", "ratio", "speedup_vs_torch"):
        assert res[key] > 0, key
    assert res["ratio"] == pytest.approx(res["ms_per_step"] / res["torch_ms_per_step"], rel=0.01)
    assert res["speedup_vs_torch"] == pytest.approx(res["tokens_per_s"] / res["torch_tokens_per_s"], rel=0.01)


def test_bench_only_torch_bf16_cpu(capsys):
    rc, out, err = _bench_json(capsys, "--only", "torch", "--dtype", "bf16")
    assert rc == 0, err
    res = json.loads(out)
    assert res["dtype"] == "bf16" and res["torch_tokens_per_s"] > 0
    assert "ms_per_step" not in res and "ratio" not in res     # llmpy was not run


def test_bench_bf16_without_mkl_is_a_one_line_error(capsys, monkeypatch):
    # CPU bf16 is MKL's bf16 GEMM (tests/test_cpu_bf16.py); without the library, one line
    from llmpy.ops import mkl
    monkeypatch.setattr(mkl, "_lib", None)
    monkeypatch.setattr(mkl, "_candidates", lambda: iter(["libmkl_rt_not_here.so.3"]))
    rc, out, err = _bench_json(capsys, "--dtype", "bf16")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("llmpy bench: error: --device cpu --dtype bf16 needs Intel MKL")


@pytest.mark.slow
def test_cpu_suite_quick_runs_both_sides_in_children_with_their_rss(capsys):
    """`llmpy bench --suite --quick` (bench/cpu_suite.sh): the smallest
    shape once, llmpy and PyTorch each in a child process of its own (~20 s)."""
    from llmpy.bench import SUITE_HEADER, suite_line
    from llmpy.model import memory_estimate
    assert cli.main(["bench", "--suite", "--quick", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    row = json.loads(out[0])
    assert (row["model"], row["B"], row["T"], row["run"]) == ("d2", 4, 64, 1)
    assert row["order"] == "llmpy torch"
    assert row["ratio"] == pytest.approx(row["ms_per_step"] / row["torch_ms_per_step"], abs=1e-3)
    assert row["floor_share"] == pytest.approx(row["floor_ms"] / row["ms_per_step"], abs=2e-3)
    # each child's peak RSS holds at least its own model's fp32 training state
    # (weights, gradients, AdamW's m and v), and far less than this machine's memory
    state_mib = memory_estimate(preset("d2", 64), 4, 64, dtype="fp32", flash=False, device="cpu")["total"] / 2**20
    for key in ("peak_rss_mib", "torch_peak_rss_mib"):
        assert state_mib < row[key] < 8192, (key, row[key], state_mib)
    line = suite_line(row)
    assert line.count("|") == len(SUITE_HEADER) + 1 and f"| {row['ratio']:.3f} |" in line


def test_cpu_suite_bad_shape_is_a_one_line_error(capsys):
    from llmpy.bench import suite_main
    assert suite_main(["--suite", "--shapes", "d2:4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "MODEL:B:T" in err


def _fake_children(monkeypatch):
    """bench_child replaced by made-up step times (no child processes): what
    the suite's table does with them. Returns the list of calls."""
    from llmpy import bench
    calls = []

    def child(side, model, B, T, steps):
        calls.append((side, model, B, T, steps))
        ms = {"llmpy": 30.0, "torch": 60.0}[side] * B * T / 256
        res = {"peak_rss_mib": 100.0 + len(calls)}
        if side == "llmpy":
            res.update(ms_per_step=ms, sgemm_gflops=150.0, floor_ms=0.6 * ms, floor_share=0.6)
        else:
            res.update(torch_ms_per_step=ms)
        return res
    monkeypatch.setattr(bench, "bench_child", child)
    return calls


def test_llmpy_bench_suite_prints_the_machine_then_a_row_per_run_and_shape(capsys, monkeypatch):
    """`llmpy bench --suite --runs 2 --shapes ...`: the machine's lines (date,
    CPU, flags as /proc/cpuinfo has them, NumPy's BLAS), the table header, a
    row per (run, shape) with the sides' order alternating, each row's ratio
    and floor share from its children's numbers."""
    import re

    import numpy as np
    calls = _fake_children(monkeypatch)
    rc = cli.main(["bench", "--suite", "--runs", "2", "--shapes", "d2:4:64,d4:8:128", "--steps", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert re.match(r"# \d{4}-\d\d-\d\d \d\d:\d\d UTC .* x\d+; load: ", lines[0]), lines[0]
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    shown = lines[1].removeprefix("# cpu flags: ")
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"):
        assert (flag in shown.split()) == (flag in flags), (flag, shown)
    assert lines[2].startswith(f"# numpy {np.__version__} (")
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| run | shape | sgemm GFLOP/s | llmpy ms | PyTorch ms | ratio | floor share")
    rows = table[2:]
    assert [r.split(" | ")[1] for r in rows] == ["d2 B=4 T=64", "d4 B=8 T=128"] * 2
    assert all(" | 0.500 | 60.0% | " in r for r in rows), rows        # 30 / 60 ms; the child's share
    assert [c[0] for c in calls] == ["llmpy", "torch"] * 2 + ["torch", "llmpy"] * 2
    assert {c[4] for c in calls} == {6}
    assert lines[-1].startswith("# load after: ")


@pytest.mark.parametrize("args, named", [
    (["--suite", "--model", "d2"], "--model"),
    (["--suite", "-B", "8", "--profile"], "-B, --profile"),
    (["--suite", "--device", "cuda"], "--device cuda"),
    (["--runs", "2"], "--runs only with --suite"),
    (["--quick"], "--quick only with --suite"),
    (["--suite", "--runs", "0"], "--runs 0: must be >= 1"),
    (["--suite", "--shapes", "d2:4"], "MODEL:B:T"),
])
def test_llmpy_bench_suite_flag_mistakes_are_one_line(capsys, monkeypatch, args, named):
    calls = _fake_children(monkeypatch)
    rc = cli.main(["bench", *args])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and calls == []
    assert err.count("\n") == 1 and named in err and "Traceback" not in err, err


def test_llmpy_bench_suite_without_torch_is_one_line_before_any_child(capsys, monkeypatch):
    # an environment without PyTorch, as `make train` makes
    import importlib.util
    calls = _fake_children(monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    rc = cli.main(["bench", "--suite", "--quick"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and calls == []
    assert err.count("\n") == 1 and "torch is not installed in this environment: pip install" in err, err
