"""NumPy kernels: forward and backward of every GPT-2 layer (the fp32 reference).

The op contract (llmpy/ops/contract.py: every op's signature and math, the
conventions; ARCHITECTURE.md) written with NumPy. In brief:
- out-parameter style, as in llm.c: every function writes into arrays it is
  given and allocates nothing large, so a training step reuses the same memory;
- parameter gradients (dweight, dbias, dwte, ...) are overwritten when
  `acc=False` and added to when `acc=True` (gradient accumulation);
- activation gradients are overwritten (`dinp = ...`), except layernorm's,
  which adds into the residual stream's gradient (`dinp += ...`), because the
  residual connection sends the same gradient down two paths that meet there.

Shapes: B batch, T time, C channels, NH heads, hs = C // NH, V vocabulary,
N = B * T rows. Row-major, activations as (N, C) where that is simpler.

Where numba is installed, the layernorms, GELU, the classifier, attention's
softmax and sum_of_squares hand C-contiguous float32 arrays to compiled
loops (ops/cpu_kernels.py: the same math in fewer passes); the NumPy code
here is the reference, and `compiled = False` makes every op use it.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import contract, shared
from .cpu_parallel import for_row_blocks as _for_row_blocks   # (private: public names here are the contract's ops)
from .cpu_parallel import for_gemm_blocks as _for_gemm_blocks
from .cpu_parallel import work_buffer as _work_buffer
from .contract import GELU_A, GELU_S, LN_EPS  # noqa: F401  (GPT-2's constants, shared with the kernels)

name = "cpu"
xp = np                     # the array module of this backend
ln_scratch_rows_per_chunk = 1   # layernorm_backward sums dweight, dbias over (2, N, C) products
needs_gelu_scratch = True       # matmul_backward's GELU derivative goes through gelu_scratch


def storage_dtype(dtype: str):
    """The array dtype for a model of precision `dtype`: only float32 here."""
    if dtype != "fp32":
        from ..errors import LlmpyError
        raise LlmpyError(f"--dtype {dtype!r}: the NumPy fp32 backend computes in fp32 "
                         "(bf16 on the CPU is ops.cpu_bf16: get_backend('cpu', 'bf16'))")
    return np.float32


def params_dtype(dtype: str):
    """The weights the ops read: the same dtype as everything else."""
    return storage_dtype(dtype)


def cast(dst, src):
    """dst[...] = src, rounding to dst's dtype."""
    dst[...] = src


def zero(x):
    """x[...] = 0."""
    x[...] = 0


def to_host(x) -> np.ndarray:
    """x as a NumPy array (here it already is one)."""
    return np.asarray(x)


def synchronize():
    """Nothing to wait for: a NumPy op has finished when it returns."""


# ----------------------------------------------------------------------------
# compiled loops: where numba is installed, the ops below that have one in
# ops/cpu_kernels.py hand it their arrays (the same math in fewer passes);
# the NumPy code after that hand-off is the reference.

# False: always the NumPy code (the tests check both against finite differences);
# LLMPY_CPU_KERNELS=0 in the environment starts a process with it off
compiled = os.environ.get("LLMPY_CPU_KERNELS", "1") != "0"
compiled_min = 1 << 14      # floats in the first array below which the NumPy code runs (tests: 0)
_kernels_module = None


def _kernels(*arrays, float64=False):
    """ops/cpu_kernels.py if it may run on these arrays (numba installed,
    `compiled` on, all C-contiguous float32, or float64 too where the loop
    is written for either, and at least compiled_min floats), else None.
    (Below compiled_min a compiled call gains next to nothing, and the first
    one costs numba's import and cache load, ~0.6 s: `llmpy sample`, a
    token at a time, starts without them.)"""
    global _kernels_module
    if not compiled or arrays[0].size < compiled_min:
        return None
    if _kernels_module is None:
        from . import cpu_kernels              # (imports numba, ~0.3 s: on first use only)
        _kernels_module = cpu_kernels if cpu_kernels.available else False
    if _kernels_module is False:
        return None
    dt = arrays[0].dtype
    if dt != np.float32 and not (float64 and dt == np.float64):
        return None
    if not all(a.dtype == dt and a.flags.c_contiguous for a in arrays):
        return None
    return _kernels_module


# ----------------------------------------------------------------------------
# encoder: out[b, t] = wte[ids[b, t]] + wpe[t]

