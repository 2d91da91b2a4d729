"""attention: causal self-attention from the fused qkv projection, multi-head
(GPT-2) or grouped-query (Llama: NKV key/value heads, each read by G = NH / NKV
query heads; attention_forward is the case NKV = NH).

    att = softmax(q k^T / sqrt(hs) + causal mask),  out = att v
    backward: dv = att^T dy,  datt = dy v^T,
              dpre = att (datt - rowsum(datt att)) / sqrt(hs),  dq = dpre k,  dk = dpre^T q
    (with GQA, dk and dv of a k/v head are the sums over its G query heads)

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

_cudnn_verdicts: dict = {}              # (B, NH, NKV, T, hs) -> cuDNN agrees with our kernels


def _use_flash(B, NH, NKV, T, hs, dtype) -> bool:
    """Flash attention for this shape and storage type? bf16 only, cuDNN
    present, and its first-use check passed (made once per shape)."""
    return np.dtype(dtype) != np.float32 and cudnn is not None and _cudnn_ok(B, NH, NKV, T, hs)


def attention_saved(B, NH, T, hs, dtype, n_kv_head=None):
    """What attention_forward (gqa_attention_forward with n_kv_head key/value
    heads) keeps for the backward pass, for this shape and storage type:
    (shape, dtype) of `att`, and the shape of the scratch `datt` (the rule:
    contract.attention_saved)."""
    NKV = NH if n_kv_head is None else n_kv_head
    return contract.attention_saved(B, NH, T, hs, dtype, flash=_use_flash(B, NH, NKV, T, hs, dtype))


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
    gqa_attention_forward(out, att, qkv, n_head, n_head)


def attention_backward(dqkv, dout, qkv, att, datt, n_head, out=None):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); att from the forward pass;
    # datt: scratch of att's shape (our kernels); out: the forward's output (cuDNN)
    gqa_attention_backward(dqkv, dout, qkv, att, datt, n_head, n_head, out)


def _head_size(qkv, n_head, n_kv_head) -> int:
    W = qkv.shape[-1]
    if n_head % n_kv_head or W % (n_head + 2 * n_kv_head):
        raise ValueError(f"attention: qkv rows of {W} values are not {n_head} query + 2 x {n_kv_head} "
                         f"key/value heads (NKV must divide NH)")
    return W // (n_head + 2 * n_kv_head)


def gqa_attention_forward(out, att, qkv, n_head, n_kv_head):
    # out (B, T, NH hs); att keeps what the backward needs (see attention_saved);
    # qkv (B, T, (NH + 2 NKV) hs): query heads, then key heads, then value heads
    hs = _head_size(qkv, n_head, n_kv_head)
    path = _path(att, qkv, n_head)
    if path == "cudnn":
        check_floatx(out, qkv)
        check_f32(att)
        B, T, _ = qkv.shape
        cudnn.forward(ptr(out), ptr(att), ptr(qkv), B, n_head, n_kv_head, T, hs, stream())
        return
    bf = check_floatx(out, att, qkv)
    (_forward_lt if path == "cublaslt" else _forward_cupy)(out, att, qkv, n_head, n_kv_head, hs, bf)


def gqa_attention_backward(dqkv, dout, qkv, att, datt, n_head, n_kv_head, out=None):
    # dqkv (B, T, (NH + 2 NKV) hs) overwritten; dout (B, T, NH hs); att from the
    # forward pass; datt: scratch of att's shape (our kernels); out: the forward's output (cuDNN)
    hs = _head_size(qkv, n_head, n_kv_head)
    path = _path(att, qkv, n_head)
    if path == "cudnn":   # recomputes the scores from q, k and the saved logsumexps
        check_floatx(dqkv, dout, qkv, out)
        check_f32(att)
        B, T, _ = qkv.shape
        cudnn.backward(ptr(dqkv), ptr(dout), ptr(qkv), ptr(out), ptr(att), B, n_head, n_kv_head, T, hs, stream())
        return
    bf = check_floatx(dqkv, dout, att, datt, qkv)
    (_backward_lt if path == "cublaslt" else _backward_cupy)(dqkv, dout, qkv, att, datt, n_head, n_kv_head, hs, bf)


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
# buffers, then strided batched GEMMs, one batch entry per (b, k/v head):
# B * NKV products of the G T rows of the group's query heads (q viewed as
# (B, NKV, G T, hs), see attention.cu) against the head's T keys, so
# att (B, NH, T, T) is (B, NKV, G T, T) and the products that contract over
# the queries (dv, dk) add up the group's G heads themselves. The row-major
# products, transcribed for the column-major GEMM as in matmul.py (R = G T):
#   pre = q k^T:   pre^T (T x R)  = k (op T, ld hs) . q^T (op N, ld hs)
#   y = att v:     y^T  (hs x R)  = v^T (op N, ld hs) . att^T (op N, ld T)
#   dv = att^T dy: dv^T (hs x T)  = dy^T (op N, ld hs) . att (op T, ld T)      (k = R: the group's sum)
#   datt = dy v^T: datt^T (T x R) = v (op T, ld hs) . dy^T (op N, ld hs)
#   dq = dpre k:   dq^T (hs x R)  = k^T (op N, ld hs) . dpre^T (op N, ld T)
#   dk = dpre^T q: dk^T (hs x T)  = q^T (op N, ld hs) . dpre (op T, ld T)      (k = R: the group's sum)

def _bgemm(transa, transb, m, n, k, a, lda, b, ldb, d, ldd, batch):
    """One strided batched product over `batch` contiguous matrices of each operand."""
    matmul.lt.gemm(transa, transb, m, n, k, ptr(a), lda, ptr(b), ldb, ptr(d), ldd, d.dtype, stream=stream(),
                   batch=batch, a_stride=a.size // batch, b_stride=b.size // batch, d_stride=d.size // batch)


def _heads(B, H, T, hs, dtype, names):
    """(B, H, T, hs) scratch tensors, one per name."""
    n = B * H * T * hs
    return [scratch(n, dtype, slot=name).reshape(B, H, T, hs) for name in names]


def _forward_lt(out, att, qkv, NH, NKV, hs, bf):
    B, T, _ = qkv.shape
    n, batch, R = B * T * NH * hs, B * NKV, (NH // NKV) * T
    q, y = _heads(B, NH, T, hs, out.dtype, ("q", "y"))
    k, v = _heads(B, NKV, T, hs, out.dtype, ("k", "v"))
    kernel("attention.cu", "attention_split_heads", bf)(
        (blocks(n),), (BLOCK,), (q, k, v, qkv, i64(n), i32(T), i32(NH), i32(NKV), i32(hs)))
    _bgemm("T", "N", T, R, hs, k, hs, q, hs, att, T, batch)
    _softmax_forward(att, hs, B * NH * T, T, bf)
    _bgemm("N", "N", hs, R, T, v, hs, att, T, y, hs, batch)
    kernel("attention.cu", "attention_heads_bthd", bf)(
        (blocks(n),), (BLOCK,), (out, y, i64(n), i32(T), i32(NH), i32(hs), i32(1)))


def _backward_lt(dqkv, dout, qkv, att, datt, NH, NKV, hs, bf):
    B, T, _ = qkv.shape
    n, batch, R = B * T * NH * hs, B * NKV, (NH // NKV) * T
    q, dy, dq = _heads(B, NH, T, hs, dout.dtype, ("q", "y", "dq"))
    k, v, dk, dv = _heads(B, NKV, T, hs, dout.dtype, ("k", "v", "dk", "dv"))
    kernel("attention.cu", "attention_split_heads", bf)(
        (blocks(n),), (BLOCK,), (q, k, v, qkv, i64(n), i32(T), i32(NH), i32(NKV), i32(hs)))
    kernel("attention.cu", "attention_heads_bthd", bf)(
        (blocks(n),), (BLOCK,), (dout, dy, i64(n), i32(T), i32(NH), i32(hs), i32(0)))
    _bgemm("N", "T", hs, T, R, dy, hs, att, T, dv, hs, batch)
    _bgemm("T", "N", T, R, hs, v, hs, dy, hs, datt, T, batch)
    _softmax_backward(datt, att, hs, B * NH * T, T, bf)
    _bgemm("N", "N", hs, R, T, k, hs, datt, T, dq, hs, batch)
    _bgemm("N", "T", hs, T, R, q, hs, datt, T, dk, hs, batch)
    kernel("attention.cu", "attention_merge_heads_qkv", bf)(
        (blocks(n),), (BLOCK,), (dqkv, dq, dk, dv, i64(n), i32(T), i32(NH), i32(NKV), i32(hs)))


# ----------------------------------------------------------------------------
# without cuBLASLt: pre = q k^T and y = att v by cupy.matmul (cuBLAS), the
# softmax in place by our kernel. q, k, v are copied out of qkv into
# contiguous arrays first (cuBLAS batches need one stride per batch), q as
# (B, NKV, G T, hs) as on the cuBLASLt path.

def _bmm(a, b, out):
    """out = a @ b, batched over the leading axes (cuBLAS through cupy.matmul).
    In bf16 the product comes back in a new array and is rounded into out."""
    if out.dtype == np.float32:
        cupy.matmul(a, b, out=out)
    else:
        out[...] = cupy.matmul(a, b)
    return out


def _grouped(qkv, NH, NKV):
    """Contiguous copies q (B, NKV, G T, hs), k and v (B, NKV, T, hs) of qkv's heads."""
    B, T, _ = qkv.shape
    q, k, v = (cupy.ascontiguousarray(a) for a in shared.gqa_heads(qkv, B, T, NH, NKV))
    return q.reshape(B, NKV, -1, q.shape[-1]), k, v


