"""Every CUDA op against the NumPy reference (llmpy/ops/cpu.py), and a whole
fp32 training step on the GPU against the same step on the CPU.

All tests here are marked `gpu`: conftest.py skips them, with the reason,
where CuPy or a GPU is missing; run them with `pytest -m gpu`.

How each op is checked (DESIGN.md section 3):
- inputs are random (never zeros), the same for both backends;
- every output the GPU op must write is first filled with NaN ("poisoned"),
  so an element the kernel forgets stays NaN, and NaN never passes;
- relative L2 error vs the CPU result <= 1e-5 (fp32) per op, <= 1e-4 for a
  whole training step;
- parameter gradients both ways: acc=False (overwrite: poisoned first) and
  acc=True (add to random values).
"""
from __future__ import annotations

import numpy as np
import pytest

from llmpy.config import GPTConfig
from llmpy.ops import cpu

pytestmark = pytest.mark.gpu

OP_RTOL = 1e-5
STEP_RTOL = 1e-4


@pytest.fixture(scope="module")
def cuda():
    from llmpy.ops import cuda
    return cuda


@pytest.fixture(scope="module")
def cp():
    import cupy
    return cupy


# ---------------------------------------------------------------------------- helpers

def rel_err(a, b):
    """Relative L2 error of a (GPU or CPU array) against the CPU reference b;
    a NaN or inf anywhere fails."""
    a = a.get() if hasattr(a, "get") else np.asarray(a)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.all(np.isfinite(a)), f"{np.sum(~np.isfinite(a))} non-finite values (unwritten elements?)"
    denom = np.linalg.norm(b)
    assert denom > 0, "reference is all zeros: the check would be meaningless"
    return float(np.linalg.norm(a - b) / denom)


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def nan(cp, *shape):
    return cp.full(shape, np.nan, dtype=cp.float32)


# ---------------------------------------------------------------------------- encoder

def test_encoder_forward(cuda, cp):
    rng = np.random.default_rng(0)
    B, T, C, Vp, maxT = 3, 37, 96, 256, 64
    ids = rng.integers(0, 200, size=(B, T))
    wte, wpe = rnd(rng, Vp, C), rnd(rng, maxT, C)
    ref = np.empty((B, T, C), np.float32)
    cpu.encoder_forward(ref, ids, wte, wpe)
    out = nan(cp, B, T, C)
    cuda.encoder_forward(out, cp.asarray(ids), cp.asarray(wte), cp.asarray(wpe))
    assert rel_err(out, ref) <= OP_RTOL


@pytest.mark.parametrize("acc", [False, True])
def test_encoder_backward(cuda, cp, acc):
    rng = np.random.default_rng(1)
    B, T, C, Vp, maxT = 4, 33, 64, 128, 48
    ids = rng.integers(0, 20, size=(B, T))                 # few ids: many repeats to scatter-add
    ids[0, :5] = 7                                         # a run of one token
    dout = rnd(rng, B, T, C)
    dwte0, dwpe0 = rnd(rng, Vp, C), rnd(rng, maxT, C)
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    cpu.encoder_backward(dwte, dwpe, dout, ids, acc=acc)
    if acc:
        g_dwte, g_dwpe = cp.asarray(dwte0), cp.asarray(dwpe0)
    else:
        g_dwte, g_dwpe = nan(cp, Vp, C), nan(cp, maxT, C)
    cuda.encoder_backward(g_dwte, g_dwpe, cp.asarray(dout), cp.asarray(ids), acc=acc)
    assert rel_err(g_dwte, dwte) <= OP_RTOL
    assert rel_err(g_dwpe, dwpe) <= OP_RTOL


# ---------------------------------------------------------------------------- layernorm

def test_layernorm_forward(cuda, cp):
    rng = np.random.default_rng(2)
    N, C = 77, 200
    inp = rnd(rng, N, C, scale=3.0) + 1.5
    w, b = rnd(rng, C), rnd(rng, C)
    out, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.layernorm_forward(out, mean, rstd, inp, w, b)
    g_out, g_mean, g_rstd = nan(cp, N, C), nan(cp, N), nan(cp, N)
    cuda.layernorm_forward(g_out, g_mean, g_rstd, cp.asarray(inp), cp.asarray(w), cp.asarray(b))
    assert rel_err(g_out, out) <= OP_RTOL
    assert rel_err(g_mean, mean) <= OP_RTOL
    assert rel_err(g_rstd, rstd) <= OP_RTOL


