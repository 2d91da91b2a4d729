"""CUDA backend: the op contract of DESIGN.md section 2 on the GPU, with CuPy.

Same functions, same signatures and the same gradient conventions as cpu.py
(the reference; read its docstring): out-parameter style, parameter gradients
overwritten when `acc=False` and added to when `acc=True`, layernorm_backward
ADDING into dinp. Arrays are cupy.ndarray; `xp = cupy` is what the model
allocates with.

Where the work is done:
- kernels/*.cu, our own CUDA C (one file per layer family), compiled at run
  time by NVRTC through cupy.RawModule for the GPU in use, and cached: the
  encoder, layernorm, gelu, residual, the fused softmax + cross-entropy
  classifier, the attention softmax, AdamW and the sum of squares;
- cuBLAS for the matmuls (cupy.cublas.gemm for the 2-D ones, whose beta = 1
  accumulates a parameter gradient in place; cupy.matmul for attention's
  batched ones).

This first version favours being checkable against cpu.py over speed. Next
steps, in order: the matmuls through cuBLASLt (nvmath.bindings.cublasLt), with
the bias (and gelu) fused into the GEMM epilogue and fixed workspaces so a
whole step can be captured in a CUDA graph (cupy.matmul and the temporaries
below allocate, which graph capture forbids); attention without the (T, T)
matrix (cuDNN flash attention); bf16 storage (the kernels already compile for
it with -DLLMPY_BF16, see kernels/common.cuh).

Numerics: fp32 storage and fp32 arithmetic. cuBLAS runs true fp32 GEMMs here
(CuPy leaves TF32 off unless CUPY_TF32=1 is set), so results match the NumPy
reference to ~1e-6 relative: only the order of additions differs. Every
reduction here has a fixed order (no atomics, the encoder's scatter-add
included), so a run is meant to repeat bit for bit on the same GPU
(tests/test_cuda_ops.py checks it).
"""
from __future__ import annotations

import math
from pathlib import Path

import cupy
import numpy as np

name = "cuda"
xp = cupy                   # the array module of this backend

_KERNELS = Path(__file__).parent / "kernels"
_BLOCK = 256                # threads per block for elementwise kernels
_LN_ROWS_PER_CHUNK = 32     # = LN_ROWS_PER_CHUNK in layernorm.cu
_NORM_BLOCKS = 1024         # stage-1 blocks of sum_of_squares (fixed: deterministic)


# ----------------------------------------------------------------------------
# compiling and launching

_modules: dict[str, cupy.RawModule] = {}


def _source(filename: str) -> str:
    """A kernel file with its `#include "common.cuh"` replaced by the header's
    text: NVRTC then needs no include path, and CuPy's on-disk cache, keyed by
    the source text, sees a change to the header as a change to the file."""
    common = (_KERNELS / "common.cuh").read_text()
    return (_KERNELS / filename).read_text().replace('#include "common.cuh"', common)


def _kernel(filename: str, kernel: str) -> cupy.RawKernel:
    """Kernel `kernel` of kernels/`filename`, compiled once per process (and
    cached on disk by CuPy across processes). RawModule compiles for the
    current device's architecture."""
    mod = _modules.get(filename)
    if mod is None:
        mod = cupy.RawModule(code=_source(filename), options=("-std=c++17",))
        _modules[filename] = mod
    return mod.get_function(kernel)


def synchronize():
    """Wait for every kernel queued so far (kernels run asynchronously: time a
    step only after this)."""
    cupy.cuda.get_current_stream().synchronize()


def _blocks(n: int, per_block: int = _BLOCK) -> int:
    return max(1, (n + per_block - 1) // per_block)


def _f32(*arrays):
    """Our kernels index raw pointers as dense row-major float32: check it, so a
    strided view fails loudly instead of being read wrongly."""
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"expected a cupy.ndarray, got {type(a).__name__}")
        if a.dtype != cupy.float32 or not a.flags.c_contiguous:
            raise ValueError(f"expected a C-contiguous float32 array, got dtype {a.dtype}, "
                             f"shape {a.shape}, strides {a.strides}")


def _ids64(ids):
    """Token ids as a contiguous int64 device array (the kernels read long long)."""
    return cupy.ascontiguousarray(cupy.asarray(ids).reshape(-1), dtype=cupy.int64)


