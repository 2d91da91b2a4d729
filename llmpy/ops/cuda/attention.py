"""attention: causal multi-head self-attention from the fused qkv projection.

    att = softmax(q k^T / sqrt(hs) + causal mask),  out = att v
    backward: dv = att^T dy,  datt = dy v^T,
              dpre = att (datt - rowsum(datt att)) / sqrt(hs),  dq = dpre k,  dk = dpre^T q

Three implementations, and where each is chosen:
- "cudnn": cuDNN's flash attention (cudnn_attention.py beside this file),
  for bf16 storage, when the cuDNN frontend imports (LLMPY_CUDNN=0 turns it
  off). It keeps a logsumexp per row instead of the probabilities. Whether
  a shape uses it is decided ONCE per shape, by attention_saved, after
  checking cuDNN on that shape against our own kernels (_cudnn_ok); the
  caller then allocates `att` as attention_saved says, and forward and
  backward follow that layout (_path).
- "cublaslt": our softmax kernels (attention.cu) between strided batched
  GEMMs through cuBLASLt, with the heads moved into the batch by our copy
  kernels into scratch buffers (nothing allocates: capturable);
- "cupy": the same softmax kernels between cupy.matmul products, where
  cuBLASLt did not import (matmul.py chooses, once).
"""
from __future__ import annotations

import math
import os
import sys

import cupy
import numpy as np

from .. import contract, shared
from . import matmul
from .runtime import (BLOCK, WARP, bf16_dtype, blocks, check_f32, check_floatx, drop_scratch, f32, i32, i64,
                      kernel, ptr, scratch, scratch_slots, stream)

cudnn, attention_library = None, "batched GEMM + our softmax kernels"
if os.environ.get("LLMPY_CUDNN", "1") != "0":
    try:
        from . import cudnn_attention as cudnn
    except Exception as e:      # no cudnn frontend, or no libcudnn
        attention_library += f" (cuDNN unavailable: {type(e).__name__}: {e})"

ROWS_PER_BLOCK = BLOCK // WARP          # the softmax kernels: one warp per row


# ----------------------------------------------------------------------------
# the choice

_cudnn_verdicts: dict = {}              # (B, NH, T, hs) -> cuDNN agrees with our kernels


def _use_flash(B, NH, T, hs, dtype) -> bool:
    """Flash attention for this shape and storage type? bf16 only, cuDNN
    present, and its first-use check passed (made once per shape)."""
    return np.dtype(dtype) != np.float32 and cudnn is not None and _cudnn_ok(B, NH, T, hs)


def attention_saved(B, NH, T, hs, dtype):
    """What attention_forward keeps for the backward pass, for this shape and
    storage type: (shape, dtype) of `att`, and the shape of the scratch
    `datt` (the rule: contract.attention_saved)."""
    return contract.attention_saved(B, NH, T, hs, dtype, flash=_use_flash(B, NH, T, hs, dtype))


def _path(att, qkv, n_head) -> str:
    """Which implementation runs for these arrays: "cudnn" when att is the
    (B, NH, T) logsumexps attention_saved asked for, else our kernels on the
    (B, NH, T, T) probabilities, "cublaslt" or "cupy" by matmul's library."""
    B, T, _ = qkv.shape
    if att.shape == (B, n_head, T):
        if cudnn is None:
            raise ValueError(f"att {att.shape} is flash attention's layout, but cuDNN is unavailable")
        return "cudnn"
    if att.shape != (B, n_head, T, T):
        raise ValueError(f"att must be {(B, n_head, T, T)} (or {(B, n_head, T)} with flash attention), "
                         f"got {att.shape}")
    return "cupy" if matmul.lt is None else "cublaslt"


