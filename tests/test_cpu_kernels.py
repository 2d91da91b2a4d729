"""The compiled loops (ops/cpu_kernels.py, numba) against the NumPy
reference (ops/cpu.py). AdamW: the same float32 operations in the same
order, so the same bits; its bf16 copy against ml_dtypes' rounding. The
layernorms and sum_of_squares: the same math with the sums in another order,
so equal to float32 rounding (and both against float64 finite differences
in test_ops_gradcheck.py)."""
from __future__ import annotations

import numpy as np
import pytest

from llmpy.ops import cpu, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available, reason="needs numba")


@pytest.fixture(autouse=True)
def small_arrays_compiled_too(monkeypatch):
    # cpu.py runs arrays under compiled_min floats in NumPy; the tests below
    # mean the compiled loops whatever the size
    monkeypatch.setattr(cpu, "compiled_min", 0)


@pytest.mark.parametrize("weight_decay, grad_scale", [(0.1, 1.0), (0.0, 0.37), (0.1, 0.37)])
def test_compiled_adamw_is_the_reference_to_the_bit(weight_decay, grad_scale):
    rng = np.random.default_rng(0)
    n = 10_007
    state = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]       # param, m, grad
    v0 = rng.random(n).astype(np.float32) * 1e-3
    ref = [x.copy() for x in (state[0], state[1], v0)]
    got = [x.copy() for x in (state[0], state[1], v0)]
    scratch = np.empty((2, n), np.float32)
    for step in (1, 2, 50):
        cpu.adamw_update(ref[0], state[2], ref[1], ref[2], 3e-4, 0.9, 0.95, 1e-8, weight_decay, step, scratch,
                         grad_scale)
        cpu_kernels.adamw_update(got[0], state[2], got[1], got[2], 3e-4, 0.9, 0.95, 1e-8, weight_decay, step,
                                 scratch, grad_scale)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], state[0])          # it did update


def test_compiled_adamw_writes_the_bf16_copy_rounded_to_nearest_even():
    import ml_dtypes
    rng = np.random.default_rng(1)
    n = 4096
    p = rng.standard_normal(n).astype(np.float32)
    p[:4] = [np.inf, -np.inf, 0.0, -0.0]                 # stay what they are through the update below
    g = np.zeros(n, np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    copy = np.full(n, np.nan, ml_dtypes.bfloat16)
    cpu_kernels.adamw_update(p, g, m, v, 0.0, 0.9, 0.95, 1e-8, 0.0, 1, None, copy=copy)
    np.testing.assert_array_equal(copy.view(np.uint16), p.astype(ml_dtypes.bfloat16).view(np.uint16))
    p[5] = np.nan
    cpu_kernels.adamw_update(p, g, m, v, 0.0, 0.9, 0.95, 1e-8, 0.0, 1, None, copy=copy)
    assert np.isnan(copy[5].astype(np.float32))            # a NaN stays a NaN (the non-finite check sees it)


def test_adamw_uses_the_compiled_update_and_gives_the_same_weights(monkeypatch):
    from llmpy.config import GPTConfig
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    x = np.random.default_rng(2).integers(0, 100, (2, 16))
    calls = []
    compiled_update = cpu_kernels.adamw_update
    monkeypatch.setattr(cpu_kernels, "adamw_update", lambda *a, **k: calls.append(1) or compiled_update(*a, **k))
    models = []
    for compiled in (True, False):
        model = GPT(cfg, seed=3)
        opt = AdamW(model)
        opt.compiled = compiled
        for t in (1, 2, 3):
            model.zero_grad()
            model.forward(x, x)
            model.backward()
            opt.step(1e-3, t, grad_scale=0.9)
        models.append(model)
    assert len(calls) >= 3                              # the compiled run went through it
    np.testing.assert_array_equal(models[0].params.flat, models[1].params.flat)


def _layernorm_case(N, C, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C)) * 3 + 1.5).astype(np.float32)      # a mean far from 0: the variance's test
    w, b = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal((N, C)).astype(np.float32)
    return x, w, b, dout


