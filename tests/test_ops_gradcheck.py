"""Every backward op of llmpy/ops/cpu.py against float64 central finite differences.

For each op we take the scalar loss L = sum(out * R) with a fixed random R, so
dL/dout = R: the backward op is called with dout = R and its gradients are
compared to (L(x + eps) - L(x - eps)) / (2 eps) computed in float64, on every
entry of small tensors or on a random subset of entries of bigger ones.

The ops are written for float32 but only ever allocate what NumPy derives from
their inputs, so they run in float64 when given float64 arrays: the very small
tolerances below (1e-6 relative) could not pass if any op silently computed in
float32. We also check the float32 forward (and backward) outputs against the
float64 computation on the same inputs, and the acc=True / acc=False
convention of the parameter gradients.

Where numba is installed, cpu.py hands the layernorms and sum_of_squares to
compiled loops (ops/cpu_kernels.py): every test here runs twice, once
through them and once through the NumPy code (cpu.compiled = False).
"""
from __future__ import annotations

import numpy as np
import pytest

from llmpy.ops import cpu as ops

F64 = np.float64
EPS = 1e-6            # finite-difference step (float64)
GRAD_RTOL = 1e-6      # relative L2 error, analytic vs numerical gradient
FWD32_RTOL = 1e-5     # relative L2 error, float32 vs float64 computation (DESIGN.md 3)
N_SAMPLED = 50        # entries checked by finite differences on a big tensor


# ---------------------------------------------------------------------------- helpers

def rel_err(a, b):
    """Relative L2 error of a against the reference b."""
    a, b = np.asarray(a, dtype=F64), np.asarray(b, dtype=F64)
    denom = np.linalg.norm(b)
    assert denom > 0, "reference is all zeros: the check would be meaningless"
    return float(np.linalg.norm(a - b) / denom)


def entries(x, rng, n=N_SAMPLED):
    """Flat indices of x to check: all of them if few, else a random subset."""
    if x.size <= n:
        return np.arange(x.size)
    return rng.choice(x.size, size=n, replace=False)


def numerical_grad(loss, x, idx, eps=EPS):
    """Central differences of loss() wrt the flat entries idx of x (perturbed in place)."""
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x)
    g = np.empty(len(idx), dtype=F64)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + eps
        lp = loss()
        flat[i] = old - eps
        lm = loss()
        flat[i] = old
        g[j] = (lp - lm) / (2 * eps)
    return g


def check_grad(name, loss, x, analytic, rng):
    idx = entries(x, rng)
    num = numerical_grad(loss, x, idx)
    err = rel_err(analytic.reshape(-1)[idx], num)
    assert err < GRAD_RTOL, f"{name}: relative error {err:.3g} vs finite differences"
    return err


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """Each test once with cpu.py's compiled kernels (where numba is installed)
    and once with its NumPy code only."""
    from llmpy.ops import cpu_kernels
    if request.param == "compiled" and not cpu_kernels.available:
        pytest.skip("needs numba")
    monkeypatch.setattr(ops, "compiled", request.param == "compiled")
    monkeypatch.setattr(ops, "compiled_min", 0)         # the small test tensors too
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------- op wrappers
# Each returns fresh outputs for the given inputs, in the inputs' dtype.

def run_encoder(ids, wte, wpe):
    B, T = ids.shape
    out = np.empty((B, T, wte.shape[1]), dtype=wte.dtype)
    ops.encoder_forward(out, ids, wte, wpe)
    return out


def run_layernorm(inp, w, b):
    N, C = inp.shape
    out = np.empty_like(inp)
    mean = np.empty(N, dtype=inp.dtype)
    rstd = np.empty(N, dtype=inp.dtype)
    ops.layernorm_forward(out, mean, rstd, inp, w, b)
    return out, mean, rstd


def run_matmul(inp, w, b):
    out = np.empty((inp.shape[0], w.shape[0]), dtype=inp.dtype)
    ops.matmul_forward(out, inp, w, b)
    return out


