"""The CPU backend's two BLAS choices for its float32 products (ops/cpu.py's
`_gemm`): NumPy's matmul (OpenBLAS) and Intel MKL's sequential sgemm, one
block of the output per thread (ops/mkl.py). Each is checked against the
float64 product of the same inputs, for every layout the model hands it
(weights as W and W.T, dout.T), both ways of cutting the output over the
threads, and accumulation (beta = 1); then whole AdamW steps with MKL
against the same steps with OpenBLAS: the same math summed in another
order. The MKL tests are skipped, with the reason, where it cannot be
loaded (the test extra brings the mkl wheel on x86-64 Linux)."""
from __future__ import annotations

import numpy as np
import pytest

from llmpy.errors import LlmpyError
from llmpy.ops import cpu, cpu_parallel, mkl
from mkl_checks import MKL_MISSING, needs_mkl



def use_blas(monkeypatch, choice):
    """Run the backend's products through `choice` ("mkl", "numpy", "auto") from here on."""
    monkeypatch.setattr(cpu, "blas", choice)
    monkeypatch.setattr(cpu, "_mkl", None)           # chosen again on the next product


@pytest.fixture(params=["numpy", pytest.param("mkl", marks=needs_mkl)])
def blas(request, monkeypatch):
    use_blas(monkeypatch, request.param)
    monkeypatch.setattr(cpu_parallel, "GEMM_PARALLEL", 0)    # the small test products are cut over the threads too
    return request.param