i32, i64, f32 = np.int32, np.int64, np.float32   # kernel scalar argument types


# ----------------------------------------------------------------------------
# encoder: out[b, t] = wte[ids[b, t]] + wpe[t]

def encoder_forward(out, ids, wte, wpe):
    # out (B, T, C), ids (B, T) int, wte (Vp, C), wpe (maxT, C)
    _f32(out, wte, wpe)
    B, T = ids.shape
    C = wte.shape[1]
    n = B * T * C
    _kernel("encoder.cu", "encoder_forward")(
        (_blocks(n),), (_BLOCK,), (out, _ids64(ids), wte, wpe, i32(B * T), i32(T), i32(C)))


def encoder_backward(dwte, dwpe, dout, ids, acc=True):
    # dwte gets the scatter-add of dout's rows, dwpe the sum over the batch.
    _f32(dwte, dwpe, dout)
    B, T, C = dout.shape
    N = B * T
    if not acc:
        dwte.fill(0)
        dwpe[T:] = 0
    _kernel("encoder.cu", "encoder_backward_wpe")(
        (_blocks(T * C),), (_BLOCK,), (dwpe, dout, i32(B), i32(T), i32(C), i32(1 if acc else 0)))
    # Sort positions by token id; the key id * N + position is unique, so the
    # order (and with it the order of the sums) does not depend on the sort.
    flat = _ids64(ids)
    order = cupy.argsort(flat * N + cupy.arange(N, dtype=cupy.int64))
    sorted_ids = cupy.ascontiguousarray(flat[order])
    _kernel("encoder.cu", "encoder_backward_wte")(
        (N,), (min(_BLOCK, 32 * _blocks(C, 32)),), (dwte, dout, sorted_ids, order, i32(N), i32(C)))


# ----------------------------------------------------------------------------
# layernorm: y = (x - mean) * rstd * w + b

def layernorm_forward(out, mean, rstd, inp, weight, bias):
    # out, inp (N, C); mean, rstd (N,); weight, bias (C,)
    _f32(out, mean, rstd, inp, weight, bias)
    C = inp.shape[-1]
    N = inp.size // C
    rows_per_block = _BLOCK // 32                         # one warp per row
    _kernel("layernorm.cu", "layernorm_forward")(
        (_blocks(N, rows_per_block),), (_BLOCK,), (out, mean, rstd, inp, weight, bias, i32(N), i32(C)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True):
    # dinp is ADDED to; scratch (2, N, C) float32 holds the column partial sums.
    _f32(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch)
    C = inp.shape[-1]
    N = inp.size // C
    rows_per_block = _BLOCK // 32
    _kernel("layernorm.cu", "layernorm_backward_input")(
        (_blocks(N, rows_per_block),), (_BLOCK,), (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)))
    nchunks = _blocks(N, _LN_ROWS_PER_CHUNK)
    partial_w, partial_b = scratch[0], scratch[1]         # each holds N*C >= nchunks*C floats
    _kernel("layernorm.cu", "layernorm_backward_params_partial")(
        (_blocks(C), nchunks), (_BLOCK,), (partial_w, partial_b, dout, inp, mean, rstd, i32(N), i32(C)))
    _kernel("layernorm.cu", "layernorm_backward_params_final")(
        (_blocks(C),), (_BLOCK,), (dweight, dbias, partial_w, partial_b, i32(nchunks), i32(C),
                                   i32(1 if acc else 0)))


# ----------------------------------------------------------------------------
# matmul: out = inp @ W^T + b, W stored (OC, C)
# cuBLAS through cupy.cublas.gemm (out = alpha op(a) op(b) + beta out, any
# C- or F-contiguous out): beta = 1 is gradient accumulation without a
# temporary. Next step: cuBLASLt with the bias in the epilogue.

def _gemm(*args, **kwargs):
    # cupy.cublas is a submodule `import cupy` does not load, and loading it
    # needs libcublas: imported on first use, so this module (and the NVRTC
    # compile test, which reads _source) imports where only NVRTC is installed.
    import cupy.cublas
    return cupy.cublas.gemm(*args, **kwargs)