def run_attention(qkv, n_head):
    B, T, C3 = qkv.shape
    out = np.empty((B, T, C3 // 3), dtype=qkv.dtype)
    att = np.empty((B, n_head, T, T), dtype=qkv.dtype)
    ops.attention_forward(out, att, qkv, n_head)
    return out, att


def run_gelu(inp):
    out = np.empty_like(inp)
    ops.gelu_forward(out, inp)
    return out


def run_crossentropy(logits, targets):
    N = logits.shape[0]
    losses = np.empty(N, dtype=logits.dtype)
    lse = np.empty(N, dtype=logits.dtype)
    ops.crossentropy_forward(losses, lse, logits, targets)
    return losses, lse


# ---------------------------------------------------------------------------- inputs

@pytest.fixture
def enc_inputs(rng):
    B, T, C, V, maxT = 2, 4, 5, 7, 6          # maxT > T: rows T.. of wpe get no gradient
    ids = rng.integers(0, V, size=(B, T))
    ids[1, 2] = ids[0, 0]                     # a token id seen twice (across the batch)
    ids[0, 3] = ids[0, 0]                     # ... and three times (within a row)
    wte = rng.standard_normal((V, C))
    wpe = rng.standard_normal((maxT, C))
    return ids, wte, wpe


@pytest.fixture
def ln_inputs(rng):
    N, C = 6, 8
    inp = rng.standard_normal((N, C)) * 2.0 + 0.5
    w = 1.0 + 0.3 * rng.standard_normal(C)
    b = 0.3 * rng.standard_normal(C)
    return inp, w, b


@pytest.fixture
def mm_inputs(rng):
    N, C, OC = 6, 5, 7
    return rng.standard_normal((N, C)), rng.standard_normal((OC, C)), rng.standard_normal(OC)


@pytest.fixture
def att_inputs(rng):
    B, T, NH, hs = 2, 5, 2, 3
    return rng.standard_normal((B, T, 3 * NH * hs)), NH


@pytest.fixture
def ce_inputs(rng):
    N, V = 11, 13                             # N > 8: crosses the op's row chunking
    logits = rng.standard_normal((N, V)) * 3.0
    targets = rng.integers(0, V, size=N)
    return logits, targets


# ---------------------------------------------------------------------------- gradient checks

def test_encoder_backward_matches_finite_differences(rng, enc_inputs):
    """dwte scatter-adds every occurrence of a token (a repeated id gets all its
    contributions); dwpe sums over the batch and is zero past T."""
    ids, wte, wpe = enc_inputs
    R = rng.standard_normal((*ids.shape, wte.shape[1]))
    loss = lambda: float(np.sum(run_encoder(ids, wte, wpe) * R))  # noqa: E731
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    ops.encoder_backward(dwte, dwpe, R, ids, acc=True)
    assert dwte.dtype == F64 and dwpe.dtype == F64
    # independent reference for the scatter: count-weighted sums, by hand
    ref = np.zeros_like(wte)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            ref[ids[b, t]] += R[b, t]
    np.testing.assert_allclose(dwte, ref, rtol=1e-12, atol=1e-12)
    assert not np.any(dwpe[ids.shape[1]:])
    check_grad("dwte", loss, wte, dwte, rng)
    check_grad("dwpe", loss, wpe, dwpe, rng)


def test_layernorm_backward_matches_finite_differences(rng, ln_inputs):
    """dinp, dweight, dbias of layernorm; dinp is ADDED to a nonzero initial value."""
    inp, w, b = ln_inputs
    R = rng.standard_normal(inp.shape)
    loss = lambda: float(np.sum(run_layernorm(inp, w, b)[0] * R))  # noqa: E731
    _, mean, rstd = run_layernorm(inp, w, b)
    dinp0 = rng.standard_normal(inp.shape)
    dinp = dinp0.copy()
    dw, db = np.empty_like(w), np.empty_like(b)
    scratch = np.empty((2, *inp.shape))
    ops.layernorm_backward(dinp, dw, db, R, inp, w, mean, rstd, scratch, acc=False)
    check_grad("dinp", loss, inp, dinp - dinp0, rng)
    check_grad("dweight", loss, w, dw, rng)
    check_grad("dbias", loss, b, db, rng)


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_backward_matches_finite_differences(rng, mm_inputs, with_bias):
    """dinp, dW and db of out = inp @ W^T + b (and without a bias)."""
    inp, w, b = mm_inputs
    b = b if with_bias else None
    R = rng.standard_normal((inp.shape[0], w.shape[0]))
    loss = lambda: float(np.sum(run_matmul(inp, w, b) * R))  # noqa: E731
    dinp = np.empty_like(inp)
    dw = np.empty_like(w)
    db = np.empty(w.shape[0]) if with_bias else None
    ops.matmul_backward(dinp, dw, db, R, inp, w, acc=False)
    check_grad("dinp", loss, inp, dinp, rng)
    check_grad("dW", loss, w, dw, rng)
    if with_bias:
        check_grad("db", loss, b, db, rng)


def test_attention_backward_matches_finite_differences(rng, att_inputs):
    """dqkv of causal multi-head attention (B=2, T=5, NH=2, hs=3), every entry."""
    qkv, NH = att_inputs
    B, T, C3 = qkv.shape
    R = rng.standard_normal((B, T, C3 // 3))
    loss = lambda: float(np.sum(run_attention(qkv, NH)[0] * R))  # noqa: E731
    _, att = run_attention(qkv, NH)
    dqkv = np.full_like(qkv, np.nan)            # overwritten: garbage must not leak in
    datt = np.full_like(att, np.nan)
    ops.attention_backward(dqkv, R, qkv, att, datt, NH)
    idx = np.arange(qkv.size)
    num = numerical_grad(loss, qkv, idx)
    err = rel_err(dqkv.reshape(-1), num)
    assert err < GRAD_RTOL, f"dqkv: relative error {err:.3g}"


def test_attention_forward_is_causal_softmax(rng, att_inputs):
    """att rows are probabilities over s <= t only, and out = att @ v per head,
    against a direct float64 implementation."""
    qkv, NH = att_inputs
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    out, att = run_attention(qkv, NH)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    ref_out = np.zeros((B, NH, T, hs))
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                s = q[b, h, t] @ k[b, h, :t + 1].T / np.sqrt(hs)
                p = np.exp(s - s.max())
                p /= p.sum()
                np.testing.assert_allclose(att[b, h, t, :t + 1], p, rtol=1e-12)
                assert not np.any(att[b, h, t, t + 1:])
                ref_out[b, h, t] = p @ v[b, h, :t + 1]
    assert rel_err(out, ref_out.transpose(0, 2, 1, 3).reshape(B, T, C)) < 1e-12


@pytest.mark.parametrize("in_place", [False, True])
def test_gelu_backward_matches_finite_differences(rng, in_place):
    """dinp of tanh-GELU, also when dinp is the same array as dout (as model.py calls it)."""
    inp = rng.standard_normal((4, 9)) * 2.0
    R = rng.standard_normal(inp.shape)
    loss = lambda: float(np.sum(run_gelu(inp) * R))  # noqa: E731
    dout = R.copy()
    dinp = dout if in_place else np.empty_like(inp)
    ops.gelu_backward(dinp, inp, dout, np.empty_like(inp))
    check_grad("dinp", loss, inp, dinp, rng)


def test_gelu_forward_matches_tanh_formula(rng):
    """gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in float64."""
    x = rng.standard_normal(200) * 3.0
    ref = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    assert rel_err(run_gelu(x), ref) < 1e-14


def test_crossentropy_forward_matches_log_softmax(rng, ce_inputs):
    """Per-token loss = -log_softmax(logits)[target], against a direct float64 log-softmax."""
    logits, targets = ce_inputs
    losses, lse = run_crossentropy(logits, targets)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ref = -logp[np.arange(len(targets)), targets]
    np.testing.assert_allclose(losses, ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(axis=1)), rtol=1e-13)


def test_crossentropy_backward_matches_finite_differences(rng, ce_inputs):
    """With dloss = 1/N the in-place backward gives d(mean loss)/dlogits."""
    logits, targets = ce_inputs
    N = logits.shape[0]
    loss = lambda: float(run_crossentropy(logits, targets)[0].mean())  # noqa: E731
    _, lse = run_crossentropy(logits, targets)
    dlogits = logits.copy()
    ops.crossentropy_backward(dlogits, lse, targets, 1.0 / N)
    check_grad("dlogits", loss, logits, dlogits, rng)
    # the gradient of each row sums to zero (softmax minus a one-hot)
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)


def test_crossentropy_forward_backward_in_one_pass_matches_finite_differences(rng, ce_inputs):
    """The fused op (one pass: the loss's exponentials reused for the
    gradient) on padded logits: losses as the float64 log-softmax, dlogits as
    finite differences of the mean loss, padded columns zero."""
    logits, targets = ce_inputs
    N, V = logits.shape
    padded = np.concatenate([logits, rng.standard_normal((N, 3))], axis=1)     # 3 columns to ignore
    losses, lse = np.empty(N), np.empty(N)
    ops.crossentropy_forward_backward(losses, lse, padded, targets, 1.0 / N, V=V)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(losses, -logp[np.arange(N), targets], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(axis=1)), rtol=1e-13)
    assert np.all(padded[:, V:] == 0)
    loss = lambda: float(run_crossentropy(logits, targets)[0].mean())  # noqa: E731
    check_grad("dlogits", loss, logits, np.ascontiguousarray(padded[:, :V]), rng)


def test_crossentropy_is_stable_for_large_logits(rng):
    """Logits of magnitude 1e3 (exp overflows without the max shift) give finite,
    correct losses in float32."""
    logits64 = rng.standard_normal((5, 9)) * 1e3
    targets = rng.integers(0, 9, size=5)
    losses, _ = run_crossentropy(logits64.astype(np.float32), targets)
    z = logits64 - logits64.max(axis=1, keepdims=True)
    ref = np.log(np.exp(z).sum(axis=1)) - z[np.arange(5), targets]
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------- acc semantics

def test_matmul_backward_acc_semantics(rng, mm_inputs):
    """acc=False overwrites dW and db whatever they held; acc=True adds to them;
    dinp is overwritten either way."""
    inp, w, b = mm_inputs
    dout = rng.standard_normal((inp.shape[0], w.shape[0]))
    ref_dinp, ref_dw, ref_db = dout @ w, dout.T @ inp, dout.sum(axis=0)
    for acc in (False, True):
        g_w, g_b = rng.standard_normal(w.shape) * 100, rng.standard_normal(b.shape) * 100
        dw, db = g_w.copy(), g_b.copy()
        dinp = np.full_like(inp, 1e6)
        ops.matmul_backward(dinp, dw, db, dout, inp, w, acc=acc)
        base_w, base_b = (g_w, g_b) if acc else (0.0, 0.0)
        np.testing.assert_allclose(dw, base_w + ref_dw, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(db, base_b + ref_db, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(dinp, ref_dinp, rtol=1e-12, atol=1e-12)


def test_matmul_backward_acc_in_float32_adds_block_by_block(rng, monkeypatch):
    """float32 dW accumulation goes through a reused buffer, a block of dW's
    rows at a time (no (OC, C) temporary): the blocks, and a last short one,
    add up to float64's dW + dout^T inp."""
    monkeypatch.setattr(ops, "_ACC_ROWS", 7 * 24)          # 7 rows of C = 24 a block: 29 rows in 5 blocks
    inp, dout = rng.standard_normal((40, 24)), rng.standard_normal((40, 29))
    w, g_w = rng.standard_normal((29, 24)), rng.standard_normal((29, 24))
    dw = g_w.astype(np.float32)
    ops.matmul_backward(None, dw, None, dout.astype(np.float32), inp.astype(np.float32), w.astype(np.float32),
                        acc=True)
    assert dw.dtype == np.float32
    ref = np.float64(g_w.astype(np.float32)) + np.float64(dout.astype(np.float32)).T @ inp.astype(np.float32)
    assert rel_err(dw, ref) < FWD32_RTOL


def test_matmul_backward_without_dinp(rng, mm_inputs):
    """dinp=None (the first layer needs no input gradient) still computes dW and db."""
    inp, w, b = mm_inputs
    dout = rng.standard_normal((inp.shape[0], w.shape[0]))
    dw, db = np.full_like(w, np.nan), np.full_like(b, np.nan)
    ops.matmul_backward(None, dw, db, dout, inp, w, acc=False)
    np.testing.assert_allclose(dw, dout.T @ inp, rtol=1e-12)
    np.testing.assert_allclose(db, dout.sum(axis=0), rtol=1e-12)


def test_layernorm_backward_acc_semantics(rng, ln_inputs):
    """acc=False overwrites dweight and dbias (even NaN garbage); acc=True adds;
    dinp is always added to."""
    inp, w, b = ln_inputs
    _, mean, rstd = run_layernorm(inp, w, b)
    dout = rng.standard_normal(inp.shape)
    scratch = np.empty((2, *inp.shape))
    clean = [np.zeros_like(inp), np.zeros_like(w), np.zeros_like(b)]
    ops.layernorm_backward(*clean, dout, inp, w, mean, rstd, scratch, acc=True)
    assert all(np.any(c) for c in clean)

    dinp0 = rng.standard_normal(inp.shape)
    dinp, dw, db = dinp0.copy(), np.full_like(w, np.nan), np.full_like(b, np.nan)
    ops.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, scratch, acc=False)
    np.testing.assert_allclose(dw, clean[1], rtol=1e-12)
    np.testing.assert_allclose(db, clean[2], rtol=1e-12)
    np.testing.assert_allclose(dinp, dinp0 + clean[0], rtol=1e-12)

    g_w, g_b = rng.standard_normal(w.shape), rng.standard_normal(b.shape)
    dinp, dw, db = dinp0.copy(), g_w.copy(), g_b.copy()
    ops.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, scratch, acc=True)
    np.testing.assert_allclose(dw, g_w + clean[1], rtol=1e-12)
    np.testing.assert_allclose(db, g_b + clean[2], rtol=1e-12)
    np.testing.assert_allclose(dinp, dinp0 + clean[0], rtol=1e-12)


def _encoder_reference(ids, dout, V, maxT):
    dwte = np.zeros((V, dout.shape[-1]))
    np.add.at(dwte, ids.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    dwpe = np.zeros((maxT, dout.shape[-1]))
    dwpe[:ids.shape[1]] = dout.sum(axis=0)
    return dwte, dwpe


def test_encoder_backward_acc_true_adds(rng, enc_inputs):
    """acc=True adds the scatter (dwte) and the batch sum (dwpe) to what the buffers hold."""
    ids, wte, wpe = enc_inputs
    dout = rng.standard_normal((*ids.shape, wte.shape[1]))
    ref_te, ref_pe = _encoder_reference(ids, dout, *wte.shape[:1], wpe.shape[0])
    g_te, g_pe = rng.standard_normal(wte.shape), rng.standard_normal(wpe.shape)
    dwte, dwpe = g_te.copy(), g_pe.copy()
    ops.encoder_backward(dwte, dwpe, dout, ids, acc=True)
    np.testing.assert_allclose(dwte, g_te + ref_te, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dwpe, g_pe + ref_pe, rtol=1e-12, atol=1e-12)


def test_encoder_backward_acc_false_overwrites_dwpe(rng, enc_inputs):
    """acc=False overwrites all of dwpe (rows past T become 0), whatever it held."""
    ids, wte, wpe = enc_inputs
    dout = rng.standard_normal((*ids.shape, wte.shape[1]))
    _, ref_pe = _encoder_reference(ids, dout, wte.shape[0], wpe.shape[0])
    dwte = np.zeros_like(wte)
    dwpe = np.full_like(wpe, np.nan)
    ops.encoder_backward(dwte, dwpe, dout, ids, acc=False)
    np.testing.assert_allclose(dwpe, ref_pe, rtol=1e-12, atol=1e-12)


def test_encoder_backward_acc_false_overwrites_dwte(rng, enc_inputs):
    """Per the documented contract, acc=False overwrites dwte whatever it held."""
    ids, wte, wpe = enc_inputs
    dout = rng.standard_normal((*ids.shape, wte.shape[1]))
    ref_te, _ = _encoder_reference(ids, dout, wte.shape[0], wpe.shape[0])
    dwte = rng.standard_normal(wte.shape) * 100
    dwpe = np.zeros_like(wpe)
    ops.encoder_backward(dwte, dwpe, dout, ids, acc=False)
    np.testing.assert_allclose(dwte, ref_te, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- float32 vs float64

def _f32(*xs):
    return [x.astype(np.float32) for x in xs]


def _up(*xs):
    """float32 inputs upcast exactly to float64: both runs see identical values."""
    return [x.astype(F64) for x in xs]


def test_float32_forward_matches_float64(rng, enc_inputs, ln_inputs, mm_inputs, att_inputs, ce_inputs):
    """Each op's float32 forward is within 1e-5 (relative L2) of the same op in
    float64 on the same (float32-representable) inputs, and float32 in float32 out."""
    checks = {}
    ids, wte, wpe = enc_inputs
    a32 = _f32(wte, wpe)
    checks["encoder"] = (run_encoder(ids, *a32), run_encoder(ids, *_up(*a32)))
    a32 = _f32(*ln_inputs)
    o32, o64 = run_layernorm(*a32), run_layernorm(*_up(*a32))
    checks["layernorm"], checks["layernorm.rstd"] = (o32[0], o64[0]), (o32[2], o64[2])
    a32 = _f32(*mm_inputs)
    checks["matmul"] = (run_matmul(*a32), run_matmul(*_up(*a32)))
    checks["matmul_nobias"] = (run_matmul(*a32[:2], None), run_matmul(*_up(*a32[:2]), None))
    qkv, NH = att_inputs
    (q32,) = _f32(qkv)
    o32, o64 = run_attention(q32, NH), run_attention(*_up(q32), NH)
    checks["attention"], checks["attention.att"] = (o32[0], o64[0]), (o32[1], o64[1])
    (x32,) = _f32(rng.standard_normal((4, 50)) * 3)
    checks["gelu"] = (run_gelu(x32), run_gelu(*_up(x32)))
    logits, targets = ce_inputs
    (l32,) = _f32(logits)
    checks["crossentropy"] = (run_crossentropy(l32, targets)[0], run_crossentropy(*_up(l32), targets)[0])
    for name, (y32, y64) in checks.items():
        assert y32.dtype == np.float32 and y64.dtype == F64, name
        err = rel_err(y32, y64)
        assert err < FWD32_RTOL, f"{name}: float32 forward relative error {err:.3g}"


def test_float32_backward_matches_float64(rng, ln_inputs, mm_inputs, att_inputs, ce_inputs):
    """Each op's float32 backward is within 1e-5 (relative L2) of the float64 backward."""
    results = {}
    for dt in (np.float32, F64):
        r = {}
        inp, w, b = (x.astype(np.float32).astype(dt) for x in ln_inputs)
        dout = np.random.default_rng(7).standard_normal(inp.shape).astype(np.float32).astype(dt)
        _, mean, rstd = run_layernorm(inp, w, b)
        dinp, dw, db = np.zeros_like(inp), np.empty_like(w), np.empty_like(b)
        ops.layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, np.empty((2, *inp.shape), dt), acc=False)
        r.update({"ln.dinp": dinp, "ln.dw": dw, "ln.db": db})

        inp, w, b = (x.astype(np.float32).astype(dt) for x in mm_inputs)
        dout = np.random.default_rng(8).standard_normal((inp.shape[0], w.shape[0])).astype(np.float32).astype(dt)
        dinp, dw, db = np.empty_like(inp), np.empty_like(w), np.empty_like(b)
        ops.matmul_backward(dinp, dw, db, dout, inp, w, acc=False)
        r.update({"mm.dinp": dinp, "mm.dw": dw, "mm.db": db})

        qkv, NH = att_inputs
        qkv = qkv.astype(np.float32).astype(dt)
        _, att = run_attention(qkv, NH)
        dout = np.random.default_rng(9).standard_normal((*qkv.shape[:2], qkv.shape[2] // 3))
        dout = dout.astype(np.float32).astype(dt)
        dqkv = np.empty_like(qkv)
        ops.attention_backward(dqkv, dout, qkv, att, np.empty_like(att), NH)
        r["attention.dqkv"] = dqkv

        x = (np.random.default_rng(10).standard_normal((4, 50)) * 3).astype(np.float32).astype(dt)
        dout = np.random.default_rng(11).standard_normal(x.shape).astype(np.float32).astype(dt)
        dinp = np.empty_like(x)
        ops.gelu_backward(dinp, x, dout, np.empty_like(x))
        r["gelu.dinp"] = dinp

        logits, targets = ce_inputs
        logits = logits.astype(np.float32).astype(dt)
        _, lse = run_crossentropy(logits, targets)
        dl = logits.copy()
        ops.crossentropy_backward(dl, lse, targets, 1.0 / len(targets))
        r["ce.dlogits"] = dl
        results[dt] = r
    for name in results[F64]:
        y32, y64 = results[np.float32][name], results[F64][name]
        assert y32.dtype == np.float32, name
        err = rel_err(y32, y64)
        assert err < FWD32_RTOL, f"{name}: float32 backward relative error {err:.3g}"