def layouts(rng, rows, cols):
    """An array as a C-contiguous array and as the transpose of one (the same values)."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    return x, np.ascontiguousarray(x.T).T


# (M, K, N): rows >= columns (cut by rows), rows < columns (cut by columns;
# N = 1000 and 50 are not multiples of 16, so the last block is ragged), and
# one row, as in `llmpy sample`
SHAPES = [(96, 40, 24), (24, 40, 1000), (7, 13, 50), (1, 64, 100)]


@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("acc", [False, True])
def test_gemm_is_the_float64_product_in_every_layout(blas, M, K, N, acc):
    # float32 products of K terms are within ~K * 2^-24 of float64 relative to
    # |a| |b|; a wrong transpose, leading dimension, block edge or beta is O(1)
    rng = np.random.default_rng(M * N)
    a_forms, b_forms = layouts(rng, M, K), layouts(rng, K, N)
    a64, b64 = a_forms[0].astype(np.float64), b_forms[0].astype(np.float64)
    before = rng.standard_normal((M, N)).astype(np.float32)
    want = a64 @ b64 + (before if acc else 0)
    for a in a_forms:
        for b in b_forms:
            out = before.copy()
            cpu._gemm(out, a, b, acc)
            np.testing.assert_allclose(out, want, rtol=0, atol=2e-6 * K ** 0.5 * np.abs(want).max())
    assert (cpu._mkl_module() is not None) == (blas == "mkl")


def test_gemm_writes_only_its_view_of_a_larger_array(blas):
    # the column blocks are views of out; a block edge that wrote past its
    # view would change the columns beside it
    rng = np.random.default_rng(3)
    big = rng.standard_normal((8, 90)).astype(np.float32)
    keep = big.copy()
    out = big[:, 10:60]
    a, b = layouts(rng, 8, 20)[0], layouts(rng, 20, 50)[0]
    cpu._gemm(out, a, b)
    np.testing.assert_array_equal(big[:, :10], keep[:, :10])
    np.testing.assert_array_equal(big[:, 60:], keep[:, 60:])
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_float64_products_stay_in_numpy(blas):
    # the gradient checks run the ops in float64: MKL's sgemm is float32 only
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((5, 6)), rng.standard_normal((6, 7))
    out = np.zeros((5, 7))
    cpu._gemm(out, a, b, acc=True)
    np.testing.assert_array_equal(out, a @ b)


@needs_mkl
def test_training_steps_with_mkl_are_the_openblas_steps_in_another_order(monkeypatch):
    # Five AdamW steps of a small GPT-2 through each BLAS, from the same
    # weights on the same batch. The products sum in another order, so the
    # losses agree to float32 rounding and the weights to Adam's amplification
    # of it (~1e-4 relative at lr 1e-3, the README's rule for such runs).
    # A wrong block edge, transpose or beta would be O(1) in the first step.
    from llmpy.config import GPTConfig
    from llmpy.dist import SingleProcess
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    from llmpy.step import HostStep

    cfg = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64)
    ids = np.random.default_rng(5).integers(0, 256, size=(4, 33))
    batch = (ids[:, :-1], ids[:, 1:])
    monkeypatch.setattr(cpu_parallel, "GEMM_PARALLEL", 0)
    runs = {}
    for choice in ("numpy", "mkl"):
        use_blas(monkeypatch, choice)
        model = GPT(cfg, device="cpu", seed=0)
        step = HostStep(model, AdamW(model, weight_decay=0.1), SingleProcess(), grad_clip=1.0)
        losses = [step(batch, 1e-3, t)[0] for t in range(1, 6)]
        assert (cpu._mkl_module() is not None) == (choice == "mkl")
        runs[choice] = losses, model.params.flat.copy()
    (loss_np, w_np), (loss_mkl, w_mkl) = runs["numpy"], runs["mkl"]
    np.testing.assert_allclose(loss_mkl, loss_np, rtol=1e-5)
    assert loss_mkl[-1] < loss_mkl[0]                    # it trained
    moved = np.abs(w_mkl - w_np).max() / np.abs(w_np).max()
    assert moved <= 1e-3        # (at these small K both may also sum in the same order: then 0)


def test_auto_takes_mkl_on_intel_cpus_only(monkeypatch):
    use_blas(monkeypatch, "auto")
    monkeypatch.setattr(mkl, "intel_cpu", lambda: False)
    assert cpu._mkl_module() is None
    use_blas(monkeypatch, "auto")
    monkeypatch.setattr(mkl, "intel_cpu", lambda: True)
    assert (cpu._mkl_module() is not None) == (MKL_MISSING is None)


def test_intel_cpu_reads_the_vendor_line(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for vendor, want in (("GenuineIntel", True), ("AuthenticAMD", False)):
        info = tmp_path / vendor
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx512f\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p,
                                                                           *a, **k))
        assert mkl.intel_cpu() is want
    monkeypatch.setattr(builtins, "open", real_open)


def test_mkl_asked_for_but_missing_is_one_line(monkeypatch):
    use_blas(monkeypatch, "mkl")

    def missing():
        raise LlmpyError("libmkl_rt was not found")
    monkeypatch.setattr(mkl, "library", missing)
    with pytest.raises(LlmpyError, match=r"LLMPY_CPU_BLAS=mkl.*pip install 'llmpy\[cpu-bf16\]'.*unset LLMPY_CPU_BLAS"):
        cpu._mkl_module()
    use_blas(monkeypatch, "auto")                       # auto without MKL: NumPy's BLAS, no error
    monkeypatch.setattr(mkl, "intel_cpu", lambda: True)
    assert cpu._mkl_module() is None


def test_an_unknown_choice_names_the_choices(monkeypatch):
    use_blas(monkeypatch, "openblas")
    with pytest.raises(LlmpyError, match="auto .*mkl and numpy"):
        cpu._mkl_module()


@needs_mkl
def test_bench_times_pytorch_in_a_child_once_mkl_is_loaded(monkeypatch):
    # PyTorch imported where MKL's libraries are loaded binds its own MKL
    # calls to them and runs on one thread: the comparison would flatter llmpy
    from llmpy import bench
    use_blas(monkeypatch, "mkl")
    children = []

    def child(side, model, B, T, steps):
        children.append((side, model, B, T))
        return {"torch_ms_per_step": 1000.0}
    monkeypatch.setattr(bench, "bench_child", child)
    monkeypatch.setattr(bench, "bench_torch", lambda *a, **k: pytest.fail("PyTorch timed in this process"))
    res = bench.bench("cpu", "d2", 1, 16, steps=5, compare="torch")
    assert children == [("torch", "d2", 1, 16)]
    assert res["torch_ms_per_step"] == 1000.0
    assert abs(res["ratio"] - res["ms_per_step"] / 1000.0) <= 1e-3     # (ms_per_step is rounded to 0.1 ms)


def test_train_with_a_bad_choice_is_one_line_before_out_is_made(tmp_path, capsys, monkeypatch):
    from llmpy import cli
    use_blas(monkeypatch, "openblas")
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "d2", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LLMPY_CPU_BLAS='openblas'" in err[0]
    assert not out.exists()
