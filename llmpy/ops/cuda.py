"""CUDA backend: the op contract of DESIGN.md section 2 on the GPU, with CuPy.

Same functions, same signatures and the same gradient conventions as cpu.py
(the reference; read its docstring): out-parameter style, parameter gradients
overwritten when `acc=False` and added to when `acc=True`, layernorm_backward
ADDING into dinp. Arrays are cupy.ndarray; `xp = cupy` is what the model
allocates with.

Where the work is done:
- kernels/*.cu, our own CUDA C (one file per layer family), compiled at run
  time by NVRTC through cupy.RawModule for the GPU in use, and cached: the
  encoder, layernorm (and the residual add fused with it), gelu, residual,
  the softmax + cross-entropy classifier (forward, backward, or both in one
  pass), the attention softmax and head permutes, the bias gradient, AdamW
  (with clipping and the bf16 rounding) and the sum of squares;
- cuBLASLt for the matmuls (ops/cublaslt.py, through nvmath-python), with
  the bias, and GELU or its derivative for the fc layer, fused into the GEMM
  epilogue, a beta = 1 GEMM accumulating parameter gradients in place, and
  strided batched GEMMs for attention; without nvmath-python, cuBLAS through
  CuPy (cupy.cublas.gemm, cupy.matmul) and separate bias / GELU passes;
- cuDNN's flash attention for bf16 (ops/cudnn_attention.py), checked against
  our own attention once per shape at first use (attention_saved).

Nothing here allocates in the steady state on the cuBLASLt path (scratch
buffers are kept and reused), and nothing waits for the GPU except the
functions that return a Python number: what graph_step.py needs to capture
a whole training step as a CUDA graph.

Numerics. Two storage types, chosen per call by the arrays' dtype:
- float32 ("fp32"): fp32 storage and arithmetic. cuBLAS runs true fp32 GEMMs
  here (CuPy leaves TF32 off unless CUPY_TF32=1 is set), so results match the
  NumPy reference to ~1e-6 relative: only the order of additions differs.
- bfloat16 ("bf16", ml_dtypes.bfloat16 arrays): every kernel file is also
  compiled with -DLLMPY_BF16, which makes its `floatX` __nv_bfloat16: values
  are widened to float on load, all arithmetic and every sum is float, and
  each result is rounded once on store. Statistics (layernorm mean/rstd,
  logsumexp, losses, AdamW's m and v, the master weights) stay float32.
Every reduction in our kernels has a fixed order (no atomics, the encoder's
scatter-add included), so an fp32 run repeats bit for bit on the same GPU
(tests/test_cuda_ops.py checks it); cuDNN's attention backward (bf16) may
sum in a different order from run to run.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import cupy
import numpy as np

name = "cuda"
xp = cupy                   # the array module of this backend

_KERNELS = Path(__file__).parent / "kernels"
_BLOCK = 256                # threads per block for elementwise kernels
_LN_ROWS_PER_CHUNK = 32     # = LN_ROWS_PER_CHUNK in layernorm.cu
_NORM_BLOCKS = 1024         # stage-1 blocks of sum_of_squares (fixed: deterministic)
_BIAS_ROWS_PER_CHUNK = 64   # = BIAS_ROWS_PER_CHUNK in matmul.cu

# cuBLASLt through nvmath-python when it imports (LLMPY_CUBLASLT=0 turns it
# off, to compare); otherwise cuBLAS through CuPy. matmul_library says which.
_lt, matmul_library = None, "cublas (cupy)"
if os.environ.get("LLMPY_CUBLASLT", "1") != "0":
    try:
        from . import cublaslt as _lt
        matmul_library = "cublaslt (nvmath)"
    except Exception as e:      # ImportError, or an nvmath that does not match the CUDA install
        matmul_library = f"cublas (cupy); cuBLASLt unavailable: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------
# compiling and launching

_modules: dict[tuple[str, bool], cupy.RawModule] = {}


def _source(filename: str) -> str:
    """A kernel file with its `#include "common.cuh"` replaced by the header's
    text: NVRTC then needs no include path, and CuPy's on-disk cache, keyed by
    the source text, sees a change to the header as a change to the file."""
    common = (_KERNELS / "common.cuh").read_text()
    return (_KERNELS / filename).read_text().replace('#include "common.cuh"', common)


def _kernel(filename: str, kernel: str, bf16: bool = False) -> cupy.RawKernel:
    """Kernel `kernel` of kernels/`filename`, compiled once per process and
    storage type (and cached on disk by CuPy across processes). RawModule
    compiles for the current device's architecture."""
    mod = _modules.get((filename, bf16))
    if mod is None:
        options = ("-std=c++17",) + (("-DLLMPY_BF16",) if bf16 else ())
        mod = cupy.RawModule(code=_source(filename), options=options)
        _modules[(filename, bf16)] = mod
    return mod.get_function(kernel)


