"""The Llama family's NumPy ops (contract.LLAMA_OPS) against float64 central
finite differences, and their forwards against independent references.

As tests/test_ops_gradcheck.py does for GPT-2's ops: the scalar loss is
L = sum(out * R) for a fixed random R, so the backward op is called with
dout = R, and its gradients must match (L(x + eps) - L(x - eps)) / (2 eps)
in float64 within 1e-6 relative (impossible if an op computed in float32).
The forwards are checked against PyTorch (F.silu, scaled_dot_product_attention
on k/v heads repeated as HF's repeat_kv does, HF's own apply_rotary_pos_emb),
and the float32 forwards against float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmpy.ops import cpu as ops
from test_ops_gradcheck import F64, FWD32_RTOL, GRAD_RTOL, check_grad, numerical_grad, rel_err

EPS_RMS = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


# ---------------------------------------------------------------------------- op wrappers (fresh outputs)

def run_rmsnorm(inp, w, eps=EPS_RMS):
    out = np.empty_like(inp)
    rstd = np.empty(inp.shape[0], dtype=inp.dtype)
    ops.rmsnorm_forward(out, rstd, inp, w, eps)
    return out, rstd


def run_rope(x, cos, sin):
    out = np.empty_like(x)
    ops.rope_forward(out, x, cos, sin)
    return out


def run_swiglu(inp):
    out = np.empty((inp.shape[0], inp.shape[1] // 2), dtype=inp.dtype)
    ops.swiglu_forward(out, inp)
    return out


def run_gqa(qkv, NH, NKV):
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    out = np.empty((B, T, NH * hs), dtype=qkv.dtype)
    att = np.empty((B, NH, T, T), dtype=qkv.dtype)
    ops.gqa_attention_forward(out, att, qkv, NH, NKV)
    return out, att


def angles(T, hs, rng):
    """cos, sin (T, hs/2) of arbitrary angles: the ops take any table."""
    theta = rng.uniform(-4, 4, size=(T, hs // 2))
    return np.cos(theta), np.sin(theta)


# ---------------------------------------------------------------------------- embedding

def test_embedding_backward_scatters_and_accumulates(rng):
    V, C = 7, 5
    ids = rng.integers(0, V, size=(2, 4))
    ids[1, 2] = ids[0, 0] = ids[0, 3]                # one id three times
    wte = rng.standard_normal((V, C))
    out = np.empty((2, 4, C))
    ops.embedding_forward(out, ids, wte)
    np.testing.assert_array_equal(out, wte[ids])
    R = rng.standard_normal(out.shape)
    loss = lambda: float(np.sum(wte[ids] * R))  # noqa: E731  (the forward's math, written independently)
    dwte = np.full_like(wte, np.nan)
    ops.embedding_backward(dwte, R, ids, acc=False)
    check_grad("dwte", loss, wte, dwte, rng)
    before = dwte.copy()
    ops.embedding_backward(dwte, R, ids, acc=True)
    np.testing.assert_allclose(dwte, 2 * before, rtol=1e-12)


# ---------------------------------------------------------------------------- rmsnorm

def test_rmsnorm_forward_is_the_formula(rng):
    x = rng.standard_normal((6, 8)) * 3
    w = 1 + 0.3 * rng.standard_normal(8)
    out, rstd = run_rmsnorm(x, w, eps=1e-6)
    want = x / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + 1e-6) * w
    assert rel_err(out, want) < 1e-14
    np.testing.assert_allclose(rstd, 1 / np.sqrt((x ** 2).mean(axis=1) + 1e-6), rtol=1e-14)
    # eps is the config's: a large one visibly changes the result
    assert rel_err(run_rmsnorm(x, w, eps=1.0)[0], want) > 1e-2


def test_residual_rmsnorm_forward_fuses_the_add(rng):
    a, b = rng.standard_normal((2, 5, 8))
    w = 1 + 0.3 * rng.standard_normal(8)
    res, out, rstd = np.empty_like(a), np.empty_like(a), np.empty(5)
    ops.residual_rmsnorm_forward(res, out, rstd, a, b, w, EPS_RMS)
    np.testing.assert_array_equal(res, a + b)
    np.testing.assert_allclose(out, run_rmsnorm(a + b, w)[0], rtol=1e-14)


def test_rmsnorm_backward_matches_finite_differences(rng):
    """dinp (ADDED to a nonzero initial value) and dweight; acc semantics of dweight."""
    x = rng.standard_normal((6, 8)) * 2 + 0.5
    w = 1 + 0.3 * rng.standard_normal(8)
    R = rng.standard_normal(x.shape)
    loss = lambda: float(np.sum(run_rmsnorm(x, w)[0] * R))  # noqa: E731
    _, rstd = run_rmsnorm(x, w)
    dinp0 = rng.standard_normal(x.shape)
    dinp = dinp0.copy()
    dw = np.full_like(w, np.nan)
    scratch = np.empty((2, *x.shape))
    ops.rmsnorm_backward(dinp, dw, R, x, w, rstd, scratch, acc=False)
    check_grad("dinp", loss, x, dinp - dinp0, rng)
    check_grad("dweight", loss, w, dw, rng)
    dw_once = dw.copy()
    ops.rmsnorm_backward(dinp, dw, R, x, w, rstd, scratch, acc=True)
    np.testing.assert_allclose(dw, 2 * dw_once, rtol=1e-12)


# ---------------------------------------------------------------------------- rope

def test_rope_forward_is_hf_apply_rotary_pos_emb(rng):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    B, T, H, hs = 2, 5, 3, 8
    q, k = rng.standard_normal((2, B, T, H, hs))
    cos, sin = angles(T, hs, rng)
    # HF: (B, H, T, hs) heads, cos/sin (B, T, hs) with the half-table repeated
    cos_hf = torch.tensor(np.concatenate([cos, cos], axis=-1))[None].expand(B, T, hs)
    sin_hf = torch.tensor(np.concatenate([sin, sin], axis=-1))[None].expand(B, T, hs)
    qt, kt = (torch.tensor(a).transpose(1, 2) for a in (q, k))
    q_hf, k_hf = apply_rotary_pos_emb(qt, kt, cos_hf, sin_hf)
    assert rel_err(run_rope(q, cos, sin), q_hf.transpose(1, 2).numpy()) < 1e-14
    assert rel_err(run_rope(k, cos, sin), k_hf.transpose(1, 2).numpy()) < 1e-14


def test_rope_in_place_on_the_heads_of_qkv(rng):
    # the model rotates the q and k heads of the fused qkv in place: a strided view
    B, T, NH, NKV, hs = 2, 4, 4, 2, 6
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs))
    cos, sin = angles(T, hs, rng)
    heads = qkv.reshape(B, T, NH + 2 * NKV, hs)[:, :, :NH + NKV]
    want = run_rope(np.ascontiguousarray(heads), cos, sin)
    v_before = qkv[..., (NH + NKV) * hs:].copy()
    ops.rope_forward(heads, heads, cos, sin)
    np.testing.assert_allclose(heads, want, rtol=1e-14)
    np.testing.assert_array_equal(qkv[..., (NH + NKV) * hs:], v_before)


@pytest.mark.parametrize("in_place", [False, True])
def test_rope_backward_matches_finite_differences(rng, in_place):
    B, T, H, hs = 2, 3, 2, 6
    x = rng.standard_normal((B, T, H, hs))
    cos, sin = angles(T, hs, rng)
    R = rng.standard_normal(x.shape)
    loss = lambda: float(np.sum(run_rope(x, cos, sin) * R))  # noqa: E731
    dout = R.copy()
    dinp = dout if in_place else np.full_like(x, np.nan)
    ops.rope_backward(dinp, dout, cos, sin)
    num = numerical_grad(loss, x, np.arange(x.size))
    assert rel_err(dinp.reshape(-1), num) < GRAD_RTOL


# ---------------------------------------------------------------------------- swiglu

def test_swiglu_forward_is_silu_gate_times_up(rng):
    inp = rng.standard_normal((5, 12)) * 4
    inp[0, 0], inp[0, 1] = 800.0, -800.0                 # no overflow at the sigmoid's ends
    gate, up = torch.tensor(inp[:, :6]), torch.tensor(inp[:, 6:])
    with np.errstate(all="raise"):
        out = run_swiglu(inp)
    assert rel_err(out, (F.silu(gate) * up).numpy()) < 1e-14


def test_swiglu_backward_matches_finite_differences(rng):
    inp = rng.standard_normal((5, 12)) * 2
    R = rng.standard_normal((5, 6))
    loss = lambda: float(np.sum(run_swiglu(inp) * R))  # noqa: E731
    dinp = np.full_like(inp, np.nan)
    ops.swiglu_backward(dinp, R, inp)
    num = numerical_grad(loss, inp, np.arange(inp.size))
    assert rel_err(dinp.reshape(-1), num) < GRAD_RTOL


# ---------------------------------------------------------------------------- grouped-query attention

GQA_SHAPES = [(4, 4), (4, 2), (4, 1), (6, 3)]           # (NH, NKV): MHA, GQA, MQA, G = 2


@pytest.mark.parametrize("NH,NKV", GQA_SHAPES)
def test_gqa_attention_forward_is_sdpa_on_repeated_kv(rng, NH, NKV):
    B, T, hs = 2, 5, 3
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs))
    out, att = run_gqa(qkv, NH, NKV)
    q = torch.tensor(qkv[..., :NH * hs]).reshape(B, T, NH, hs).transpose(1, 2)
    k = torch.tensor(qkv[..., NH * hs:(NH + NKV) * hs]).reshape(B, T, NKV, hs).transpose(1, 2)
    v = torch.tensor(qkv[..., (NH + NKV) * hs:]).reshape(B, T, NKV, hs).transpose(1, 2)
    k, v = (x.repeat_interleave(NH // NKV, dim=1) for x in (k, v))       # HF's repeat_kv
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, NH * hs)
    assert rel_err(out, want.numpy()) < 1e-13
    assert np.all(att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-13)


@pytest.mark.parametrize("NH,NKV", GQA_SHAPES)
def test_gqa_attention_backward_matches_finite_differences(rng, NH, NKV):
    """dqkv, every entry (the k/v heads' gradients summed over their query heads)."""
    B, T, hs = 2, 4, 3
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs))
    R = rng.standard_normal((B, T, NH * hs))
    loss = lambda: float(np.sum(run_gqa(qkv, NH, NKV)[0] * R))  # noqa: E731
    _, att = run_gqa(qkv, NH, NKV)
    dqkv = np.full_like(qkv, np.nan)
    datt = np.full_like(att, np.nan)
    ops.gqa_attention_backward(dqkv, R, qkv, att, datt, NH, NKV)
    num = numerical_grad(loss, qkv, np.arange(qkv.size))
    assert rel_err(dqkv.reshape(-1), num) < GRAD_RTOL