@pytest.mark.parametrize("in_place", [False, True])
def test_residual_layernorm_forward(cuda, cp, in_place):
    rng = np.random.default_rng(3)
    N, C = 77, 200
    a, b = rnd(rng, N, C, scale=3.0) + 1.5, rnd(rng, N, C)
    w, bias = rnd(rng, C), rnd(rng, C)
    res, out = np.empty((N, C), np.float32), np.empty((N, C), np.float32)
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.residual_layernorm_forward(res, out, mean, rstd, a, b, w, bias)
    g_a = cp.asarray(a)
    g_res = g_a if in_place else nan(cp, N, C)
    g_out, g_mean, g_rstd = nan(cp, N, C), nan(cp, N), nan(cp, N)
    cuda.residual_layernorm_forward(g_res, g_out, g_mean, g_rstd, g_a, cp.asarray(b), cp.asarray(w),
                                    cp.asarray(bias))
    for g, c in ((g_res, res), (g_out, out), (g_mean, mean), (g_rstd, rstd)):
        assert rel_err(g, c) <= OP_RTOL


@pytest.mark.parametrize("acc", [False, True])
def test_layernorm_backward(cuda, cp, acc):
    rng = np.random.default_rng(3)
    N, C = 77, 200                                        # N not a multiple of the 32-row chunks
    inp, w, b = rnd(rng, N, C, scale=2.0), rnd(rng, C), rnd(rng, C)
    out, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.layernorm_forward(out, mean, rstd, inp, w, b)
    dout, dinp0 = rnd(rng, N, C), rnd(rng, N, C)
    dw0, db0 = rnd(rng, C), rnd(rng, C)
    dinp, dw, db = dinp0.copy(), dw0.copy(), db0.copy()
    cpu.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, np.empty((2, N, C), np.float32), acc=acc)

    g_dinp = cp.asarray(dinp0)                             # ADDED to: starts from the same values
    g_dw, g_db = (cp.asarray(dw0), cp.asarray(db0)) if acc else (nan(cp, C), nan(cp, C))
    cuda.layernorm_backward(g_dinp, g_dw, g_db, cp.asarray(dout), cp.asarray(inp), cp.asarray(w),
                            cp.asarray(mean), cp.asarray(rstd), nan(cp, 2, N, C), acc=acc)
    assert rel_err(g_dinp, dinp) <= OP_RTOL
    assert rel_err(g_dw, dw) <= OP_RTOL
    assert rel_err(g_db, db) <= OP_RTOL


# ---------------------------------------------------------------------------- matmul