def _bf16_dtype():
    try:
        import ml_dtypes
    except ImportError:
        from ..errors import LlmpyError
        raise LlmpyError("--dtype bf16 needs the ml_dtypes package (pip install 'llmpy[cuda]')") from None
    return np.dtype(ml_dtypes.bfloat16)


def storage_dtype(dtype: str):
    """The array dtype for a model of precision `dtype` ("fp32" or "bf16")."""
    if dtype == "fp32":
        return np.float32
    if dtype == "bf16":
        return _bf16_dtype()
    from ..errors import LlmpyError
    raise LlmpyError(f"--dtype {dtype!r}: use fp32 or bf16")


def cast(dst, src):
    """dst = src (float32) rounded to dst's storage type, to nearest even
    (our kernel: the training path does not rely on CuPy's bf16 support)."""
    _f32(src)
    bf = _floatx(dst)
    _kernel("adamw.cu", "cast_to_storage", bf)((_blocks(src.size),), (_BLOCK,), (dst, src, i64(src.size)))


def _on_gpu(x) -> bool:
    """A CuPy array (False for the NumPy arrays the CPU tests stand in with)."""
    return type(x).__module__.startswith("cupy")


def zero(x):
    """x[...] = 0 for a contiguous array of any dtype, as a memset on the
    current stream (capturable; no dtype support needed from CuPy)."""
    if not x.flags.c_contiguous:
        raise ValueError(f"zero() needs a contiguous array, got strides {x.strides}")
    if not x.nbytes:
        return
    if _on_gpu(x):
        x.data.memset_async(0, x.nbytes)
    else:
        x[...] = 0


def to_host(x) -> np.ndarray:
    """x copied to a NumPy array (the NumPy arrays the CPU tests stand in with pass through)."""
    return x.get() if _on_gpu(x) else np.asarray(x)


def synchronize():
    """Wait for every kernel queued so far (kernels run asynchronously: time a
    step only after this)."""
    cupy.cuda.get_current_stream().synchronize()


# cuDNN flash attention for bf16, when the cuDNN frontend imports
# (LLMPY_CUDNN=0 turns it off); see ops/cudnn_attention.py and attention_saved.
_cudnn_att, attention_library = None, "batched GEMM + our softmax kernels"
if os.environ.get("LLMPY_CUDNN", "1") != "0":
    try:
        from . import cudnn_attention as _cudnn_att
    except Exception as e:      # no cudnn frontend, or no libcudnn
        attention_library += f" (cuDNN unavailable: {type(e).__name__}: {e})"


def _ptr(a) -> int:
    """The device address of an array's first element (for cuBLASLt)."""
    return a.data.ptr


def _stream() -> int:
    return cupy.cuda.get_current_stream().ptr


_scratch_buf = {}


def _scratch(n: int, dtype=np.float32, slot: str = "reduce"):
    """A work buffer of at least n elements of dtype, one per (slot, dtype),
    kept and grown as needed (the same memory every step: no allocation in
    the steady state, which CUDA graph capture needs)."""
    key = (slot, np.dtype(dtype).str)
    buf = _scratch_buf.get(key)
    if buf is None or buf.size < n:
        buf = _scratch_buf[key] = cupy.empty(max(n, 1), dtype=dtype)
    return buf[:n]


def _blocks(n: int, per_block: int = _BLOCK) -> int:
    return max(1, (n + per_block - 1) // per_block)


def _dense(a, dtypes):
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"expected a cupy.ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes or not a.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous {' or '.join(str(d) for d in dtypes)} array, got dtype "
                         f"{a.dtype}, shape {a.shape}, strides {a.strides}")


def _f32(*arrays):
    """Arrays a kernel reads as `float*`. Our kernels index raw pointers as dense
    row-major memory: check it, so a strided view fails loudly instead of
    being read wrongly."""
    for a in arrays:
        if a is not None:
            _dense(a, (np.dtype(np.float32),))


def _floatx(*arrays) -> bool:
    """Arrays a kernel reads as `floatX*`: all float32 or all bfloat16.
    Returns True for bfloat16 (the kernels' -DLLMPY_BF16 build)."""
    arrays = [a for a in arrays if a is not None]
    dtype = arrays[0].dtype
    bf16 = dtype != np.float32
    for a in arrays:
        _dense(a, (np.dtype(np.float32),) if not bf16 else (_bf16_dtype(),))
    return bf16


def _ids64(ids):
    """Token ids as a contiguous int64 device array (the kernels read long long)."""
    return cupy.ascontiguousarray(cupy.asarray(ids).reshape(-1), dtype=cupy.int64)


i32, i64, f32 = np.int32, np.int64, np.float32   # kernel scalar argument types


# ----------------------------------------------------------------------------
# encoder: out[b, t] = wte[ids[b, t]] + wpe[t]