# ---------------------------------------------------------------------------- float32 vs float64

def test_float32_forward_and_backward_match_float64(rng):
    """Each op in float32 is within 1e-5 (relative L2) of the same op in float64 on the same inputs."""
    def both(make):
        r32, r64 = make(np.float32), make(F64)
        for a, b in zip(r32, r64):
            assert a.dtype == np.float32 and b.dtype == F64
            assert rel_err(a, b) < FWD32_RTOL
    x = rng.standard_normal((6, 16)).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(16)).astype(np.float32)
    R = rng.standard_normal((6, 16)).astype(np.float32)

    def rms(dt):
        out, rstd = run_rmsnorm(x.astype(dt), w.astype(dt))
        dinp, dw = np.zeros((6, 16), dt), np.empty(16, dt)
        ops.rmsnorm_backward(dinp, dw, R.astype(dt), x.astype(dt), w.astype(dt), rstd, np.empty((2, 6, 16), dt),
                             acc=False)
        return out, dinp, dw
    both(rms)
    gu = (rng.standard_normal((6, 16)) * 3).astype(np.float32)

    def swi(dt):
        d = np.empty((6, 16), dt)
        ops.swiglu_backward(d, R[:, :8].astype(dt), gu.astype(dt))
        return run_swiglu(gu.astype(dt)), d
    both(swi)
    NH, NKV, hs, T = 4, 2, 4, 5
    qkv = rng.standard_normal((2, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    Ry = rng.standard_normal((2, T, NH * hs)).astype(np.float32)
    cos, sin = angles(T, hs, rng)

    def att(dt):
        out, a = run_gqa(qkv.astype(dt), NH, NKV)
        d = np.empty((2, T, (NH + 2 * NKV) * hs), dt)
        ops.gqa_attention_backward(d, Ry.astype(dt), qkv.astype(dt), a, np.empty_like(a), NH, NKV)
        x = qkv.astype(dt).reshape(2, T, -1, hs)
        return out, d, run_rope(x, cos.astype(np.float32), sin.astype(np.float32))
    both(att)