def encoder_forward(out, ids, wte, wpe):
    # out (B, T, C), ids (B, T) int, wte (Vp, C), wpe (maxT, C)
    T = ids.shape[1]
    np.take(wte, ids, axis=0, out=out)
    out += wpe[:T]


def encoder_backward(dwte, dwpe, dout, ids, acc=True, sorted_order=None):
    # wte rows were gathered, so their gradient scatters back (a token seen twice
    # gets both contributions); wpe[t] was broadcast over the batch, so it sums.
    # (sorted_order: the GPU kernel's precomputed sort of ids; unused here.)
    B, T, C = dout.shape
    if not acc:
        dwte[...] = 0
    np.add.at(dwte, ids.reshape(-1), dout.reshape(-1, C))
    if acc:
        dwpe[:T] += dout.sum(axis=0)
    else:
        np.sum(dout, axis=0, out=dwpe[:T])
        dwpe[T:] = 0


# ----------------------------------------------------------------------------
# layernorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)

# The three layernorm ops below are the reference; where they may, they run
# as one compiled pass per row instead of NumPy's 7 to 15 passes over (N, C).

def layernorm_forward(out, mean, rstd, inp, weight, bias):
    # out, inp (N, C); mean, rstd (N,); weight, bias (C,)
    C = inp.shape[-1]
    if k := _kernels(out, mean, rstd, inp, weight, bias, float64=True):
        return k.layernorm_forward(out.reshape(-1, C), mean, rstd, inp.reshape(-1, C), weight, bias, LN_EPS)
    np.mean(inp, axis=-1, out=mean)
    np.subtract(inp, mean[:, None], out=out)            # out holds x - mean
    var = np.einsum("ij,ij->i", out, out) / C
    np.sqrt(var + LN_EPS, out=rstd)
    np.reciprocal(rstd, out=rstd)
    out *= rstd[:, None]
    out *= weight
    out += bias


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias):
    # The residual add fused with the layernorm after it (one kernel on the
    # GPU): res = a + b (res may be a), out = layernorm(res).
    if k := _kernels(res, out, mean, rstd, a, b, weight, bias, float64=True):
        C = a.shape[-1]
        rows = [x.reshape(-1, C) for x in (res, out)]
        return k.residual_layernorm_forward(*rows, mean, rstd, a.reshape(-1, C), b.reshape(-1, C), weight, bias,
                                            LN_EPS)
    np.add(a, b, out=res)
    layernorm_forward(out, mean, rstd, res, weight, bias)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True):
    # With xhat = (x - mean) * rstd and g = dout * w (the gradient wrt xhat):
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    # (mean and rstd depend on every x of the row: the two subtracted terms).
    # dinp is ADDED to (the residual stream's gradient); scratch is (2, N, C).
    C = inp.shape[-1]
    if k := _kernels(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, float64=True):
        rows = [x.reshape(-1, C) for x in (dinp, dout, inp)]
        return k.layernorm_backward(rows[0], dweight, dbias, rows[1], rows[2], weight, mean, rstd,
                                    scratch.reshape(2, -1, C), acc)
    xhat, g = scratch[0], scratch[1]
    np.subtract(inp, mean[:, None], out=xhat)
    xhat *= rstd[:, None]
    if acc:
        dbias += dout.sum(axis=0)
        dweight += np.einsum("ij,ij->j", dout, xhat)
    else:
        np.sum(dout, axis=0, out=dbias)
        dweight[...] = np.einsum("ij,ij->j", dout, xhat)
    np.multiply(dout, weight, out=g)
    g_mean = g.mean(axis=-1)
    gx_mean = np.einsum("ij,ij->i", g, xhat) / C
    g -= g_mean[:, None]
    xhat *= gx_mean[:, None]
    g -= xhat
    g *= rstd[:, None]
    dinp += g


# ----------------------------------------------------------------------------
# matmul: out = inp @ W^T + b, W stored (OC, C) as in llm.c (HF stores W^T)

# Optional fusion with the GELU that follows GPT-2's fc layer (on the GPU it
# runs in the matmul's epilogue, saving passes over the (N, 4C) activations;
# here it is simply the two ops in turn):
#   forward  gelu_out given:  out = inp @ W^T + b,  gelu_out = gelu(out)
#   backward gelu_inp given:  dinp = (dout @ W) * gelu'(gelu_inp), the
#            gradient wrt the GELU's input; gelu_scratch has dinp's shape.