def _forward_cupy(out, att, qkv, NH, NKV, hs, bf):
    B, T, _ = qkv.shape
    q, k, v = _grouped(qkv, NH, NKV)
    a = att.reshape(B, NKV, -1, T)                           # (B, NKV, G T, T): a view
    _bmm(q, k.swapaxes(-1, -2), a)
    _softmax_forward(att, hs, B * NH * T, T, bf)
    y = _bmm(a, v, cupy.empty_like(q))                       # (B, NKV, G T, hs) = (B, NH, T, hs)
    out.reshape(B, T, NH, hs)[...] = y.reshape(B, NH, T, hs).transpose(0, 2, 1, 3)


def _backward_cupy(dqkv, dout, qkv, att, datt, NH, NKV, hs, bf):
    B, T, _ = qkv.shape
    q, k, v = _grouped(qkv, NH, NKV)
    dq, dk, dv = shared.gqa_heads(dqkv, B, T, NH, NKV)
    dy = cupy.ascontiguousarray(dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)).reshape(q.shape)
    a, da = att.reshape(B, NKV, -1, T), datt.reshape(B, NKV, -1, T)
    dv[...] = _bmm(a.swapaxes(-1, -2), dy, cupy.empty_like(k))      # sums over the group's G T rows
    _bmm(dy, v.swapaxes(-1, -2), da)
    _softmax_backward(datt, att, hs, B * NH * T, T, bf)
    dq[...] = _bmm(da, k, cupy.empty_like(q)).reshape(B, NH, T, hs)
    dk[...] = _bmm(da.swapaxes(-1, -2), q, cupy.empty_like(k))