def _rel(a, b):
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


def _run_layernorm(compiled, x, w, b, dout, residual=None, acc=False):
    # forward (through the residual add when residual is given), then backward;
    # dinp starts at 1 (it is added to), dweight/dbias at 2 (added to with acc)
    import llmpy.ops.cpu as ops
    ops.compiled = compiled
    try:
        N, C = x.shape
        out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
        if residual is None:
            inp = x
            ops.layernorm_forward(out, mean, rstd, x, w, b)
        else:
            inp = np.empty_like(x)
            ops.residual_layernorm_forward(inp, out, mean, rstd, x, residual, w, b)
        dinp, dw, db = np.ones_like(x), np.full(C, 2, np.float32), np.full(C, 2, np.float32)
        ops.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, np.empty((2, N, C), np.float32), acc=acc)
        return [out, mean, rstd, dinp, dw, db] + ([] if residual is None else [inp])
    finally:
        ops.compiled = True


@pytest.mark.parametrize("N, C", [(7, 48), (256, 768), (2048, 768)])     # inline; and split over the threads
@pytest.mark.parametrize("residual, acc", [(False, False), (True, True)])
def test_compiled_layernorm_is_the_reference_to_rounding(N, C, residual, acc):
    x, w, b, dout = _layernorm_case(N, C)
    res = np.flip(x, axis=0).copy() if residual else None
    got, ref = _run_layernorm(True, x, w, b, dout, res, acc), _run_layernorm(False, x, w, b, dout, res, acc)
    names = ["out", "mean", "rstd", "dinp", "dweight", "dbias", "res"]
    for name, g, r in zip(names, got, ref):
        assert g.dtype == np.float32
        assert _rel(g, r) < 2e-6, name


def test_compiled_layernorm_takes_3d_rows_and_skips_strided_arrays(monkeypatch):
    import llmpy.ops.cpu as ops
    x, w, b, _ = _layernorm_case(64, 32)
    calls = []
    forward = cpu_kernels.layernorm_forward
    monkeypatch.setattr(cpu_kernels, "layernorm_forward", lambda *a: calls.append(1) or forward(*a))
    out3, m3, r3 = np.empty((4, 16, 32), np.float32), np.empty(64, np.float32), np.empty(64, np.float32)
    ops.layernorm_forward(out3, m3, r3, x.reshape(4, 16, 32), w, b)          # (B, T, C) as (N, C) rows
    assert calls == [1]
    strided = np.repeat(x, 2, axis=1)[:, ::2]                                 # the same values, not contiguous
    out, m, r = np.empty_like(x), np.empty(64, np.float32), np.empty(64, np.float32)
    ops.layernorm_forward(out, m, r, strided, w, b)
    assert calls == [1]                                                      # the NumPy code ran
    np.testing.assert_allclose(out3.reshape(64, 32), out, rtol=0, atol=1e-5)


def test_compiled_layernorm_lets_nan_and_inf_through():
    # no fastmath "nnan"/"ninf": a bad value must reach the loss, where the
    # training loop's non-finite check stops the run
    x, w, b, dout = _layernorm_case(8, 64)
    x[3, 5] = np.nan
    x[5, 0] = np.inf
    out, mean, rstd, dinp, dw, db = _run_layernorm(True, x, w, b, dout)
    assert np.isnan(out[3]).all() and np.isnan(out[5]).all() and np.isnan(dw).all()
    assert np.isfinite(np.delete(out, [3, 5], axis=0)).all()


@pytest.mark.parametrize("n", [1, 4095, 4097, (1 << 20) + 3, 3 * (1 << 20) + 17])
def test_compiled_sum_of_squares_matches_float64(n):
    import llmpy.ops.cpu as ops
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    exact = float(np.sum(np.float64(x) ** 2))
    got = ops.sum_of_squares(x)
    assert abs(got - exact) <= 1e-6 * exact
    assert ops.sum_of_squares(x) == got                 # fixed blocks in a fixed order: the same bits again
    ops.compiled = False
    try:
        assert abs(ops.sum_of_squares(x) - exact) <= 1e-4 * exact     # the reference, np.dot, sums in float32
    finally:
        ops.compiled = True