def attention_forward(out, att, qkv, n_head):
    # out (B, T, C); att keeps what the backward needs (see attention_saved); qkv (B, T, 3C)
    path = _path(att, qkv, n_head)
    if path == "cudnn":
        check_floatx(out, qkv)
        check_f32(att)
        B, T, C3 = qkv.shape
        cudnn.forward(ptr(out), ptr(att), ptr(qkv), B, n_head, T, C3 // (3 * n_head), stream())
        return
    bf = check_floatx(out, att, qkv)
    (_forward_lt if path == "cublaslt" else _forward_cupy)(out, att, qkv, n_head, bf)


def attention_backward(dqkv, dout, qkv, att, datt, n_head, out=None):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); att from the forward pass;
    # datt: scratch of att's shape (our kernels); out: the forward's output (cuDNN)
    path = _path(att, qkv, n_head)
    if path == "cudnn":   # recomputes the scores from q, k and the saved logsumexps
        check_floatx(dqkv, dout, qkv, out)
        check_f32(att)
        B, T, C3 = qkv.shape
        cudnn.backward(ptr(dqkv), ptr(dout), ptr(qkv), ptr(out), ptr(att), B, n_head, T,
                       C3 // (3 * n_head), stream())
        return
    bf = check_floatx(dqkv, dout, att, datt, qkv)
    (_backward_lt if path == "cublaslt" else _backward_cupy)(dqkv, dout, qkv, att, datt, n_head, bf)


# the softmax kernels, in place over `rows` rows of T scores, one warp per row

def _softmax_forward(att, hs, rows, T, bf):
    # att: pre = q k^T in, the probabilities out
    kernel("attention.cu", "attention_softmax_forward", bf)(
        (blocks(rows, ROWS_PER_BLOCK),), (BLOCK,), (att, f32(1.0 / math.sqrt(hs)), i32(rows), i32(T)))


def _softmax_backward(datt, att, hs, rows, T, bf):
    # datt: d(att) = dy v^T in, d(pre) out
    kernel("attention.cu", "attention_softmax_backward", bf)(
        (blocks(rows, ROWS_PER_BLOCK),), (BLOCK,), (datt, att, f32(1.0 / math.sqrt(hs)), i32(rows), i32(T)))


# ----------------------------------------------------------------------------
# with cuBLASLt: heads moved into the batch by our kernels into scratch
# buffers, then strided batched GEMMs over the B * NH (T, hs) matrices. The
# row-major products, transcribed for the column-major GEMM as in matmul.py:
#   pre = q k^T:   pre^T (T x T)  = k (op T, ld hs) . q^T (op N, ld hs)
#   y = att v:     y^T  (hs x T)  = v^T (op N, ld hs) . att^T (op N, ld T)
#   dv = att^T dy: dv^T (hs x T)  = dy^T (op N, ld hs) . att (op T, ld T)
#   datt = dy v^T: datt^T (T x T) = v (op T, ld hs) . dy^T (op N, ld hs)
#   dq = dpre k:   dq^T (hs x T)  = k^T (op N, ld hs) . dpre^T (op N, ld T)
#   dk = dpre^T q: dk^T (hs x T)  = q^T (op N, ld hs) . dpre (op T, ld T)

def _bgemm(transa, transb, m, n, k, a, lda, b, ldb, d, ldd, batch):
    """One strided batched product over `batch` contiguous matrices of each operand."""
    matmul.lt.gemm(transa, transb, m, n, k, ptr(a), lda, ptr(b), ldb, ptr(d), ldd, d.dtype, stream=stream(),
                   batch=batch, a_stride=a.size // batch, b_stride=b.size // batch, d_stride=d.size // batch)


def _heads(B, NH, T, hs, dtype, names):
    """(B, NH, T, hs) scratch tensors, one per name."""
    n = B * NH * T * hs
    return [scratch(n, dtype, slot=name).reshape(B, NH, T, hs) for name in names]


def _forward_lt(out, att, qkv, n_head, bf):
    B, T, C3 = qkv.shape
    NH, hs = n_head, C3 // (3 * n_head)
    n, BH = B * T * C3 // 3, B * n_head
    q, k, v, y = _heads(B, NH, T, hs, out.dtype, ("q", "k", "v", "y"))
    kernel("attention.cu", "attention_split_heads", bf)(
        (blocks(n),), (BLOCK,), (q, k, v, qkv, i64(n), i32(T), i32(NH), i32(hs)))
    _bgemm("T", "N", T, T, hs, k, hs, q, hs, att, T, BH)
    _softmax_forward(att, hs, BH * T, T, bf)
    _bgemm("N", "N", hs, T, T, v, hs, att, T, y, hs, BH)
    kernel("attention.cu", "attention_heads_bthd", bf)(
        (blocks(n),), (BLOCK,), (out, y, i64(n), i32(T), i32(NH), i32(hs), i32(1)))


def _backward_lt(dqkv, dout, qkv, att, datt, n_head, bf):
    B, T, C3 = qkv.shape
    NH, hs = n_head, C3 // (3 * n_head)
    n, BH = B * T * C3 // 3, B * n_head
    q, k, v, dy = _heads(B, NH, T, hs, dout.dtype, ("q", "k", "v", "y"))
    dq, dk, dv = _heads(B, NH, T, hs, dout.dtype, ("dq", "dk", "dv"))
    kernel("attention.cu", "attention_split_heads", bf)(
        (blocks(n),), (BLOCK,), (q, k, v, qkv, i64(n), i32(T), i32(NH), i32(hs)))
    kernel("attention.cu", "attention_heads_bthd", bf)(
        (blocks(n),), (BLOCK,), (dout, dy, i64(n), i32(T), i32(NH), i32(hs), i32(0)))
    _bgemm("N", "T", hs, T, T, dy, hs, att, T, dv, hs, BH)
    _bgemm("T", "N", T, T, hs, v, hs, dy, hs, datt, T, BH)
    _softmax_backward(datt, att, hs, BH * T, T, bf)
    _bgemm("N", "N", hs, T, T, k, hs, datt, T, dq, hs, BH)
    _bgemm("N", "T", hs, T, T, q, hs, datt, T, dk, hs, BH)
    kernel("attention.cu", "attention_merge_heads_qkv", bf)(
        (blocks(n),), (BLOCK,), (dqkv, dq, dk, dv, i64(n), i32(T), i32(NH), i32(hs)))


# ----------------------------------------------------------------------------
# without cuBLASLt: pre = q k^T and y = att v by cupy.matmul (cuBLAS), the
# softmax in place by our kernel. q, k, v are copied out of qkv into
# contiguous (B, NH, T, hs) arrays first (cuBLAS batches need one stride per batch).

def _bmm(a, b, out):
    """out = a @ b, batched over the leading axes (cuBLAS through cupy.matmul).
    In bf16 the product comes back in a new array and is rounded into out."""
    if out.dtype == np.float32:
        cupy.matmul(a, b, out=out)
    else:
        out[...] = cupy.matmul(a, b)
    return out


def _forward_cupy(out, att, qkv, n_head, bf):
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = (cupy.ascontiguousarray(a) for a in shared.split_heads(qkv, B, T, n_head))
    _bmm(q, k.swapaxes(-1, -2), att)
    _softmax_forward(att, hs, B * n_head * T, T, bf)
    y = _bmm(att, v, cupy.empty_like(v))                   # (B, NH, T, hs)
    out.reshape(B, T, n_head, hs)[...] = y.transpose(0, 2, 1, 3)


def _backward_cupy(dqkv, dout, qkv, att, datt, n_head, bf):
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = (cupy.ascontiguousarray(a) for a in shared.split_heads(qkv, B, T, n_head))
    dq, dk, dv = shared.split_heads(dqkv, B, T, n_head)
    dy = cupy.ascontiguousarray(dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))
    dv[...] = _bmm(att.swapaxes(-1, -2), dy, cupy.empty_like(dy))
    _bmm(dy, v.swapaxes(-1, -2), datt)
    _softmax_backward(datt, att, hs, B * n_head * T, T, bf)
    dq[...] = _bmm(datt, k, cupy.empty_like(k))
    dk[...] = _bmm(datt.swapaxes(-1, -2), q, cupy.empty_like(q))


# ----------------------------------------------------------------------------
# cuDNN's first use on a shape

def _cudnn_ok(B, NH, T, hs) -> bool:
    """Run cuDNN once on random data of this shape and compare it with our own
    path; any error or disagreement turns cuDNN off for the shape, saying why.
    What the check allocated goes back afterwards: the arrays, and the
    head-major q/k/v/y/dq/dk/dv scratch our path made (7 B T C values: 0.7 GB
    at d12 B=64 in bf16), which flash attention never uses again."""
    key = (B, NH, T, hs)
    if key not in _cudnn_verdicts:
        bf16 = bf16_dtype()
        C = NH * hs
        slots_before = scratch_slots()
        try:
            rng = np.random.default_rng(0)
            qkv = cupy.asarray(rng.standard_normal((B, T, 3 * C), dtype=np.float32).astype(bf16))
            dout = cupy.asarray(rng.standard_normal((B, T, C), dtype=np.float32).astype(bf16))
            out, stats, dqkv = cupy.empty((B, T, C), bf16), cupy.empty((B, NH, T), np.float32), cupy.empty_like(qkv)
            attention_forward(out, stats, qkv, NH)
            attention_backward(dqkv, dout, qkv, stats, None, NH, out=out)
            ref_out, att, ref_dqkv = cupy.empty_like(out), cupy.empty((B, NH, T, T), bf16), cupy.empty_like(qkv)
            attention_forward(ref_out, att, qkv, NH)
            attention_backward(ref_dqkv, dout, qkv, att, cupy.empty_like(att), NH)
            del att

            def err(a, b):
                a, b = a.astype(np.float32), b.astype(np.float32)
                return float(cupy.linalg.norm(a - b) / cupy.linalg.norm(b))
            e_out, e_dqkv = err(out, ref_out), err(dqkv, ref_dqkv)
            ok = e_out <= 2e-2 and e_dqkv <= 2e-2
            why = f"differs from our kernels (rel. error out {e_out:.1e}, dqkv {e_dqkv:.1e})"
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {str(e)[:300]}"
        qkv = dout = out = stats = dqkv = ref_out = ref_dqkv = None      # the check's arrays, released
        if ok:                              # flash attention from now on: our path's scratch is unused
            drop_scratch(scratch_slots() - slots_before)
        if not ok:
            print(f"llmpy: cuDNN attention off for B={B} NH={NH} T={T} hs={hs}: {why}; using batched GEMMs",
                  file=sys.stderr)
        _cudnn_verdicts[key] = ok
    return _cudnn_verdicts[key]


# ----------------------------------------------------------------------------
# cached attention (inference only): see shared.attention_forward_cached

def attention_forward_cached(out, q, k, v, pos):
    # out, q (B, NH, t, hs); k, v (B, NKV, pos + t, hs), NKV dividing NH (grouped-query);
    # bf16 computed in float32, rounded into out
    shared.attention_forward_cached(cupy, out, q, k, v, pos)