# ----------------------------------------------------------------------------
# cuDNN's first use on a shape

def _cudnn_ok(B, NH, NKV, T, hs) -> bool:
    """Run cuDNN once on random data of this shape and compare it with our own
    path; any error or disagreement turns cuDNN off for the shape, saying why.
    What the check allocated goes back afterwards: the arrays, and the
    head-major q/k/v/y/dq/dk/dv scratch our path made (7 B T C values: 0.7 GB
    at d12 B=64 in bf16), which flash attention never uses again."""
    key = (B, NH, NKV, T, hs)
    if key not in _cudnn_verdicts:
        bf16 = bf16_dtype()
        C, W = NH * hs, (NH + 2 * NKV) * hs
        slots_before = scratch_slots()
        try:
            rng = np.random.default_rng(0)
            qkv = cupy.asarray(rng.standard_normal((B, T, W), dtype=np.float32).astype(bf16))
            dout = cupy.asarray(rng.standard_normal((B, T, C), dtype=np.float32).astype(bf16))
            out, stats, dqkv = cupy.empty((B, T, C), bf16), cupy.empty((B, NH, T), np.float32), cupy.empty_like(qkv)
            gqa_attention_forward(out, stats, qkv, NH, NKV)
            gqa_attention_backward(dqkv, dout, qkv, stats, None, NH, NKV, out=out)
            ref_out, att, ref_dqkv = cupy.empty_like(out), cupy.empty((B, NH, T, T), bf16), cupy.empty_like(qkv)
            gqa_attention_forward(ref_out, att, qkv, NH, NKV)
            gqa_attention_backward(ref_dqkv, dout, qkv, att, cupy.empty_like(att), NH, NKV)
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
            print(f"llmpy: cuDNN attention off for B={B} NH={NH} NKV={NKV} T={T} hs={hs}: {why}; "
                  "using batched GEMMs",
                  file=sys.stderr)
        _cudnn_verdicts[key] = ok
    return _cudnn_verdicts[key]


# ----------------------------------------------------------------------------
# cached attention (inference only): see shared.attention_forward_cached

def attention_forward_cached(out, q, k, v, pos):
    # out, q (B, NH, t, hs); k, v (B, NKV, pos + t, hs), NKV dividing NH (grouped-query);
    # bf16 computed in float32, rounded into out
    shared.attention_forward_cached(cupy, out, q, k, v, pos)