def encoder_forward(out, ids, wte, wpe):
    # out (B, T, C), ids (B, T) int, wte (Vp, C), wpe (maxT, C)
    bf = _floatx(out, wte, wpe)
    B, T = ids.shape
    C = wte.shape[1]
    n = B * T * C
    _kernel("encoder.cu", "encoder_forward", bf)(
        (_blocks(n),), (_BLOCK,), (out, _ids64(ids), wte, wpe, i32(B * T), i32(T), i32(C)))


def host_sort(ids):
    """(sorted ids, order) for encoder_backward, computed on the host from host
    ids: positions sorted by (token id, position), a unique key, so the order
    of the sums does not depend on the sort. (The graph step does this on the
    CPU, where the batch comes from, instead of sorting on the GPU.)"""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    if flat.size and 0 <= flat.min() and flat.max() < 1 << 16:
        # a stable sort of the ids alone keeps equal ids in position order (the
        # same order as the unique key below); NumPy radix-sorts 16-bit keys
        order = np.argsort(flat.astype(np.uint16), kind="stable")
    else:
        order = np.argsort(flat * flat.size + np.arange(flat.size, dtype=np.int64), kind="stable")
    return flat[order], order


def encoder_backward(dwte, dwpe, dout, ids, acc=True, sorted_order=None):
    # dwte gets the scatter-add of dout's rows, dwpe the sum over the batch.
    # sorted_order: (sorted ids, order) as device int64 arrays (see host_sort),
    # else the sort is done here on the GPU.
    bf = _floatx(dwte, dwpe, dout)
    B, T, C = dout.shape
    N = B * T
    if not acc:
        zero(dwte)
        zero(dwpe[T:])
    _kernel("encoder.cu", "encoder_backward_wpe", bf)(
        (_blocks(T * C),), (_BLOCK,), (dwpe, dout, i32(B), i32(T), i32(C), i32(1 if acc else 0)))
    if sorted_order is not None:
        sorted_ids, order = sorted_order
    else:
        # Sort positions by token id; the key id * N + position is unique, so the
        # order (and with it the order of the sums) does not depend on the sort.
        flat = _ids64(ids)
        order = cupy.argsort(flat * N + cupy.arange(N, dtype=cupy.int64))
        sorted_ids = cupy.ascontiguousarray(flat[order])
    _kernel("encoder.cu", "encoder_backward_wte", bf)(
        (N,), (min(_BLOCK, 32 * _blocks(C, 32)),), (dwte, dout, sorted_ids, order, i32(N), i32(C)))


# ----------------------------------------------------------------------------
# layernorm: y = (x - mean) * rstd * w + b