# (bias, gelu): the GELU fused into the matmul's epilogue needs the leading
# dimension a multiple of 8 (OC = 128); OC = 130 takes the unfused path.
@pytest.mark.parametrize("bias,gelu", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("OC", [130, 128])
def test_matmul_forward(cuda, cp, bias, gelu, OC):
    rng = np.random.default_rng(4)
    N, C = 65, 96
    inp, w = rnd(rng, N, C), rnd(rng, OC, C)
    b = rnd(rng, OC) if bias else None
    out, act = np.empty((N, OC), np.float32), np.empty((N, OC), np.float32)
    cpu.matmul_forward(out, inp, w, b, gelu_out=act if gelu else None)
    g_out, g_act = nan(cp, N, OC), nan(cp, N, OC)
    cuda.matmul_forward(g_out, cp.asarray(inp), cp.asarray(w), None if b is None else cp.asarray(b),
                        gelu_out=g_act if gelu else None)
    assert rel_err(g_out, out) <= OP_RTOL
    if gelu:
        assert rel_err(g_act, act) <= OP_RTOL


@pytest.mark.parametrize("acc", [False, True])
@pytest.mark.parametrize("with_dinp,gelu", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("C", [96, 90])
def test_matmul_backward(cuda, cp, acc, with_dinp, gelu, C):
    rng = np.random.default_rng(5)
    N, OC = 65, 130
    inp, w, dout, pre = rnd(rng, N, C), rnd(rng, OC, C), rnd(rng, N, OC), rnd(rng, N, C)
    dw0, db0 = rnd(rng, OC, C), rnd(rng, OC)
    dinp = np.empty((N, C), np.float32) if with_dinp else None
    dw, db = dw0.copy(), db0.copy()
    gk = dict(gelu_inp=pre, gelu_scratch=np.empty((N, C), np.float32)) if gelu else {}
    cpu.matmul_backward(dinp, dw, db, dout, inp, w, acc=acc, **gk)
    g_dinp = nan(cp, N, C) if with_dinp else None
    g_dw, g_db = (cp.asarray(dw0), cp.asarray(db0)) if acc else (nan(cp, OC, C), nan(cp, OC))
    cuda.matmul_backward(g_dinp, g_dw, g_db, cp.asarray(dout), cp.asarray(inp), cp.asarray(w), acc=acc,
                         **(dict(gelu_inp=cp.asarray(pre)) if gelu else {}))
    if with_dinp:
        assert rel_err(g_dinp, dinp) <= OP_RTOL
    assert rel_err(g_dw, dw) <= OP_RTOL
    assert rel_err(g_db, db) <= OP_RTOL


# ---------------------------------------------------------------------------- attention

ATT_SHAPES = [(2, 37, 4, 16), (1, 64, 2, 32), (2, 1, 2, 8)]   # (B, T, NH, hs): T below, at, over a warp


@pytest.mark.parametrize("B,T,NH,hs", ATT_SHAPES)
def test_attention_forward(cuda, cp, B, T, NH, hs):
    rng = np.random.default_rng(6)
    C = NH * hs
    qkv = rnd(rng, B, T, 3 * C)
    out, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    cpu.attention_forward(out, att, qkv, NH)
    g_out, g_att = nan(cp, B, T, C), nan(cp, B, NH, T, T)
    cuda.attention_forward(g_out, g_att, cp.asarray(qkv), NH)
    assert rel_err(g_out, out) <= OP_RTOL
    assert rel_err(g_att, att) <= OP_RTOL
    # the masked (future) positions are exactly zero
    assert float(cp.abs(cp.triu(g_att, k=1)).max()) == 0.0


@pytest.mark.parametrize("B,T,NH,hs", ATT_SHAPES)
def test_attention_backward(cuda, cp, B, T, NH, hs):
    rng = np.random.default_rng(7)
    C = NH * hs
    qkv, dout = rnd(rng, B, T, 3 * C), rnd(rng, B, T, C)
    out, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    cpu.attention_forward(out, att, qkv, NH)
    dqkv = np.empty((B, T, 3 * C), np.float32)
    cpu.attention_backward(dqkv, dout, qkv, att, np.empty_like(att), NH)
    g_dqkv = nan(cp, B, T, 3 * C)
    cuda.attention_backward(g_dqkv, cp.asarray(dout), cp.asarray(qkv), cp.asarray(att), nan(cp, B, NH, T, T), NH)
    assert rel_err(g_dqkv, dqkv) <= OP_RTOL


def test_attention_forward_cached(cuda, cp):
    rng = np.random.default_rng(8)
    B, NH, hs, pos, t = 2, 3, 16, 11, 5
    q = rnd(rng, B, NH, t, hs)
    k, v = rnd(rng, B, NH, pos + t, hs), rnd(rng, B, NH, pos + t, hs)
    out = np.empty((B, NH, t, hs), np.float32)
    cpu.attention_forward_cached(out, q, k, v, pos)
    g_out = nan(cp, B, NH, t, hs)
    cuda.attention_forward_cached(g_out, cp.asarray(q), cp.asarray(k), cp.asarray(v), pos)
    assert rel_err(g_out, out) <= OP_RTOL


# ---------------------------------------------------------------------------- gelu, residual

def test_gelu_forward(cuda, cp):
    rng = np.random.default_rng(9)
    x = rnd(rng, 333, 97, scale=3.0)
    out = np.empty_like(x)
    cpu.gelu_forward(out, x)
    g_out = nan(cp, *x.shape)
    cuda.gelu_forward(g_out, cp.asarray(x))
    assert rel_err(g_out, out) <= OP_RTOL


@pytest.mark.parametrize("in_place", [False, True])
def test_gelu_backward(cuda, cp, in_place):
    rng = np.random.default_rng(10)
    x, dout = rnd(rng, 333, 97, scale=3.0), rnd(rng, 333, 97)
    dinp = np.empty_like(x)
    cpu.gelu_backward(dinp, x, dout, np.empty_like(x))
    g_dout = cp.asarray(dout)
    g_dinp = g_dout if in_place else nan(cp, *x.shape)
    cuda.gelu_backward(g_dinp, cp.asarray(x), g_dout, nan(cp, *x.shape))
    assert rel_err(g_dinp, dinp) <= OP_RTOL


def test_residual_forward(cuda, cp):
    rng = np.random.default_rng(11)
    a, b = rnd(rng, 1001, 7), rnd(rng, 1001, 7)
    out = np.empty_like(a)
    cpu.residual_forward(out, a, b)
    g_out = nan(cp, *a.shape)
    cuda.residual_forward(g_out, cp.asarray(a), cp.asarray(b))
    assert rel_err(g_out, out) <= OP_RTOL


# ---------------------------------------------------------------------------- classifier

@pytest.mark.parametrize("V,Vp", [(50257, 50257), (50257, 50304), (100, 100)])
def test_crossentropy(cuda, cp, V, Vp):
    # Vp > V: the model's padded logits; the padding must not count, and its
    # gradient is 0 (NaN in the padding here, so a read of it shows)
    rng = np.random.default_rng(12)
    N = 19
    logits = rnd(rng, N, Vp, scale=4.0)
    logits[:, V:] = np.nan
    targets = rng.integers(0, V, size=N)
    losses, lse = np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.crossentropy_forward(losses, lse, logits, targets, V=V)
    g_logits = cp.asarray(logits)
    g_losses, g_lse = nan(cp, N), nan(cp, N)
    cuda.crossentropy_forward(g_losses, g_lse, g_logits, cp.asarray(targets), V=V)
    assert rel_err(g_losses, losses) <= OP_RTOL
    assert rel_err(g_lse, lse) <= OP_RTOL

    dlogits = logits.copy()
    cpu.crossentropy_backward(dlogits, lse, targets, 1.0 / N, V=V)
    cuda.crossentropy_backward(g_logits, g_lse, cp.asarray(targets), 1.0 / N, V=V)
    assert rel_err(g_logits, dlogits) <= OP_RTOL
    assert not cp.any(g_logits[:, V:])
    # the fused forward + backward gives the same bits as the two kernels
    g2, l2, s2 = cp.asarray(logits), nan(cp, N), nan(cp, N)
    cuda.crossentropy_forward_backward(l2, s2, g2, cp.asarray(targets), 1.0 / N, V=V)
    assert cp.array_equal(l2, g_losses) and cp.array_equal(s2, g_lse) and cp.array_equal(g2, g_logits)


# ---------------------------------------------------------------------------- optimizer pieces

@pytest.mark.parametrize("n", [1, 1000, 3 * 2**20 + 7])
def test_sum_of_squares(cuda, cp, n):
    x = rnd(np.random.default_rng(13), n)
    ref = float(np.dot(x.astype(np.float64), x.astype(np.float64)))
    got = cuda.sum_of_squares(cp.asarray(x))
    assert isinstance(got, float)
    assert abs(got - ref) <= OP_RTOL * ref
    assert cuda.sum_of_squares(cp.asarray(x)) == got          # fixed order: the same bits again


@pytest.mark.parametrize("wd,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_adamw_update(cuda, cp, wd, grad_scale):
    rng = np.random.default_rng(14)
    n = 5000
    p, m, v = rnd(rng, n), rnd(rng, n, scale=0.1), np.abs(rnd(rng, n, scale=0.01))
    g_p, g_m, g_v = cp.asarray(p), cp.asarray(m), cp.asarray(v)
    scratch = np.empty((2, n), np.float32)
    for step in range(1, 4):
        grad = rnd(rng, n)
        cpu.adamw_update(p, grad, m, v, 1e-3, 0.9, 0.95, 1e-8, wd, step, scratch, grad_scale)
        # the GPU's update takes the whole buffer: here one segment, decayed if wd
        cuda.adamw_step_flat(g_p, cp.asarray(grad), g_m, g_v, [(0, n, bool(wd))], 1e-3, 0.9, 0.95, 1e-8, wd, step,
                             grad_scale)
    assert rel_err(g_p, p) <= OP_RTOL
    assert rel_err(g_m, m) <= OP_RTOL
    assert rel_err(g_v, v) <= OP_RTOL


def test_adamw_step_flat_segments(cuda, cp):
    # one launch over segments with and without decay == the CPU op per segment
    rng = np.random.default_rng(15)
    segments = [(0, 700, True), (700, 750, False), (750, 2000, True), (2000, 2013, False)]
    n = segments[-1][1]
    p, m, v, grad = rnd(rng, n), rnd(rng, n, scale=0.1), np.abs(rnd(rng, n, scale=0.01)), rnd(rng, n)
    g_p, g_m, g_v = cp.asarray(p), cp.asarray(m), cp.asarray(v)
    scratch = np.empty((2, n), np.float32)
    for s, e, decay in segments:
        cpu.adamw_update(p[s:e], grad[s:e], m[s:e], v[s:e], 3e-3, 0.9, 0.95, 1e-8, 0.1 if decay else 0.0,
                         5, scratch, 0.5)
    cuda.adamw_step_flat(g_p, cp.asarray(grad), g_m, g_v, segments, 3e-3, 0.9, 0.95, 1e-8, 0.1, 5, 0.5)
    assert rel_err(g_p, p) <= OP_RTOL
    assert rel_err(g_m, m) <= OP_RTOL
    assert rel_err(g_v, v) <= OP_RTOL


# ---------------------------------------------------------------------------- a whole step

def _step(device, cfg, ids, targets, steps=2, family=None):
    """`steps` training steps (forward, backward, global norm, AdamW) of a
    GPT-2 (or of `family`, a model class taking cfg); returns the losses, the
    norms, the last gradients and the final parameters (HF names)."""
    from llmpy.model import GPT
    from llmpy.optim import AdamW, global_norm
    model = (family or GPT)(cfg, device=device, seed=1)
    opt = AdamW(model, weight_decay=0.1)
    losses, norms = [], []
    for t in range(1, steps + 1):
        model.zero_grad()
        _, loss = model.forward(ids, targets)
        model.backward()
        norms.append(global_norm(model))
        opt.step(1e-3, t, grad_scale=0.5)
        losses.append(loss)
    return losses, norms, model.grads_dict(), model.state_dict()


def test_training_step_matches_cpu(cp):
    cfg = GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(16)
    B, T = 3, 48
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))
    c_losses, c_norms, c_grads, c_params = _step("cpu", cfg, ids, targets)
    g_losses, g_norms, g_grads, g_params = _step("cuda", cfg, cp.asarray(ids), cp.asarray(targets))
    for a, b in zip(g_losses + g_norms, c_losses + c_norms):
        assert abs(a - b) <= STEP_RTOL * abs(b)
    for name in c_grads:
        if np.any(c_grads[name]):
            assert rel_err(g_grads[name], c_grads[name]) <= STEP_RTOL, name
        else:
            assert not np.any(g_grads[name]), name
    for name in c_params:
        if np.any(c_params[name]):
            assert rel_err(g_params[name], c_params[name]) <= STEP_RTOL, name
        else:
            assert not np.any(g_params[name]), name


@pytest.mark.parametrize("NKV", [4, 2], ids=["mha", "gqa"])
def test_llama_training_step_matches_cpu(cp, NKV):
    # the Llama family's kernels (rmsnorm, rope, swiglu, embedding, grouped-query
    # attention) in a whole fp32 step, as GPT-2's above
    from llmpy.llama import Llama
    from llmpy.llama_layout import LlamaConfig
    cfg = LlamaConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=NKV, n_embd=64,
                      intermediate_size=96, rope_theta=1e4, tie_word_embeddings=False)
    rng = np.random.default_rng(19)
    ids, targets = rng.integers(0, 1000, size=(3, 48)), rng.integers(0, 1000, size=(3, 48))
    c = _step("cpu", cfg, ids, targets, family=Llama)
    g = _step("cuda", cfg, cp.asarray(ids), cp.asarray(targets), family=Llama)
    for a, b in zip(g[0] + g[1], c[0] + c[1]):
        assert abs(a - b) <= STEP_RTOL * abs(b)
    for got, ref in ((g[2], c[2]), (g[3], c[3])):
        for name in ref:
            assert rel_err(got[name], ref[name]) <= STEP_RTOL, name