def matmul_forward(out, inp, weight, bias, gelu_out=None):
    # out (N, OC), inp (N, C), weight (OC, C), bias (OC,) or None
    _gemm(out, inp, weight.T)
    if bias is not None:
        out += bias
    if gelu_out is not None:
        gelu_forward(gelu_out, out)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, acc=True, gelu_inp=None, gelu_scratch=None):
    # dinp = dout @ W (N, C);  dW = dout^T @ inp (OC, C);  db = sum_n dout (OC,)
    if dinp is not None:
        _gemm(dinp, dout, weight)
        if gelu_inp is not None:
            gelu_backward(dinp, gelu_inp, dinp, gelu_scratch)
    _gemm(dweight, dout.T, inp, acc)
    if dbias is not None:
        if acc:
            dbias += dout.sum(axis=0)
        else:
            np.sum(dout, axis=0, out=dbias)


# The 2-D products go to one of two BLAS libraries. NumPy's (OpenBLAS in
# the pip wheel) splits a product over its own threads. Intel MKL's sgemm
# (the optional `mkl` wheel, ops/mkl.py) runs sequential, one block of the
# output per thread of our pool. On an Intel Xeon MKL's kernels were the
# faster on every large product of a d12 step, 256-row ones included
# (362-422 GFLOP/s against OpenBLAS's 318-395 on 2 cores; level on the
# 768x768 ones: bench/RESULTS.md, 2026-12-03). MKL can also add into its
# output (BLAS's beta = 1), which gradient accumulation wants. On an AMD
# EPYC (Zen 3, AVX2) MKL's blocks were slower than OpenBLAS on every product
# but one, each library in a process of its own (a d12 step's products
# 1276 ms against 1049: bench/RESULTS.md, 2026-12-08), so "auto" takes it on
# Intel only. LLMPY_CPU_BLAS=mkl or numpy in the environment forces a choice.
blas = os.environ.get("LLMPY_CPU_BLAS", "auto")       # "auto", "mkl" or "numpy"
_mkl = None             # ops/mkl.py once chosen, False for NumPy's matmul


def _mkl_module():
    """ops/mkl.py if the float32 GEMMs go to MKL (see `blas`), else None."""
    global _mkl
    if _mkl is None:
        if blas not in ("auto", "mkl", "numpy"):
            from ..errors import LlmpyError
            raise LlmpyError(f"LLMPY_CPU_BLAS={blas!r}: the choices are auto (MKL on Intel CPUs where it is "
                             "installed), mkl and numpy")
        _mkl = False
        from . import mkl
        if blas == "mkl" or (blas == "auto" and mkl.intel_cpu()):
            from ..errors import LlmpyError
            try:
                mkl.library()
                _mkl = mkl
            except LlmpyError:
                if blas == "mkl":
                    raise LlmpyError(f"LLMPY_CPU_BLAS=mkl, and Intel MKL's libmkl_rt was not found; "
                                     f"{mkl.INSTALL_HINT}, or unset LLMPY_CPU_BLAS") from None
    return _mkl or None


def _gemm(out, a, b, acc=False):
    """out = a @ b, or out += a @ b where acc: 2-D views, float32 through
    MKL where it is the BLAS (one block of out per thread:
    cpu_parallel.for_gemm_blocks), else NumPy."""
    lib = _mkl_module()
    if lib is None or out.dtype != np.float32 or a.dtype != np.float32 or b.dtype != np.float32:
        if acc:
            _matmul_accumulate(out, a, b)
        else:
            np.matmul(a, b, out=out)
        return
    beta = 1.0 if acc else 0.0
    _for_gemm_blocks(lambda rows, cols: lib.matmul(out[rows, cols], a[rows], b[:, cols], beta),
                     *out.shape, a.shape[1])


_ACC_ROWS = 1 << 20     # floats of dweight a block: 4 MB, still in cache when it is added