def layernorm_forward(out, mean, rstd, inp, weight, bias):
    # out, inp (N, C); mean, rstd (N,); weight, bias (C,)
    _f32(mean, rstd)
    bf = _floatx(out, inp, weight, bias)
    C = inp.shape[-1]
    N = inp.size // C
    rows_per_block = _BLOCK // 32                         # one warp per row
    _kernel("layernorm.cu", "layernorm_forward", bf)(
        (_blocks(N, rows_per_block),), (_BLOCK,), (out, mean, rstd, inp, weight, bias, i32(N), i32(C)))


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias):
    # res = a + b (res may be a), out = layernorm(res); res, out, a, b (N, C)
    _f32(mean, rstd)
    bf = _floatx(res, out, a, b, weight, bias)
    C = a.shape[-1]
    N = a.size // C
    _kernel("layernorm.cu", "residual_layernorm_forward", bf)(
        (_blocks(N, _BLOCK // 32),), (_BLOCK,), (res, out, mean, rstd, a, b, weight, bias, i32(N), i32(C)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True):
    # dinp is ADDED to; scratch (2, N, C) float32 holds the column partial sums.
    _f32(mean, rstd, scratch)
    bf = _floatx(dinp, dweight, dbias, dout, inp, weight)
    C = inp.shape[-1]
    N = inp.size // C
    rows_per_block = _BLOCK // 32
    _kernel("layernorm.cu", "layernorm_backward_input", bf)(
        (_blocks(N, rows_per_block),), (_BLOCK,), (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)))
    nchunks = _blocks(N, _LN_ROWS_PER_CHUNK)
    partial_w, partial_b = scratch[0], scratch[1]         # each holds N*C >= nchunks*C floats
    _kernel("layernorm.cu", "layernorm_backward_params_partial", bf)(
        (_blocks(C), nchunks), (_BLOCK,), (partial_w, partial_b, dout, inp, mean, rstd, i32(N), i32(C)))
    _kernel("layernorm.cu", "layernorm_backward_params_final", bf)(
        (_blocks(C),), (_BLOCK,), (dweight, dbias, partial_w, partial_b, i32(nchunks), i32(C),
                                   i32(1 if acc else 0)))


# ----------------------------------------------------------------------------
# matmul: out = inp @ W^T + b, W stored (OC, C)
# cuBLASLt (ops/cublaslt.py) when nvmath-python is there; else _gemm, cuBLAS
# through CuPy (out = alpha op(a) op(b) + beta out: beta = 1 is gradient
# accumulation without a temporary).

def _gemm(transa, transb, a, b, out, alpha=1.0, beta=0.0):
    """out = alpha op(a) op(b) + beta out, op = transpose for "T"."""
    if out.dtype == np.float32:
        # cupy.cublas is a submodule `import cupy` does not load, and loading it
        # needs libcublas: imported on first use, so this module (and the NVRTC
        # compile test, which reads _source) imports where only NVRTC is installed.
        import cupy.cublas
        return cupy.cublas.gemm(transa, transb, a, b, out=out, alpha=alpha, beta=beta)
    # bf16: cuBLAS through cupy.matmul (bf16 in and out, fp32 accumulation).
    # A beta = 1 accumulation adds in float32 and rounds once.
    A = a.T if transa == "T" else a
    B = b.T if transb == "T" else b
    prod = cupy.matmul(A, B)
    if alpha != 1.0:
        prod = prod * np.float32(alpha)
    if beta:
        out[...] = out.astype(np.float32) * np.float32(beta) + prod.astype(np.float32)
    else:
        out[...] = prod
    return out


# Row-major tensors on a column-major BLAS: a row-major (R, C) buffer IS the
# column-major C x R matrix, its transpose. So out = inp @ W^T, read
# column-major, is out^T (OC x N) = W (OC x C) @ inp^T (C x N), where W is
# stored as the column-major C x OC matrix W^T (hence op "T", ld C) and inp^T
# is exactly inp's buffer (op "N", ld C). The backward products below are
# transcribed the same way.

def matmul_forward(out, inp, weight, bias, gelu_out=None):
    # out (N, OC), inp (N, C), weight (OC, C), bias (OC,) or None; with
    # gelu_out (N, OC): also gelu_out = gelu(out) (see cpu.matmul_forward)
    _floatx(out, inp, weight, bias, gelu_out)
    OC, C = weight.shape
    N = inp.size // C
    if _lt is None:
        _gemm("N", "T", inp, weight, out=out)
        if bias is not None:
            out += bias
        if gelu_out is not None:
            gelu_forward(gelu_out, out)
        return
    if gelu_out is not None and bias is not None and OC % 8 == 0:
        # (cuBLASLt wants the aux matrix's leading dimension a multiple of 8)
        # one pass: out = inp W^T + b kept as the epilogue's aux, gelu_out = gelu(out)
        _lt.gemm("T", "N", OC, N, C, _ptr(weight), C, _ptr(inp), C, _ptr(gelu_out), OC, out.dtype,
                 epilogue="gelu_aux_bias", bias=_ptr(bias), aux=_ptr(out), aux_ld=OC, stream=_stream())
        return
    _lt.gemm("T", "N", OC, N, C, _ptr(weight), C, _ptr(inp), C, _ptr(out), OC, out.dtype,
             epilogue="default" if bias is None else "bias", bias=0 if bias is None else _ptr(bias),
             stream=_stream())
    if gelu_out is not None:
        gelu_forward(gelu_out, out)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, acc=True, gelu_inp=None, gelu_scratch=None):
    # dinp = dout @ W (N, C);  dW (+)= dout^T @ inp (OC, C);  db (+)= sum_n dout (OC,)
    # With gelu_inp (N, C): dinp = (dout @ W) * gelu'(gelu_inp) (the DGELU epilogue).
    bf = _floatx(dinp, dweight, dbias, dout, inp, weight, gelu_inp)
    OC, C = weight.shape
    N = inp.size // C
    if _lt is None:
        if dinp is not None:
            _gemm("N", "N", dout, weight, out=dinp)
            if gelu_inp is not None:
                gelu_backward(dinp, gelu_inp, dinp, None)
        _gemm("T", "N", dout, inp, out=dweight, beta=1.0 if acc else 0.0)
    else:
        fuse_dgelu = gelu_inp is not None and C % 8 == 0    # aux leading dimension: a multiple of 8
        if dinp is not None:
            # dinp^T (C x N) = W^T (C x OC: W's buffer, op N, ld C) @ dout^T (OC x N: dout's buffer, ld OC)
            _lt.gemm("N", "N", C, N, OC, _ptr(weight), C, _ptr(dout), OC, _ptr(dinp), C, dinp.dtype,
                     epilogue="dgelu" if fuse_dgelu else "default",
                     aux=_ptr(gelu_inp) if fuse_dgelu else 0, aux_ld=C, stream=_stream())
            if gelu_inp is not None and not fuse_dgelu:
                gelu_backward(dinp, gelu_inp, dinp, None)
        # dW^T (C x OC) (+)= inp^T (C x N: inp's buffer, op N, ld C) @ dout (N x OC: dout's buffer, op T, ld OC)
        _lt.gemm("N", "T", C, OC, N, _ptr(inp), C, _ptr(dout), OC, _ptr(dweight), C, dweight.dtype,
                 beta=1.0 if acc else 0.0, stream=_stream())
    if dbias is not None:
        # our two-stage column sum: float32, fixed order (see matmul.cu)
        nchunks = _blocks(N, _BIAS_ROWS_PER_CHUNK)
        partial = _scratch(nchunks * OC)
        _kernel("matmul.cu", "bias_backward_partial", bf)(
            (_blocks(OC), nchunks), (_BLOCK,), (partial, dout, i32(N), i32(OC)))
        _kernel("matmul.cu", "bias_backward_final", bf)(
            (_blocks(OC),), (_BLOCK,), (dbias, partial, i32(nchunks), i32(OC), i32(1 if acc else 0)))


# ----------------------------------------------------------------------------
# attention: causal multi-head self-attention from the fused qkv projection.
# The batched-GEMM path: pre = q k^T (cuBLAS), softmax in place (our kernel),
# y = att v (cuBLAS). q, k, v are copied out of qkv into contiguous
# (B, NH, T, hs) arrays first (cuBLAS batches need one stride per batch).

def _bmm(a, b, out):
    """out = a @ b, batched over the leading axes (cuBLAS through cupy.matmul).
    In bf16 the product comes back in a new array and is rounded into out."""
    if out.dtype == np.float32:
        cupy.matmul(a, b, out=out)
    else:
        out[...] = cupy.matmul(a, b)
    return out


def _split_heads(x, B, T, NH):
    # (B, T, 3C) -> three (B, NH, T, hs) views
    hs = x.shape[-1] // (3 * NH)
    x = x.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


# With cuBLASLt: heads moved into the batch by our kernels into scratch
# buffers, then strided batched GEMMs over the B * NH (T, hs) matrices. The
# row-major products, transcribed for the column-major GEMM as in matmul:
#   pre = q k^T:   pre^T (T x T)  = k (op T, ld hs) . q^T (op N, ld hs)
#   y = att v:     y^T  (hs x T)  = v^T (op N, ld hs) . att^T (op N, ld T)
#   dv = att^T dy: dv^T (hs x T)  = dy^T (op N, ld hs) . att (op T, ld T)
#   datt = dy v^T: datt^T (T x T) = v (op T, ld hs) . dy^T (op N, ld hs)
#   dq = dpre k:   dq^T (hs x T)  = k^T (op N, ld hs) . dpre^T (op N, ld T)
#   dk = dpre^T q: dk^T (hs x T)  = q^T (op N, ld hs) . dpre (op T, ld T)

def _bgemm(transa, transb, m, n, k, a, lda, b, ldb, d, ldd, batch):
    """One strided batched product over `batch` contiguous matrices of each operand."""
    _lt.gemm(transa, transb, m, n, k, _ptr(a), lda, _ptr(b), ldb, _ptr(d), ldd, d.dtype, stream=_stream(),
             batch=batch, a_stride=a.size // batch, b_stride=b.size // batch, d_stride=d.size // batch)


def _heads(B, NH, T, hs, dtype, names):
    """(B, NH, T, hs) scratch tensors, one per name."""
    n = B * NH * T * hs
    return [_scratch(n, dtype, slot=name).reshape(B, NH, T, hs) for name in names]


def _attention_forward_lt(out, att, qkv, n_head, bf):
    B, T, C3 = qkv.shape
    NH, hs = n_head, C3 // (3 * n_head)
    n, BH = B * T * C3 // 3, B * n_head
    q, k, v, y = _heads(B, NH, T, hs, out.dtype, ("q", "k", "v", "y"))
    _kernel("attention.cu", "attention_split_heads", bf)(
        (_blocks(n),), (_BLOCK,), (q, k, v, qkv, i64(n), i32(T), i32(NH), i32(hs)))
    _bgemm("T", "N", T, T, hs, k, hs, q, hs, att, T, BH)
    _kernel("attention.cu", "attention_softmax_forward", bf)(
        (_blocks(BH * T, _BLOCK // 32),), (_BLOCK,), (att, f32(1.0 / math.sqrt(hs)), i32(BH * T), i32(T)))
    _bgemm("N", "N", hs, T, T, v, hs, att, T, y, hs, BH)
    _kernel("attention.cu", "attention_heads_bthd", bf)(
        (_blocks(n),), (_BLOCK,), (out, y, i64(n), i32(T), i32(NH), i32(hs), i32(1)))


def _attention_backward_lt(dqkv, dout, qkv, att, datt, n_head, bf):
    B, T, C3 = qkv.shape
    NH, hs = n_head, C3 // (3 * n_head)
    n, BH = B * T * C3 // 3, B * n_head
    q, k, v, dy = _heads(B, NH, T, hs, dout.dtype, ("q", "k", "v", "y"))
    dq, dk, dv = _heads(B, NH, T, hs, dout.dtype, ("dq", "dk", "dv"))
    _kernel("attention.cu", "attention_split_heads", bf)(
        (_blocks(n),), (_BLOCK,), (q, k, v, qkv, i64(n), i32(T), i32(NH), i32(hs)))
    _kernel("attention.cu", "attention_heads_bthd", bf)(
        (_blocks(n),), (_BLOCK,), (dout, dy, i64(n), i32(T), i32(NH), i32(hs), i32(0)))
    _bgemm("N", "T", hs, T, T, dy, hs, att, T, dv, hs, BH)
    _bgemm("T", "N", T, T, hs, v, hs, dy, hs, datt, T, BH)
    _kernel("attention.cu", "attention_softmax_backward", bf)(
        (_blocks(BH * T, _BLOCK // 32),), (_BLOCK,), (datt, att, f32(1.0 / math.sqrt(hs)), i32(BH * T), i32(T)))
    _bgemm("N", "N", hs, T, T, k, hs, datt, T, dq, hs, BH)
    _bgemm("N", "T", hs, T, T, q, hs, datt, T, dk, hs, BH)
    _kernel("attention.cu", "attention_merge_heads_qkv", bf)(
        (_blocks(n),), (_BLOCK,), (dqkv, dq, dk, dv, i64(n), i32(T), i32(NH), i32(hs)))


_cudnn_verdicts: dict = {}


def attention_saved(B, NH, T, hs, dtype):
    """What attention_forward keeps for the backward pass, for this shape and
    storage type: (shape, dtype) of `att`, and the shape of the scratch
    `datt`. The probabilities (B, NH, T, T) for our batched-GEMM path; with
    cuDNN flash attention (bf16 only) just the logsumexp of each row,
    (B, NH, T) float32, and no scratch."""
    if np.dtype(dtype) != np.float32 and _cudnn_att is not None and _cudnn_ok(B, NH, T, hs):
        return (B, NH, T), np.float32, (1,)
    return (B, NH, T, T), dtype, (B, NH, T, T)


def _cudnn_ok(B, NH, T, hs) -> bool:
    """Run cuDNN once on random data of this shape and compare it with our own
    path; any error or disagreement turns cuDNN off for the shape, saying why."""
    key = (B, NH, T, hs)
    if key not in _cudnn_verdicts:
        import sys
        bf16 = _bf16_dtype()
        C = NH * hs
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
        if not ok:
            print(f"llmpy: cuDNN attention off for B={B} NH={NH} T={T} hs={hs}: {why}; using batched GEMMs",
                  file=sys.stderr)
        _cudnn_verdicts[key] = ok
    return _cudnn_verdicts[key]


def attention_forward(out, att, qkv, n_head):
    # out (B, T, C); att keeps what the backward needs: (B, NH, T, T)
    # probabilities, or (B, NH, T) float32 row logsumexps for cuDNN (see
    # attention_saved); qkv (B, T, 3C)
    if att.ndim == 3:
        _floatx(out, qkv)
        _f32(att)
        B, T, C3 = qkv.shape
        _cudnn_att.forward(_ptr(out), _ptr(att), _ptr(qkv), B, n_head, T, C3 // (3 * n_head), _stream())
        return
    bf = _floatx(out, att, qkv)
    if _lt is not None:
        return _attention_forward_lt(out, att, qkv, n_head, bf)
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = (cupy.ascontiguousarray(a) for a in _split_heads(qkv, B, T, n_head))
    _bmm(q, k.swapaxes(-1, -2), att)
    _kernel("attention.cu", "attention_softmax_forward", bf)(
        (_blocks(B * n_head * T, _BLOCK // 32),), (_BLOCK,), (att, f32(1.0 / math.sqrt(hs)),
                                                             i32(B * n_head * T), i32(T)))
    y = _bmm(att, v, cupy.empty_like(v))                   # (B, NH, T, hs)
    out.reshape(B, T, n_head, hs)[...] = y.transpose(0, 2, 1, 3)


def attention_backward(dqkv, dout, qkv, att, datt, n_head, out=None):
    # dqkv (B, T, 3C) overwritten; dout (B, T, C); att from the forward pass;
    # datt is scratch of att's shape. See cpu.attention_backward for the math:
    #   dv = att^T dy,  datt = dy v^T,  dpre = scale * att * (datt - rowsum(datt * att)),
    #   dq = dpre k,  dk = dpre^T q
    if att.ndim == 3:     # cuDNN: recomputes the scores from q, k and the saved logsumexps
        _floatx(dqkv, dout, qkv, out)
        _f32(att)
        B, T, C3 = qkv.shape
        _cudnn_att.backward(_ptr(dqkv), _ptr(dout), _ptr(qkv), _ptr(out), _ptr(att), B, n_head, T,
                            C3 // (3 * n_head), _stream())
        return
    bf = _floatx(dqkv, dout, att, datt, qkv)
    if _lt is not None:
        return _attention_backward_lt(dqkv, dout, qkv, att, datt, n_head, bf)
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = (cupy.ascontiguousarray(a) for a in _split_heads(qkv, B, T, n_head))
    dq, dk, dv = _split_heads(dqkv, B, T, n_head)
    dy = cupy.ascontiguousarray(dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))
    dv[...] = _bmm(att.swapaxes(-1, -2), dy, cupy.empty_like(dy))
    _bmm(dy, v.swapaxes(-1, -2), datt)
    _kernel("attention.cu", "attention_softmax_backward", bf)(
        (_blocks(B * n_head * T, _BLOCK // 32),), (_BLOCK,), (datt, att, f32(1.0 / math.sqrt(hs)),
                                                             i32(B * n_head * T), i32(T)))
    dq[...] = _bmm(datt, k, cupy.empty_like(k))
    dk[...] = _bmm(datt.swapaxes(-1, -2), q, cupy.empty_like(q))


def attention_forward_cached(out, q, k, v, pos):
    # Inference only (see cpu.attention_forward_cached): t new queries against
    # the pos + t cached keys; query i sees keys s <= pos + i. Plain CuPy: this
    # is a sampling path, small next to the training step.
    t, hs = q.shape[-2], q.shape[-1]
    if q.dtype != np.float32:
        # bf16 model: this small computation in float32 (CuPy's bf16 support
        # covers fewer functions), rounded once into out
        q, k, v = (a.astype(np.float32) for a in (q, k, v))
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
    bf = _floatx(out, inp)
    _kernel("gelu.cu", "gelu_forward", bf)((_blocks(inp.size),), (_BLOCK,), (out, inp, i64(inp.size)))


def gelu_backward(dinp, inp, dout, scratch):
    # dinp may be the same array as dout; scratch is unused (the kernel keeps
    # its temporaries in registers).
    bf = _floatx(dinp, inp, dout)
    _kernel("gelu.cu", "gelu_backward", bf)((_blocks(inp.size),), (_BLOCK,), (dinp, inp, dout, i64(inp.size)))


def residual_forward(out, a, b):
    bf = _floatx(out, a, b)
    _kernel("residual.cu", "residual_forward", bf)((_blocks(a.size),), (_BLOCK,), (out, a, b, i64(a.size)))


# ----------------------------------------------------------------------------
# fused classifier: softmax + cross-entropy; backward in place into the logits

_CE_BLOCK = 1024            # one block per row of 50257 logits: ~50 values per thread


def _logits_shape(logits, V):
    """(bf16?, N, V, Vp) of (N, Vp) logits whose first V (default: all) columns are real."""
    bf = _floatx(logits)
    N, Vp = logits.shape
    return bf, N, Vp if V is None else V, Vp


def crossentropy_forward(losses, lse, logits, targets, V=None):
    # losses, lse (N,); logits (N, Vp) of which the first V columns are real; targets (N,) int
    _f32(losses, lse)
    bf, N, V, Vp = _logits_shape(logits, V)
    _kernel("classifier.cu", "crossentropy_forward", bf)(
        (N,), (_CE_BLOCK,), (losses, lse, logits, _ids64(targets), i32(N), i32(V), i32(Vp)))


def crossentropy_forward_backward(losses, lse, logits, targets, dloss, V=None):
    # crossentropy_forward, then crossentropy_backward, in one kernel (one pass over the logits)
    _f32(losses, lse)
    bf, N, V, Vp = _logits_shape(logits, V)
    _kernel("classifier.cu", "crossentropy_forward_backward", bf)(
        (N,), (_CE_BLOCK,), (losses, lse, logits, _ids64(targets), f32(dloss), i32(N), i32(V), i32(Vp)))


def crossentropy_backward(logits, lse, targets, dloss, V=None):
    # logits (N, Vp) become (softmax - onehot) * dloss in the first V columns, 0 after, in place
    _f32(lse)
    bf, N, V, Vp = _logits_shape(logits, V)
    _kernel("classifier.cu", "crossentropy_backward", bf)(
        (N,), (_CE_BLOCK,), (logits, lse, _ids64(targets), f32(dloss), i32(N), i32(V), i32(Vp)))


# ----------------------------------------------------------------------------
# optimizer pieces (see optim.py)

def _upload(dst, host):
    """Copy a small host array into a device buffer, in order on the current stream."""
    if _on_gpu(dst):
        dst.set(np.ascontiguousarray(host, dtype=dst.dtype), stream=cupy.cuda.get_current_stream())
    else:
        dst[...] = host


def sum_of_squares_into(x, out):
    """out[0] (a float64 device array) = sum(x^2), without waiting for it."""
    x = x.reshape(-1)
    bf = _floatx(x)
    nblocks = min(_NORM_BLOCKS, _blocks(x.size))
    partial = _scratch(nblocks, np.float32, slot="norm")
    _kernel("norm.cu", "sum_of_squares_partial", bf)((nblocks,), (_BLOCK,), (partial, x, i64(x.size)))
    _kernel("norm.cu", "sum_of_squares_final", bf)((1,), (32,), (out, partial, i32(nblocks)))


def accumulate_sum(acc, x, scale, first):
    """acc[0] (float64, device) = (0 if first else acc[0]) + scale * sum(x), x float32;
    nothing waits for it (see kernels/norm.cu)."""
    _f32(x)
    _kernel("norm.cu", "accumulate_sum")((1,), (1024,), (acc, x, i64(x.size), np.float64(scale),
                                                          i32(1 if first else 0)))


def sum_of_squares(x):
    """sum(x^2) over the whole array, as a Python float (this synchronizes)."""
    out = _scratch(1, np.float64, slot="norm_out")
    sum_of_squares_into(x, out)
    return float(out[0])


_segment_tables: dict[tuple, tuple] = {}


def _segment_table(segments):
    """(seg_stop int64, seg_decay int32) on the device, made once per layout."""
    key = tuple(segments)
    if key not in _segment_tables:
        _segment_tables[key] = (cupy.asarray([stop for _, stop, _ in segments], dtype=cupy.int64),
                                cupy.asarray([1 if decay else 0 for _, _, decay in segments], dtype=cupy.int32))
    return _segment_tables[key]


def adamw_step_flat(param, grad, m, v, segments, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
                    param_copy=None, sumsq=None, max_norm=-1.0, upload_hyper=True):
    """One AdamW step over whole flat buffers in ONE kernel launch (the GPU
    has no cache to chunk for). `segments` is [(start, stop, decay), ...]
    covering param contiguously from 0; weight decay applies where decay is
    true. Same update as cpu.adamw_update, see kernels/adamw.cu.

    param, m, v are float32. In bf16 training grad is bfloat16 and
    param_copy, the bf16 weights the forward pass reads, is rewritten from
    the updated float32 param with stochastic rounding (seeded by `step`:
    repeatable).

    With sumsq (a float64 device array holding the gradients' sum of
    squares) and max_norm >= 0, clipping happens in the kernel and a
    non-finite norm skips the update: nothing waits for the norm on the host
    (see kernels/adamw.cu, and graph_step.py which relies on it).
    upload_hyper=False launches the kernel without writing this step's
    hyperparameters to its device buffer: for a CUDA graph capture, which
    must not copy from the host; adamw_hyper() writes them before a replay."""
    _f32(param, m, v)
    bf = _floatx(grad, param_copy)
    if param_copy is None:
        if bf:
            raise ValueError("bf16 gradients need the bf16 param_copy to update")
        param_copy = param                     # fp32: the copy IS the parameters
    n = param.size
    if not segments or segments[0][0] != 0 or segments[-1][1] != n:
        raise ValueError(f"segments must cover [0, {n}) in order")
    seg_stop, seg_decay = _segment_table(segments)
    d_hyper = _scratch(6, np.float32, slot="adamw_hyper")
    if upload_hyper:
        adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale, max_norm if sumsq is not None else -1.0)
    if sumsq is None:
        sumsq = _scratch(1, np.float64, slot="norm_out")           # not read (max_norm < 0)
    _kernel("adamw.cu", "adamw_update", bf)(
        (_blocks(n),), (_BLOCK,),
        (param, param_copy, grad, m, v, i64(n), seg_stop, seg_decay, i32(len(segments)),
         f32(1.0 - beta1), f32(1.0 - beta2), d_hyper, sumsq))


def adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0, max_norm=-1.0):
    """Write step `step`'s AdamW hyperparameters to the device buffer the
    kernel reads (see kernels/adamw.cu). The host computes them once, in
    double, 1 - b1 and 1 - b2 included, so they round to float as the NumPy
    reference's do."""
    bc1 = 1.0 - beta1 ** step
    sqrt_bc2 = math.sqrt(1.0 - beta2 ** step)
    hyper = np.array([lr * sqrt_bc2 / bc1, eps * sqrt_bc2, 1.0 - lr * weight_decay, grad_scale,
                      max_norm, 0.0], dtype=np.float32)
    hyper[5:6].view(np.uint32)[0] = step & 0xFFFFFFFF               # the seed, as a float's bits
    _upload(_scratch(6, np.float32, slot="adamw_hyper"), hyper)


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch, grad_scale=1.0):
    """cpu.adamw_update's signature on one flat chunk (scratch is unused)."""
    adamw_step_flat(param, grad, m, v, [(0, param.size, bool(weight_decay))], lr, beta1, beta2, eps,
                    weight_decay, step, grad_scale)