# ---------------------------------------------------------------------------- exp, tanh and the ops built on them

def test_compiled_exp_is_within_two_float32_ulp_of_float64_exp():
    x = np.concatenate([np.linspace(-87, 88, 2_000_001), np.random.default_rng(3).uniform(-30, 0, 100_000)])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    cpu_kernels._exp_array(got, x)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) <= 2 * 2.0 ** -24
    special = np.array([-87.5, -1e4, -np.inf, np.nan, 0.0], np.float32)
    out = np.empty_like(special)
    cpu_kernels._exp_array(out, special)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0      # under e^-87 (float32's smallest normal): exactly 0
    assert np.isnan(out[3]) and out[4] == 1


def test_compiled_tanh_is_within_2e7_of_float64_tanh():
    x = np.concatenate([np.linspace(-12, 12, 1_000_001), [1e-30, -1e-30, 40, -40, np.inf, -np.inf]]).astype(np.float32)
    got = np.empty_like(x)
    cpu_kernels._tanh_array(got, x)
    assert np.max(np.abs(got - np.tanh(x.astype(np.float64)))) <= 2e-7     # absolute: what 1 + tanh needs
    assert got[-2] == 1 and got[-1] == -1 and np.abs(got).max() <= 1
    nan = np.empty(1, np.float32)
    cpu_kernels._tanh_array(nan, np.array([np.nan], np.float32))
    assert np.isnan(nan[0])