def _matmul_accumulate(dweight, a, b):
    # dweight += a @ b in blocks of dweight's rows through a reused buffer.
    # NumPy's matmul cannot add into its output (BLAS's beta = 1), and
    # `dweight += a @ b` allocates an (OC, C) temporary on every call: 154 MB
    # for the LM head, page-faulted in again on every micro-step of gradient
    # accumulation, then read back from memory to be added.
    OC, C = dweight.shape
    if dweight.dtype != np.float32:        # (the work buffers are float32; float64 only in the tests)
        dweight += a @ b
        return
    rows = max(1, _ACC_ROWS // C)
    for lo in range(0, OC, rows):
        hi = min(lo + rows, OC)
        part = np.matmul(a[lo:hi], b, out=_work_buffer((hi - lo, C), 2))
        dweight[lo:hi] += part


# ----------------------------------------------------------------------------
# attention: causal multi-head self-attention from the fused qkv projection

def attention_saved(B, NH, T, hs, dtype, n_kv_head=None):
    """Shape and dtype of what attention_forward keeps (`att`: the softmax
    probabilities, whatever the key/value heads; no flash attention here) and
    the shape of the backward's scratch `datt` (see contract.attention_saved)."""
    return contract.attention_saved(B, NH, T, hs, dtype, flash=False)


# Grouped-query causal attention from the fused qkv (B, T, (NH + 2 NKV) hs)
# (Llama 3; GPT-2's multi-head attention is the case NKV = NH, G = 1).
# Query head h = j G + g (G = NH / NKV) uses key/value head j, as HF's
# repeat_kv does; the query heads are viewed as (NKV, G) so that one matmul
# broadcasts each k/v head over its group without copying it.

def _gqa_heads(x, n_head, n_kv_head):
    """(B, T, (NH + 2 NKV) hs) -> q (B, NKV, G, T, hs), k and v (B, NKV, 1, T, hs): views."""
    B, T, _ = x.shape
    q, k, v = shared.gqa_heads(x, B, T, n_head, n_kv_head)
    # splitting the head axis NH = NKV x G of a view is a view too
    return q.reshape(B, n_kv_head, n_head // n_kv_head, T, q.shape[-1]), k[:, :, None], v[:, :, None]


def gqa_attention_forward(out, att, qkv, n_head, n_kv_head):
    # out (B, T, NH hs); att (B, NH, T, T) keeps the softmax probabilities for
    # the backward pass; qkv (B, T, (NH + 2 NKV) hs).
    #   att = softmax(q k^T / sqrt(hs) + causal mask),  out = att v
    B, T, _ = qkv.shape
    q, k, v = _gqa_heads(qkv, n_head, n_kv_head)
    NKV, G, hs = q.shape[1], q.shape[2], q.shape[-1]
    a_all = att.reshape(B, NKV, G, T, T)                 # a view: att is contiguous
    y = out.reshape(B, T, NKV, G, hs).transpose(0, 2, 3, 1, 4)
    scale, masked = 1.0 / math.sqrt(hs), shared.upper_triangle(np, T)
    kernels = _kernels(att)          # the softmax in one compiled call a sequence

    def sequences(lo, hi):
        # sequences lo:hi, every head: both products and the softmax's five
        # passes while their (NH, T, T) probabilities are in cache
        a = a_all[lo:hi]
        np.matmul(q[lo:hi], k[lo:hi].swapaxes(-1, -2), out=a)
        if kernels:
            for b in range(lo, hi):
                kernels.softmax_causal(att[b], scale)
        else:
            a *= scale
            np.copyto(a, -np.inf, where=masked)                 # token t sees only s <= t
            a -= a.max(axis=-1, keepdims=True)
            np.exp(a, out=a)
            a /= a.sum(axis=-1, keepdims=True)
        np.matmul(a, v[lo:hi], out=y[lo:hi])

    # one sequence a block, on the threads, each product on one BLAS thread
    # (many small products: see cpu_parallel)
    _for_row_blocks(sequences, B, n_head * T * T, block=1, blas_inside=True)


def gqa_attention_backward(dqkv, dout, qkv, att, datt, n_head, n_kv_head, out=None):
    # dqkv (B, T, (NH + 2 NKV) hs) overwritten; dout (B, T, NH hs); att from
    # the forward pass; datt scratch of att's shape; out unused here.
    # Per query head:
    #   dv = att^T dy,  datt = dy v^T,
    #   softmax: dpre = att * (datt - sum_s(datt * att))   (row-wise)
    #   pre = q k^T * scale:  dq = dpre k * scale,  dk = dpre^T q * scale
    # Masked entries have att = 0, so their dpre is 0: the mask needs no care.
    # A k/v head was read by its G query heads, so its dk, dv are the sums of theirs.
    B, T, _ = qkv.shape
    q, k, v = _gqa_heads(qkv, n_head, n_kv_head)
    dq, dk, dv = _gqa_heads(dqkv, n_head, n_kv_head)
    NKV, G, hs = q.shape[1], q.shape[2], q.shape[-1]
    a_all, da_all = att.reshape(B, NKV, G, T, T), datt.reshape(B, NKV, G, T, T)
    dy = dout.reshape(B, T, NKV, G, hs).transpose(0, 2, 3, 1, 4)
    scale = 1.0 / math.sqrt(hs)
    kernels = _kernels(att, datt)

    def group_sum(product, out):
        # out (b, NKV, 1, T, hs) = the G query heads' products summed (G = 1: written in place)
        if G == 1:
            product(out)
        else:
            np.sum(product(None), axis=2, keepdims=True, out=out)

    def sequences(lo, hi):
        # sequences lo:hi, every head, as in gqa_attention_forward
        a, d = a_all[lo:hi], da_all[lo:hi]
        group_sum(lambda o: np.matmul(a.swapaxes(-1, -2), dy[lo:hi], out=o), dv[lo:hi])
        np.matmul(dy[lo:hi], v[lo:hi].swapaxes(-1, -2), out=d)
        if kernels:
            for b in range(lo, hi):
                kernels.softmax_causal_backward(datt[b], att[b], scale)
        else:
            rowdot = np.einsum("bkgts,bkgts->bkgt", d, a)
            d -= rowdot[..., None]
            d *= a
            d *= scale
        np.matmul(d, k[lo:hi], out=dq[lo:hi])
        group_sum(lambda o: np.matmul(d.swapaxes(-1, -2), q[lo:hi], out=o), dk[lo:hi])

    _for_row_blocks(sequences, B, n_head * T * T, block=1, blas_inside=True)


def attention_forward(out, att, qkv, n_head):
    # out (B, T, C); att (B, NH, T, T) keeps the softmax probabilities for the
    # backward pass; qkv (B, T, 3C). GPT-2's attention is grouped-query
    # attention with one query head per key/value head (above).
    gqa_attention_forward(out, att, qkv, n_head, n_head)


def attention_backward(dqkv, dout, qkv, att, datt, n_head, out=None):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); att from the forward pass;
    # datt scratch of att's shape; out (the forward's output) is not needed.
    gqa_attention_backward(dqkv, dout, qkv, att, datt, n_head, n_head)


# ----------------------------------------------------------------------------
# gelu, tanh form: y = 0.5 x (1 + tanh(u)),  u = s (x + a x^3),  s = sqrt(2/pi)

def gelu_forward(out, inp):
    if k := _kernels(out, inp):
        return k.gelu_forward(out.reshape(-1), inp.reshape(-1))     # one pass, on every core
    u = np.multiply(inp, inp, out=out)
    u *= GELU_A
    u += 1.0
    u *= inp
    u *= GELU_S                                         # u = s (x + a x^3)
    np.tanh(u, out=u)
    u += 1.0
    u *= inp
    u *= 0.5


def _for_elementwise_blocks(fn, *arrays):
    # fn(*blocks) on matching row blocks of same-shape arrays; C-contiguous
    # arrays are cut into rows of their last axis (views: writes land in place)
    if not all(a.flags.c_contiguous for a in arrays) or arrays[0].ndim == 0:
        return fn(*arrays)
    rows = [a.reshape(-1, a.shape[-1]) for a in arrays]
    _for_row_blocks(lambda lo, hi: fn(*(r[lo:hi] for r in rows)), rows[0].shape[0], rows[0].shape[1])


def gelu_backward(dinp, inp, dout, scratch):
    # dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 a x^2)
    # dinp may be the same array as dout; scratch has inp's shape.
    if k := _kernels(dinp, inp, dout):
        return k.gelu_backward(dinp.reshape(-1), inp.reshape(-1), dout.reshape(-1))
    _for_elementwise_blocks(_gelu_backward_rows, dinp, inp, dout, scratch)


def _gelu_backward_rows(dinp, inp, dout, scratch):
    # every pass in place, its two temporaries this thread's work buffers
    # (cpu_parallel.work_buffer: no fresh allocation per block, see there)
    t = np.multiply(inp, inp, out=scratch)               # x^2
    du = np.multiply(t, 3.0 * GELU_A, out=_work_buffer(t.shape, 0))
    du += 1.0
    du *= GELU_S                                         # du/dx = s (1 + 3 a x^2)
    t *= GELU_A
    t += 1.0
    t *= inp
    t *= GELU_S
    np.tanh(t, out=t)                                    # tanh u
    sech2 = np.multiply(t, t, out=_work_buffer(t.shape, 1))
    np.subtract(1.0, sech2, out=sech2)                   # 1 - tanh^2 u
    du *= sech2
    du *= inp
    t += 1.0
    du += t
    du *= 0.5
    np.multiply(dout, du, out=dinp)


# ----------------------------------------------------------------------------
# residual: out = a + b (its backward passes the gradient to both unchanged)

def residual_forward(out, a, b):
    np.add(a, b, out=out)


# ----------------------------------------------------------------------------
# fused classifier: softmax + cross-entropy, and its gradient written in place
#   loss_n = logsumexp(logits_n) - logits_n[y_n]
#   dloss_n / dlogits_n = softmax(logits_n) - onehot(y_n)

_ROWS = 8   # rows per chunk: 8 x 50257 floats stay in L2 while we exp them


# The logits may be padded: (N, Vp) with only the first V columns real (the
# model pads the vocabulary to a multiple of 128 for the GPU's matmuls). The
# forward ignores the padding; the backward writes 0 there.

def crossentropy_forward(losses, lse, logits, targets, V=None):
    # losses, lse (N,); logits (N, Vp), V <= Vp real columns (default: all); targets (N,) int
    N = logits.shape[0]
    if k := _kernels(logits, losses, lse):
        return k.crossentropy_forward(losses, lse, logits, V or logits.shape[1], targets)   # 2 passes a row
    logits = logits[:, :V]

    def logsumexp(lo, hi):
        buf = np.empty((_ROWS, logits.shape[1]), logits.dtype)    # reused: no 1.6 MB allocation per chunk
        for i in range(lo, hi, _ROWS):
            rows = logits[i:min(i + _ROWS, hi)]
            e = buf[:len(rows)]
            m = rows.max(axis=1)
            np.subtract(rows, m[:, None], out=e)
            np.exp(e, out=e)
            lse[i:i + len(rows)] = m + np.log(e.sum(axis=1))

    _for_row_blocks(logsumexp, N, logits.shape[1], block=_ROWS * logits.shape[1])
    losses[:] = lse - logits[np.arange(N), targets]


def crossentropy_forward_backward(losses, lse, logits, targets, dloss, V=None):
    # Both in one pass over the logits, for a training step that goes straight
    # from the loss to the backward pass. Per 8-row chunk, in cache: with
    # m = max(x) and s = sum exp(x - m), lse = m + log s and
    #   dlogits = (softmax - onehot) dloss = exp(x - m) (dloss / s) - onehot dloss,
    # so the exponentials computed for the loss are the gradient's too.
    N = logits.shape[0]
    logits[:, V if V is not None else logits.shape[1]:] = 0
    if k := _kernels(logits, losses, lse):
        return k.crossentropy_forward_backward(losses, lse, logits, V or logits.shape[1], targets, dloss)
    logits = logits[:, :V]

    def loss_and_dlogits(lo, hi):
        for i in range(lo, hi, _ROWS):
            j = min(i + _ROWS, hi)
            rows, at = logits[i:j], (np.arange(j - i), targets[i:j])
            picked = rows[at]                        # a copy: logit of each target, before rows change
            m = rows.max(axis=1)
            rows -= m[:, None]
            np.exp(rows, out=rows)
            s = rows.sum(axis=1)
            lse[i:j] = m + np.log(s)
            losses[i:j] = lse[i:j] - picked
            rows *= (dloss / s)[:, None].astype(rows.dtype)
            rows[at] -= dloss

    _for_row_blocks(loss_and_dlogits, N, logits.shape[1], block=_ROWS * logits.shape[1])


def crossentropy_backward(logits, lse, targets, dloss, V=None):
    # In place: logits (N, Vp) become dlogits = (softmax - onehot) * dloss, with
    # dloss the gradient of the final loss wrt each token's loss (a scalar:
    # 1 / (N * accumulation steps) for a mean); padded columns >= V become 0.
    N = logits.shape[0]
    logits[:, V if V is not None else logits.shape[1]:] = 0
    if k := _kernels(logits, lse):
        return k.crossentropy_backward(logits, V or logits.shape[1], lse, targets, dloss)
    logits = logits[:, :V]

    def dlogits(lo, hi):
        # each 8-row chunk: exp(x - lse) - onehot, times dloss, while in cache
        for i in range(lo, hi, _ROWS):
            j = min(i + _ROWS, hi)
            rows = logits[i:j]
            rows -= lse[i:j, None]
            np.exp(rows, out=rows)
            rows[np.arange(j - i), targets[i:j]] -= 1.0
            rows *= dloss

    _for_row_blocks(dlogits, N, logits.shape[1], block=_ROWS * logits.shape[1])


# ----------------------------------------------------------------------------
# optimizer pieces (see optim.py)

def sum_of_squares(x):
    x = x.reshape(-1)
    if k := _kernels(x, float64=True):
        return k.sum_of_squares(x)      # on every core, in float64 over 4 MB blocks
    return float(np.dot(x, x))


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch, grad_scale=1.0):
    """One AdamW step on a flat chunk, in place (decoupled weight decay), with
    g = grad_scale * grad (gradient clipping folded in):
        m += (1 - b1) (g - m);   v += (1 - b2) (g^2 - v)
        p -= lr * (wd p + mhat / (sqrt(vhat) + eps)),  mhat = m / bc1, vhat = v / bc2
    with bc_i = 1 - b_i^step. The last line is computed as
        p -= (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2))
    which is the same number with one pass fewer over the chunk.
    scratch: float32, shape (2, at least the chunk's length).
    """
    n = param.shape[0]
    tmp = scratch[1, :n]
    g = grad if grad_scale == 1.0 else np.multiply(grad, grad_scale, out=scratch[0, :n])
    np.subtract(g, m, out=tmp)
    tmp *= 1.0 - beta1
    m += tmp
    np.multiply(g, g, out=tmp)
    tmp -= v
    tmp *= 1.0 - beta2
    v += tmp
    bc1 = 1.0 - beta1 ** step
    sqrt_bc2 = math.sqrt(1.0 - beta2 ** step)
    np.sqrt(v, out=tmp)
    tmp += eps * sqrt_bc2
    np.divide(m, tmp, out=tmp)
    if weight_decay:
        param *= 1.0 - lr * weight_decay
    tmp *= lr * sqrt_bc2 / bc1
    param -= tmp