def test_llama_bf16_training_step_tracks_fp32(cp):
    # bf16 Llama (GQA; cuDNN flash attention where the frontend imports) as bf16_checks holds GPT-2
    bf16_checks = pytest.importorskip("bf16_checks")
    from llmpy.llama import Llama
    from llmpy.llama_layout import LlamaConfig
    cfg = LlamaConfig(block_size=32, vocab_size=200, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, rope_theta=1e4)
    bf16_checks.step_tracks_fp32(cp, make=lambda device, dtype: Llama(cfg, device=device, seed=3, dtype=dtype))


def test_training_step_is_repeatable(cp):
    # no atomics anywhere: two identical runs give the same bits
    cfg = GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=32)
    rng = np.random.default_rng(17)
    ids = cp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 32)))
    a = _step("cuda", cfg, ids, ids, steps=1)
    b = _step("cuda", cfg, ids, ids, steps=1)
    assert a[0] == b[0] and a[1] == b[1]
    for name in a[2]:
        assert np.array_equal(a[2][name], b[2][name]), name


def test_forward_cached_matches_forward(cp):
    from llmpy.inference import KVCache, forward_cached
    from llmpy.model import GPT
    cfg = GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg, device="cuda", seed=2)
    ids = cp.asarray(np.random.default_rng(18).integers(0, cfg.vocab_size, size=(2, 20)))
    logits, _ = model.forward(ids)
    full = logits.get()
    cache = KVCache(model, B=2)
    first = forward_cached(model, ids[:, :12], cache, all_logits=True)
    rest = [forward_cached(model, ids[:, t:t + 1], cache) for t in range(12, 20)]
    assert rel_err(first, full[:, :12]) <= OP_RTOL
    assert rel_err(cp.stack(rest, axis=1), full[:, 12:]) <= OP_RTOL