def matmul_forward(out, inp, weight, bias):
    # out (N, OC), inp (N, C), weight (OC, C), bias (OC,) or None
    _f32(out, inp, weight, bias)
    _gemm("N", "T", inp, weight, out=out)
    if bias is not None:
        out += bias


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, acc=True):
    # dinp = dout @ W (N, C);  dW (+)= dout^T @ inp (OC, C);  db (+)= sum_n dout (OC,)
    _f32(dinp, dweight, dbias, dout, inp, weight)
    if dinp is not None:
        _gemm("N", "N", dout, weight, out=dinp)
    _gemm("T", "N", dout, inp, out=dweight, beta=1.0 if acc else 0.0)
    if dbias is not None:
        if acc:
            dbias += dout.sum(axis=0)
        else:
            cupy.sum(dout, axis=0, out=dbias)


# ----------------------------------------------------------------------------
# attention: causal multi-head self-attention from the fused qkv projection.
# The batched-GEMM path: pre = q k^T (cuBLAS), softmax in place (our kernel),
# y = att v (cuBLAS). q, k, v are copied out of qkv into contiguous
# (B, NH, T, hs) arrays first (cuBLAS batches need one stride per batch).

def _split_heads(x, B, T, NH):
    # (B, T, 3C) -> three (B, NH, T, hs) views
    hs = x.shape[-1] // (3 * NH)
    x = x.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def attention_forward(out, att, qkv, n_head):
    # out (B, T, C); att (B, NH, T, T) keeps the probabilities; qkv (B, T, 3C)
    _f32(out, att)
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = (cupy.ascontiguousarray(a) for a in _split_heads(qkv, B, T, n_head))
    cupy.matmul(q, k.swapaxes(-1, -2), out=att)
    _kernel("attention.cu", "attention_softmax_forward")(
        (_blocks(B * n_head * T, _BLOCK // 32),), (_BLOCK,), (att, f32(1.0 / math.sqrt(hs)),
                                                             i32(B * n_head * T), i32(T)))
    y = cupy.matmul(att, v)                                # (B, NH, T, hs)
    out.reshape(B, T, n_head, hs)[...] = y.transpose(0, 2, 1, 3)


def attention_backward(dqkv, dout, qkv, att, datt, n_head):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); att from the forward pass;
    # datt is scratch of att's shape. See cpu.attention_backward for the math:
    #   dv = att^T dy,  datt = dy v^T,  dpre = scale * att * (datt - rowsum(datt * att)),
    #   dq = dpre k,  dk = dpre^T q
    _f32(dqkv, dout, att, datt)
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = (cupy.ascontiguousarray(a) for a in _split_heads(qkv, B, T, n_head))
    dq, dk, dv = _split_heads(dqkv, B, T, n_head)
    dy = cupy.ascontiguousarray(dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))
    dv[...] = cupy.matmul(att.swapaxes(-1, -2), dy)
    cupy.matmul(dy, v.swapaxes(-1, -2), out=datt)
    _kernel("attention.cu", "attention_softmax_backward")(
        (_blocks(B * n_head * T, _BLOCK // 32),), (_BLOCK,), (datt, att, f32(1.0 / math.sqrt(hs)),
                                                             i32(B * n_head * T), i32(T)))
    dq[...] = cupy.matmul(datt, k)
    dk[...] = cupy.matmul(datt.swapaxes(-1, -2), q)


def attention_forward_cached(out, q, k, v, pos):
    # Inference only (see cpu.attention_forward_cached): t new queries against
    # the pos + t cached keys; query i sees keys s <= pos + i. Plain CuPy: this
    # is a sampling path, small next to the training step.
    t, hs = q.shape[-2], q.shape[-1]
    att = cupy.matmul(q, k.swapaxes(-1, -2))               # (B, NH, t, S)
    att *= f32(1.0 / math.sqrt(hs))
    if t > 1:
        mask = cupy.triu(cupy.ones((t, t), dtype=bool), k=1)
        att[..., :, pos:] = cupy.where(mask, f32(-np.inf), att[..., :, pos:])
    att -= att.max(axis=-1, keepdims=True)
    cupy.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    out[...] = cupy.matmul(att, v)


# ----------------------------------------------------------------------------
# gelu (tanh approximation) and residual: elementwise

def gelu_forward(out, inp):
    _f32(out, inp)
    _kernel("gelu.cu", "gelu_forward")((_blocks(inp.size),), (_BLOCK,), (out, inp, i64(inp.size)))


def gelu_backward(dinp, inp, dout, scratch):
    # dinp may be the same array as dout; scratch is unused (the kernel keeps
    # its temporaries in registers).
    _f32(dinp, inp, dout)
    _kernel("gelu.cu", "gelu_backward")((_blocks(inp.size),), (_BLOCK,), (dinp, inp, dout, i64(inp.size)))


def residual_forward(out, a, b):
    _f32(out, a, b)
    _kernel("residual.cu", "residual_forward")((_blocks(a.size),), (_BLOCK,), (out, a, b, i64(a.size)))


# ----------------------------------------------------------------------------
# fused classifier: softmax + cross-entropy; backward in place into the logits

_CE_BLOCK = 1024            # one block per row of 50257 logits: ~50 values per thread


def crossentropy_forward(losses, lse, logits, targets):
    # losses, lse (N,); logits (N, V); targets (N,) int
    _f32(losses, lse, logits)
    N, V = logits.shape
    _kernel("classifier.cu", "crossentropy_forward")(
        (N,), (_CE_BLOCK,), (losses, lse, logits, _ids64(targets), i32(N), i32(V)))


def crossentropy_backward(logits, lse, targets, dloss):
    # logits (N, V) become (softmax - onehot) * dloss, in place
    _f32(logits, lse)
    N, V = logits.shape
    _kernel("classifier.cu", "crossentropy_backward")(
        (N,), (_CE_BLOCK,), (logits, lse, _ids64(targets), f32(dloss), i32(N), i32(V)))


# ----------------------------------------------------------------------------
# optimizer pieces (see optim.py)

def sum_of_squares(x):
    """sum(x^2) over the whole array, as a Python float (this synchronizes)."""
    x = x.reshape(-1)
    _f32(x)
    nblocks = min(_NORM_BLOCKS, _blocks(x.size))
    partial = cupy.empty(nblocks, dtype=cupy.float32)
    out = cupy.empty(1, dtype=cupy.float64)
    _kernel("norm.cu", "sum_of_squares_partial")((nblocks,), (_BLOCK,), (partial, x, i64(x.size)))
    _kernel("norm.cu", "sum_of_squares_final")((1,), (32,), (out, partial, i32(nblocks)))
    return float(out[0])


_segment_tables: dict[tuple, tuple] = {}


def _segment_table(segments):
    """(seg_stop int64, seg_decay int32) on the device, made once per layout."""
    key = tuple(segments)
    if key not in _segment_tables:
        _segment_tables[key] = (cupy.asarray([stop for _, stop, _ in segments], dtype=cupy.int64),
                                cupy.asarray([1 if decay else 0 for _, _, decay in segments], dtype=cupy.int32))
    return _segment_tables[key]


def adamw_step_flat(param, grad, m, v, segments, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step over whole flat buffers in ONE kernel launch (the GPU
    has no cache to chunk for). `segments` is [(start, stop, decay), ...]
    covering param contiguously from 0; weight decay applies where decay is
    true. Same update as cpu.adamw_update, see kernels/adamw.cu."""
    _f32(param, grad, m, v)
    n = param.size
    if not segments or segments[0][0] != 0 or segments[-1][1] != n:
        raise ValueError(f"segments must cover [0, {n}) in order")
    seg_stop, seg_decay = _segment_table(segments)
    bc1 = 1.0 - beta1 ** step
    sqrt_bc2 = math.sqrt(1.0 - beta2 ** step)
    _kernel("adamw.cu", "adamw_update")(
        (_blocks(n),), (_BLOCK,),
        (param, grad, m, v, i64(n), seg_stop, seg_decay, i32(len(segments)),
         f32(1.0 - beta1), f32(1.0 - beta2), f32(lr * sqrt_bc2 / bc1), f32(eps * sqrt_bc2),
         f32(1.0 - lr * weight_decay), f32(grad_scale)))


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch, grad_scale=1.0):
    """cpu.adamw_update's signature on one flat chunk (scratch is unused)."""
    adamw_step_flat(param, grad, m, v, [(0, param.size, bool(weight_decay))], lr, beta1, beta2, eps,
                    weight_decay, step, grad_scale)