# ----------------------------------------------------------------------------
# cached attention (inference only): see shared.attention_forward_cached

def attention_forward_cached(out, q, k, v, pos):
    # out, q (B, NH, t, hs); k, v (B, NKV, pos + t, hs), NKV dividing NH (grouped-query); no backward is kept.
    shared.attention_forward_cached(np, out, q, k, v, pos)


# ============================================================================
# the Llama family's ops (contract.LLAMA_OPS): embedding, RMSNorm, RoPE,
# SwiGLU (its grouped-query attention is GPT-2's, in the attention section
# above). Shapes as in the contract: NKV key/value heads, hs the head size,
# I the MLP's intermediate size.

# ----------------------------------------------------------------------------
# embedding: out[b, t] = wte[ids[b, t]] (RoPE, not a table, carries the positions)

def embedding_forward(out, ids, wte):
    # out (B, T, C), ids (B, T) int, wte (Vp, C)
    np.take(wte, ids, axis=0, out=out)


def embedding_backward(dwte, dout, ids, acc=True, sorted_order=None):
    # The rows were gathered, so their gradient scatters back: a token seen
    # twice gets both contributions. (sorted_order: the GPU's; unused here.)
    C = dout.shape[-1]
    if not acc:
        dwte[...] = 0
    np.add.at(dwte, ids.reshape(-1), dout.reshape(-1, C))