# ---------------------------------------------------------------------------- bf16 mixed precision
# The same checks as tests/test_cuda_host.py runs through cudasim, here on the GPU.

def test_ops_match_cpu_bf16(cuda, cp):
    bf16_checks = pytest.importorskip("bf16_checks")
    bf16_checks.ops_match_cpu(cuda, cp)


def test_bf16_training_step_tracks_fp32(cp):
    bf16_checks = pytest.importorskip("bf16_checks")
    bf16_checks.step_tracks_fp32(cp)


def test_stochastic_rounding_is_unbiased(cuda, cp):
    bf16_checks = pytest.importorskip("bf16_checks")
    bf16_checks.stochastic_rounding_is_unbiased(cuda, cp)


def test_bf16_training_loss_tracks_fp32(cp):
    bf16_checks = pytest.importorskip("bf16_checks")
    worst = bf16_checks.loss_tracks_fp32(cp, steps=100)
    print(f"100 steps: worst |bf16 - fp32| / fp32 loss = {worst:.2e}")


@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 37, 4, 4, 16), (4, 1024, 12, 12, 64), (2, 37, 4, 2, 16),
                                            (2, 256, 32, 8, 64)])
def test_attention_cudnn_bf16(cuda, cp, B, T, NH, NKV, hs):
    # cuDNN flash attention (bf16), multi-head and grouped-query (k, v with
    # NKV < NH heads), against the fp32 NumPy reference on the same
    # bf16-exact inputs; and the backend's first-use check must accept it.
    if cuda.attention.cudnn is None:
        pytest.skip(f"no cuDNN frontend: {cuda.attention_library}")
    import ml_dtypes
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert cuda.attention._cudnn_ok(B, NH, NKV, T, hs), "cuDNN attention was turned off (see the message above)"
    assert cuda.attention_saved(B, NH, T, hs, bf16, n_kv_head=NKV)[0] == (B, NH, T)   # the flash path
    rng = np.random.default_rng(21)
    C, W = NH * hs, (NH + 2 * NKV) * hs
    qkv = rng.standard_normal((B, T, W), dtype=np.float32).astype(bf16)
    dout = rng.standard_normal((B, T, C), dtype=np.float32).astype(bf16)
    out, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    dqkv = np.empty((B, T, W), np.float32)
    cpu.gqa_attention_forward(out, att, qkv.astype(np.float32), NH, NKV)
    cpu.gqa_attention_backward(dqkv, dout.astype(np.float32), qkv.astype(np.float32), att, np.empty_like(att),
                               NH, NKV)
    g_out, g_stats = cp.full((B, T, C), np.nan, dtype=bf16), cp.full((B, NH, T), np.nan, dtype=np.float32)
    g_dqkv = cp.full((B, T, W), np.nan, dtype=bf16)
    cuda.gqa_attention_forward(g_out, g_stats, cp.asarray(qkv), NH, NKV)
    cuda.gqa_attention_backward(g_dqkv, cp.asarray(dout), cp.asarray(qkv), g_stats, None, NH, NKV, out=g_out)
    assert rel_err(g_out.astype(np.float32), out) <= 1e-2
    assert rel_err(g_dqkv.astype(np.float32), dqkv) <= 2e-2