def _gelu64(x):
    x = np.float64(x)
    s, a = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(s * (x + a * x ** 3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * s * (1 + 3 * a * x * x)


@pytest.mark.parametrize("in_place", [False, True])
def test_compiled_gelu_matches_float64(in_place):
    import llmpy.ops.cpu as ops
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((300, 1000)) * 3).astype(np.float32)         # past the pool's threshold: two threads
    x[0, :4] = [0.0, -30.0, 30.0, np.nan]
    dout = rng.standard_normal(x.shape).astype(np.float32)
    y, dydx = _gelu64(x)
    out = np.empty_like(x)
    ops.gelu_forward(out, x)
    dinp = dout.copy() if in_place else np.empty_like(x)
    ops.gelu_backward(dinp, x, dinp if in_place else dout, np.empty_like(x))
    ok = np.isfinite(x)
    assert np.isnan(out[0, 3]) and np.isnan(dinp[0, 3])
    assert _rel(out[ok], y[ok]) < 1e-6 and _rel(dinp[ok], (dout * dydx)[ok]) < 1e-6
    assert np.max(np.abs(out[ok] - y[ok])) < 1e-5


def _ce64(logits, targets, V):
    x = np.float64(logits[:, :V])
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    grad = np.exp(x - lse[:, None])
    grad[np.arange(len(targets)), targets] -= 1
    return lse - x[np.arange(len(targets)), targets], lse, grad


@pytest.mark.parametrize("V, Vp", [(50257, 50304), (1000, 1000)])
def test_compiled_classifier_matches_float64(V, Vp):
    import llmpy.ops.cpu as ops
    rng = np.random.default_rng(5)
    N = 24
    logits = (rng.standard_normal((N, Vp)) * 4).astype(np.float32)
    logits[1] += 1e4                                    # stable for large logits (the max is subtracted)
    targets = rng.integers(0, V, N)
    loss64, lse64, grad64 = _ce64(logits, targets, V)
    dloss = 1.0 / N
    losses, lse = np.empty(N, np.float32), np.empty(N, np.float32)

    def check_loss():
        # row 1's loss is a difference of two numbers near 1e4: float32 holds those to ~1e-3
        assert _rel(np.delete(losses, 1), np.delete(loss64, 1)) < 1e-6 and abs(losses[1] - loss64[1]) < 4e-3
        assert _rel(lse, lse64) < 1e-6

    ops.crossentropy_forward(losses, lse, logits, targets, V=V)
    check_loss()
    g = logits.copy()
    ops.crossentropy_forward_backward(losses, lse, g, targets, dloss, V=V)
    check_loss()
    assert _rel(g[:, :V], grad64 * dloss) < 1e-6 and not g[:, V:].any()
    g2 = logits.copy()
    ops.crossentropy_backward(g2, lse, targets, dloss, V=V)
    # (from the float32 lse: row 1's, near 1e4, is exact to ~1e-3, so its exponentials to ~1e-3)
    keep = np.arange(N) != 1
    assert _rel(g2[keep, :V], grad64[keep] * dloss) < 1e-6 and _rel(g2[1, :V], grad64[1] * dloss) < 2e-3
    assert not g2[:, V:].any()


def test_compiled_classifier_gives_nan_for_a_nan_logit():
    import llmpy.ops.cpu as ops
    logits = np.random.default_rng(6).standard_normal((4, 3000)).astype(np.float32)
    logits[2, 17] = np.nan
    losses, lse = np.empty(4, np.float32), np.empty(4, np.float32)
    ops.crossentropy_forward_backward(losses, lse, logits, np.array([0, 1, 2, 3]), 0.25)
    assert np.isnan(losses[2]) and np.isfinite(np.delete(losses, 2)).all()


@pytest.mark.parametrize("B, T, NH, NKV, hs", [(3, 37, 2, 2, 8), (2, 64, 12, 12, 64),    # GPT-2's attention
                                             (3, 37, 4, 2, 8), (2, 40, 6, 1, 16)])      # grouped-query
def test_compiled_attention_softmax_matches_float64(B, T, NH, NKV, hs):
    # the compiled causal softmax (float32) against the NumPy code in float64
    # (the NumPy code: against PyTorch and finite differences in test_ops_gradcheck, test_llama_ops)
    import llmpy.ops.cpu as ops
    rng = np.random.default_rng(7)
    C = NH * hs
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)

    def run(dtype, compiled):
        ops.compiled = compiled
        try:
            q = qkv.astype(dtype)
            out, att = np.empty((B, T, C), dtype), np.full((B, NH, T, T), np.nan, dtype)
            dqkv, datt = np.full_like(q, np.nan), np.full_like(att, np.nan)
            if NKV == NH:
                ops.attention_forward(out, att, q, NH)
                ops.attention_backward(dqkv, dout.astype(dtype), q, att, datt, NH)
            else:
                ops.gqa_attention_forward(out, att, q, NH, NKV)
                ops.gqa_attention_backward(dqkv, dout.astype(dtype), q, att, datt, NH, NKV)
            return out, att, dqkv
        finally:
            ops.compiled = True

    got, ref = run(np.float32, True), run(np.float64, False)
    for name, g, r in zip(["out", "att", "dqkv"], got, ref):
        assert _rel(g, r) < 1e-6, name
    upper = np.triu(np.ones((T, T), bool), k=1)
    assert not got[1][:, :, upper].any()                # masked entries are exactly 0


def test_small_arrays_take_the_numpy_code(monkeypatch):
    # below compiled_min floats cpu.py does not call the compiled loops (nor import numba for them)
    monkeypatch.setattr(cpu, "compiled_min", 1 << 14)
    calls = []
    forward = cpu_kernels.layernorm_forward
    monkeypatch.setattr(cpu_kernels, "layernorm_forward", lambda *a: calls.append(a[0].size) or forward(*a))
    for N in (4, 64):                                   # 4 x 768 floats: NumPy; 64 x 768: compiled
        x, w, b, _ = _layernorm_case(N, 768)
        cpu.layernorm_forward(np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32), x, w, b)
    assert calls == [64 * 768]


def test_the_environment_can_turn_the_compiled_loops_off():
    import os
    import subprocess
    import sys
    code = "from llmpy.ops import cpu; print(cpu.compiled)"
    for value, expect in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in os.environ.items() if k != "LLMPY_CPU_KERNELS"}
        if value is not None:
            env["LLMPY_CPU_KERNELS"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expect