# ----------------------------------------------------------------------------
# rmsnorm: y = x * rstd * w,  rstd = 1 / sqrt(mean_c(x^2) + eps)

def rmsnorm_forward(out, rstd, inp, weight, eps):
    # out, inp (N, C); rstd (N,); weight (C,)
    C = inp.shape[-1]
    mean_sq = np.einsum("ij,ij->i", inp, inp) / C
    np.sqrt(mean_sq + eps, out=rstd)
    np.reciprocal(rstd, out=rstd)
    np.multiply(inp, rstd[:, None], out=out)
    out *= weight


def residual_rmsnorm_forward(res, out, rstd, a, b, weight, eps):
    # The residual add fused with the norm after it: res = a + b (res may be a), out = rmsnorm(res).
    np.add(a, b, out=res)
    rmsnorm_forward(out, rstd, res, weight, eps)


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch, acc=True):
    # y_j = w_j x_j r with r = (mean_i(x_i^2) + eps)^(-1/2), so dr/dx_j = -r^3 x_j / C.
    # With xhat = x r and g = dout * w (the gradient wrt xhat):
    #   dx_j = g_j r + sum_i g_i x_i (-r^3 x_j / C) = r (g_j - xhat_j mean_i(g_i xhat_i))
    # (layernorm's formula without the mean(g) term: no mean was removed).
    #   dw = sum_n dout xhat
    # dinp is ADDED to (the residual stream's gradient); scratch is (2, N, C).
    C = inp.shape[-1]
    xhat, g = scratch[0], scratch[1]
    np.multiply(inp, rstd[:, None], out=xhat)
    if acc:
        dweight += np.einsum("ij,ij->j", dout, xhat)
    else:
        dweight[...] = np.einsum("ij,ij->j", dout, xhat)
    np.multiply(dout, weight, out=g)
    gx_mean = np.einsum("ij,ij->i", g, xhat) / C
    xhat *= gx_mean[:, None]
    g -= xhat
    g *= rstd[:, None]
    dinp += g