# ---------------------------------------------------------------------------- CUDA graph step

@pytest.mark.parametrize("dtype,accum", [("fp32", 1), ("bf16", 1), ("fp32", 3)])
def test_graph_step_replays_the_eager_step(cp, dtype, accum):
    # DeviceStep captured as a CUDA graph after one eager step, against the
    # same steps run eagerly (capture=False): the same kernels in the same
    # order on the same data, so the same losses, norms and weights.
    from llmpy.step import DeviceStep
    from llmpy.model import GPT
    from llmpy.ops import cuda
    if not cuda.capturable:
        pytest.skip(f"capture needs cuBLASLt: {cuda.matmul_library}")
    from llmpy.optim import AdamW
    cfg = GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(31)
    batches = [[(rng.integers(0, 1000, (4, 64)), rng.integers(0, 1000, (4, 64))) for _ in range(accum)]
               for _ in range(5)]
    results = []
    for capture in (False, True):
        model = GPT(cfg, device="cuda", seed=5, dtype=dtype)
        step = DeviceStep(model, AdamW(model, weight_decay=0.1), 4, 64, grad_clip=1.0, accum=accum,
                          capture=capture)
        out = [step(b, 1e-3 * (i + 1), i + 1) for i, b in enumerate(batches)]
        if capture:
            want = {"first", "update"} | ({"rest"} if accum > 1 else set())
            assert set(step.graphs) == want, "capture failed (see the message above)"
        results.append((out, model.params.flat.get()))
    (eager, w_eager), (graph, w_graph) = results
    if dtype == "fp32":
        assert eager == graph
        assert np.array_equal(w_eager, w_graph)
    else:   # cuDNN's flash-attention backward may sum in a different order each run
        for (le, ne, _), (lg, ng, _) in zip(eager, graph):
            assert abs(le - lg) <= 1e-2 * le and abs(ne - ng) <= 5e-2 * ne
        assert rel_err(w_graph, w_eager) <= 1e-3


def test_cast_and_zero_bf16(cuda, cp):
    import ml_dtypes
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = np.random.default_rng(8).standard_normal(3 * 2**20 + 5).astype(np.float32)
    out = cp.zeros(x.size, dtype=bf16)
    cuda.cast(out, cp.asarray(x))
    np.testing.assert_array_equal(out.get().view(np.uint16), x.astype(bf16).view(np.uint16))
    cuda.zero(out[5:])
    assert not cp.any(out[5:].view(cp.uint16)) and cp.all(out[:5].view(cp.uint16) == cp.asarray(x[:5].astype(bf16).view(np.uint16)))
