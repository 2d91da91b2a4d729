"""--device cpu --dtype bf16: MKL's bf16 GEMM (ops/mkl.py) and the backend
around it (ops/cpu_bf16.py), against float64 products and the fp32 NumPy
backend. Skipped, with the reason, where MKL cannot be loaded (pip install
'llmpy[cpu-bf16]'; the test extra brings it on x86-64 Linux)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import bf16_checks
from llmpy.config import GPTConfig
from llmpy.ops import cpu, mkl
from mkl_checks import MKL_MISSING, needs_mkl

BF16 = bf16_checks.BF16


def bf16(rng, *shape):
    """Random bf16 values (and the same values as float64)."""
    b = rng.standard_normal(shape).astype(np.float32).astype(BF16)
    return b, b.astype(np.float64)


@needs_mkl
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_is_the_float64_product_of_its_bf16_inputs(trans_a, trans_b):
    # bf16 inputs are exact in float64: what is left is fp32 accumulation
    # (~1e-7 relative); a wrong transpose, leading dimension or beta is O(1).
    rng = np.random.default_rng(0)
    m, n, k = 37, 29, 70
    a, a64 = bf16(rng, *((k, m) if trans_a else (m, k)))
    b, b64 = bf16(rng, *((n, k) if trans_b else (k, n)))
    ref = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    c = np.full((m, n), np.nan, np.float32)
    mkl.gemm(c, a, b, trans_a, trans_b)
    assert np.abs(c - ref).max() < 1e-5 * np.abs(ref).max()
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    c = c0.copy()
    mkl.gemm(c, a, b, trans_a, trans_b, beta=1.0)          # accumulation, as acc=True gradients
    assert np.abs(c - (ref + c0)).max() < 1e-5 * np.abs(ref).max()


@needs_mkl
def test_gemm_reads_strided_blocks_in_place():
    # the backend's row blocks: rows lo:hi of a, and a column block of c and a^T
    rng = np.random.default_rng(1)
    a, a64 = bf16(rng, 40, 64)
    b, b64 = bf16(rng, 48, 64)
    c = np.zeros((40, 48), np.float32)
    mkl.gemm(c[10:30, 8:40], a[10:30], b[8:40], False, True)
    assert np.abs(c[10:30, 8:40] - a64[10:30] @ b64[8:40].T).max() < 1e-4
    assert not c[:10].any() and not c[30:].any() and not c[:, :8].any() and not c[:, 40:].any()
    with pytest.raises(ValueError, match="contiguous"):
        mkl.gemm(c, a[:, ::2], b[:, ::2], False, True)
    with pytest.raises(ValueError, match="shapes"):
        mkl.gemm(c, a, b[:, :32], False, True)


@pytest.fixture
def bk():
    if MKL_MISSING:
        pytest.skip(MKL_MISSING)
    from llmpy.ops import cpu_bf16
    return cpu_bf16


def test_backend_implements_the_contract(bk):
    from test_contract import problems
    assert problems(bk, "cpu") == []
    assert bk.storage_dtype("bf16") == np.float32 and bk.params_dtype("bf16") == BF16


def test_matmul_is_the_fp32_op_on_bf16_rounded_inputs(bk):
    # matmul_forward/backward round their float32 inputs to bf16 and nothing
    # else: against the fp32 op given the same rounded inputs they agree to
    # fp32 accumulation (N and OC split over the threads' row blocks).
    rng = np.random.default_rng(2)
    N, C, OC = 300, 64, 96
    r = lambda *s: rng.standard_normal(s).astype(np.float32)      # noqa: E731
    round16 = lambda x: x.astype(BF16).astype(np.float32)          # noqa: E731
    inp, dout = r(N, C), r(N, OC)
    w16, b16 = r(OC, C).astype(BF16), r(OC).astype(BF16)
    out, ref = np.empty((N, OC), np.float32), np.empty((N, OC), np.float32)
    bk.matmul_forward(out, inp, w16, b16)
    cpu.matmul_forward(ref, round16(inp), w16.astype(np.float32), b16.astype(np.float32))
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()
    g = {k: np.full(s, np.nan, np.float32) for k, s in [("dinp", (N, C)), ("dw", (OC, C)), ("db", (OC,))]}
    h = {k: np.empty_like(v) for k, v in g.items()}
    bk.matmul_backward(g["dinp"], g["dw"], g["db"], dout, inp, w16, acc=False)
    cpu.matmul_backward(h["dinp"], h["dw"], h["db"], round16(dout), round16(inp), w16.astype(np.float32), acc=False)
    for k in ("dinp", "dw"):
        assert np.abs(g[k] - h[k]).max() < 1e-5 * np.abs(h[k]).max(), k
    np.testing.assert_allclose(g["db"], dout.sum(axis=0), rtol=1e-5)   # the bias gradient stays fp32
    before = g["dw"].copy()
    bk.matmul_backward(None, g["dw"], None, dout, inp, w16, acc=True)
    assert np.abs(g["dw"] - 2 * before).max() < 1e-5 * np.abs(before).max()


def test_weight_reading_ops_widen_the_bf16_weights(bk):
    # encoder and layernorm read bf16 weights: exactly the fp32 op on the widened weights
    rng = np.random.default_rng(3)
    B, T, C, V = 2, 5, 16, 30
    wte, wpe, w, b = (rng.standard_normal(s).astype(np.float32).astype(BF16) for s in [(V, C), (T, C), (C,), (C,)])
    ids = rng.integers(0, V, (B, T))
    out, ref = np.empty((B, T, C), np.float32), np.empty((B, T, C), np.float32)
    bk.encoder_forward(out, ids, wte, wpe)
    cpu.encoder_forward(ref, ids, wte.astype(np.float32), wpe.astype(np.float32))
    np.testing.assert_array_equal(out, ref)
    x = ref.reshape(B * T, C)
    o1, o2 = np.empty_like(x), np.empty_like(x)
    s1, s2 = [np.empty(B * T, np.float32) for _ in range(2)], [np.empty(B * T, np.float32) for _ in range(2)]
    bk.layernorm_forward(o1, *s1, x, w, b)
    cpu.layernorm_forward(o2, *s2, x, w.astype(np.float32), b.astype(np.float32))
    np.testing.assert_array_equal(o1, o2)


def test_a_step_is_the_fp32_step_to_bf16_precision_and_adamw_rewrites_the_copy(bk):
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    cfg = GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=64)
    x = np.random.default_rng(4).integers(0, 300, (3, 32))
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=1, dtype="bf16")
    assert b.ops is bk and b.compute_params.flat.dtype == BF16 and b.params.flat.dtype == np.float32
    np.testing.assert_array_equal(b.compute_params.flat, b.params.flat.astype(BF16))
    _, la = a.forward(x, x)
    a.backward()
    _, lb = b.forward(x, x, loss_scale=1.0)
    b.backward(1.0)
    assert abs(lb - la) < 1e-2 * la
    assert bf16_checks.rel_err(b.grads.flat, a.grads.flat) < 5e-2
    assert b.grads.flat.dtype == np.float32
    AdamW(b).step(1e-3, 1)
    # the fp32 master moved, and the bf16 copy the ops read is its rounding
    assert not np.array_equal(b.params.flat, a.params.flat)
    np.testing.assert_array_equal(b.compute_params.flat, b.params.flat.astype(BF16))


def test_training_loss_tracks_fp32(bk):
    worst = bf16_checks.loss_tracks_fp32(np, steps=100, device="cpu")
    print(f"100 steps: worst |bf16 - fp32| / fp32 loss = {worst:.2e}")


def test_train_cli_bf16_checkpoints_fp32_and_resume_is_bitwise(bk, tmp_path, capsys):
    from safetensors.numpy import load_file

    from llmpy.cli import main
    from llmpy.data.prepare import prepare_pydoc
    info = prepare_pydoc(tmp_path / "pydoc")
    args = ["train", "--dtype", "bf16", "--data", str(info["train"]), "--val-data", str(info["val"]),
            "--model", "d2", "-B", "2", "-T", "32", "--lr", "3e-3", "--val-every", "2", "--val-steps", "1",
            "--sample-every", "0", "--checkpoint-every", "2", "--steps", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--stop-at", "2"]) == 0
    assert main(args + ["--out", str(tmp_path / "a"), "--resume"]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    la, lb = ([json.loads(s) for s in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab")
    assert [r["step"] for r in la] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in la)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]          # stop + resume = one run, to the bit
    sa = load_file(str(tmp_path / "a" / "ckpt_00000004" / "model.safetensors"))
    sb = load_file(str(tmp_path / "b" / "ckpt_00000004" / "model.safetensors"))
    assert all(t.dtype == np.float32 for t in sa.values())            # the fp32 master weights
    assert all(np.array_equal(sa[k], sb[k]) for k in sb)


def test_without_mkl_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    from llmpy.cli import main
    monkeypatch.setattr(mkl, "_lib", None)
    monkeypatch.setattr(mkl, "_candidates", lambda: iter(["libmkl_rt_not_here.so.3"]))
    assert main(["train", "--dtype", "bf16", "--model", "d2", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs Intel MKL" in err[0] and "llmpy[cpu-bf16]" in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_cpu_without_amx_gets_a_note(bk, monkeypatch):
    import llmpy.ops as ops
    monkeypatch.setattr(mkl, "cpu_has_amx_bf16", lambda: False)
    monkeypatch.setattr(ops, "_noted", set())
    lines = []
    monkeypatch.setattr(ops, "_note_once", lambda line: lines.append(line))
    assert ops.get_backend("cpu", "bf16") is bk
    assert len(lines) == 1 and "no AMX-BF16" in lines[0]


def test_cpu_suite_times_llmpy_bf16_beside_pytorch_autocast(bk, capsys):
    from llmpy.bench import suite_line, suite_main
    assert suite_main(["--suite", "--quick", "--json", "--bf16"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["order"] == "llmpy torch llmpy_bf16 torch_bf16"
    assert row["bf16_ratio"] == round(row["llmpy_bf16_ms_per_step"] / row["torch_bf16_ms_per_step"], 3)
    assert row["llmpy_bf16_peak_rss_mib"] > 50 and row["torch_bf16_peak_rss_mib"] > 50
    assert suite_line(row).count("|") == 15          # 14 columns


def test_llama_step_in_bf16_is_the_fp32_step_to_bf16_precision(bk):
    # the Llama ops that read weights (embedding, rmsnorm) widen them too
    from llmpy.llama import Llama
    from llmpy.llama_layout import LlamaConfig
    cfg = LlamaConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160,
                      block_size=32)
    x = np.random.default_rng(5).integers(0, 256, (2, 32))
    a, b = Llama(cfg, seed=2), Llama(cfg, seed=2, dtype="bf16")
    _, la = a.forward(x, x)
    a.backward()
    _, lb = b.forward(x, x)
    b.backward()
    assert abs(lb - la) < 1e-2 * la
    assert bf16_checks.rel_err(b.grads.flat, a.grads.flat) < 5e-2