# ----------------------------------------------------------------------------
# rope: rotary position embedding in Hugging Face's rotate-half layout.
# Position t turns the pair (x1_i, x2_i) = (x[i], x[i + hs/2]) of every head
# by the angle t * inv_freq_i:
#   out1 = x1 cos - x2 sin,   out2 = x2 cos + x1 sin
# (HF writes it x cos + rotate_half(x) sin with rotate_half(x) = [-x2, x1]).
# cos, sin (T, hs/2) are the angles' cosines and sines for the T positions.

def rope_forward(out, inp, cos, sin):
    # out, inp (B, T, H, hs), any strides (the q and k heads of qkv); out may be inp
    h = inp.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]           # (T, 1, hs/2): the same angle for every head
    x1, x2 = inp[..., :h], inp[..., h:]
    out1 = x1 * c - x2 * s
    out[..., h:] = x2 * c + x1 * s
    out[..., :h] = out1


def rope_backward(dinp, dout, cos, sin):
    # A rotation is linear with Jacobian R(angle); its transpose is the
    # rotation by -angle:  dx1 = dy1 cos + dy2 sin,  dx2 = dy2 cos - dy1 sin.
    # dinp may be dout.
    h = dout.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    dy1, dy2 = dout[..., :h], dout[..., h:]
    dx1 = dy1 * c + dy2 * s
    dinp[..., h:] = dy2 * c - dy1 * s
    dinp[..., :h] = dx1


# ----------------------------------------------------------------------------
# swiglu: out = silu(gate) * up,  silu(x) = x sigmoid(x),  inp = [gate | up]

def _sigmoid(x):
    # 1 / (1 + e^-x) written with tanh: no overflow for large |x|
    s = np.tanh(0.5 * x)
    s += 1.0
    s *= 0.5
    return s


def swiglu_forward(out, inp):
    # out (N, I); inp (N, 2I): the fused gate and up projections
    I = out.shape[-1]
    gate, up = inp[:, :I], inp[:, I:]
    np.multiply(gate, _sigmoid(gate), out=out)
    out *= up


def swiglu_backward(dinp, dout, inp):
    # With s = sigmoid(gate):  silu'(gate) = s + gate s (1 - s) = s (1 + gate (1 - s)), so
    #   dgate = dout * up * s (1 + gate (1 - s)),   dup = dout * gate * s
    # dinp (N, 2I) overwritten.
    I = dout.shape[-1]
    gate, up = inp[:, :I], inp[:, I:]
    dgate, dup = dinp[:, :I], dinp[:, I:]
    s = _sigmoid(gate)
    np.multiply(gate, s, out=dup)
    dup *= dout                                          # dup = dout silu(gate)
    np.subtract(1.0, s, out=dgate)
    dgate *= gate
    dgate += 1.0
    dgate *= s
    dgate *= up
    dgate *= dout


