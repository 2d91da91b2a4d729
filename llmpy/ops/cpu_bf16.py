"""The NumPy backend with bf16 matmuls: `--device cpu --dtype bf16`.

Mixed precision as on the GPU: the fp32 master weights (`model.params`) are
what AdamW updates and checkpoints save; the ops read `model.compute_params`,
a bfloat16 copy of them that AdamW rewrites chunk by chunk. Unlike the GPU
path, activations and gradients stay float32: only the matmuls take bf16
inputs (Intel MKL's cblas_gemm_bf16bf16f32, AMX tiles where the CPU has them,
ops/mkl.py), with float32 accumulation and float32 outputs. Everything else
is cpu.py's fp32 code unchanged; the ops that read a weight vector
(layernorm's, a bias, an embedding row) read it from the bf16 copy and widen
it to float32 first, which costs little (vectors of C, rows of N).

Each matmul rounds its float32 inputs to bf16 (nearest even) into scratch
kept per shape, then runs as row blocks on the backend's thread pool, each a
sequential MKL call (no OpenMP runtime beside NumPy's OpenBLAS):
    forward   out  (N, OC) = bf16(inp) (N, C) @ W^T          rows of N split
    backward  dinp (N, C)  = bf16(dout) (N, OC) @ W          rows of N split
              dW   (OC, C) (+)= bf16(dout)^T @ bf16(inp)     rows of OC split
The bias gradient and the fused GELU are cpu.py's, in float32.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from . import cpu, cpu_parallel, mkl
from .cpu import (  # noqa: F401  (the ops that read no weight: the fp32 code as it is)
    LN_EPS, adamw_update, attention_backward, attention_forward, attention_forward_cached, attention_saved, cast,
    crossentropy_backward, crossentropy_forward, crossentropy_forward_backward, embedding_backward,
    encoder_backward, gelu_backward, gelu_forward, gqa_attention_backward, gqa_attention_forward,
    ln_scratch_rows_per_chunk, needs_gelu_scratch, residual_forward, rope_backward, rope_forward,
    sum_of_squares, swiglu_backward, swiglu_forward, synchronize, to_host, xp, zero)

name = "cpu"
BF16 = np.dtype(ml_dtypes.bfloat16)


def _check():
    """LlmpyError (one line, how to install) if MKL cannot be loaded; the
    line to print, or None, about this CPU."""
    mkl.library()
    if mkl.cpu_has_amx_bf16():
        return None
    return ("note: this CPU has no AMX-BF16, so MKL's bf16 GEMM runs slower than fp32 here "
            "(bench/RESULTS.md); --dtype bf16 pays on Intel Xeon 4th generation and later")


def storage_dtype(dtype: str):
    """Activations and gradients: float32 in both precisions here."""
    return cpu.storage_dtype("fp32")


def params_dtype(dtype: str):
    """What the ops read the weights as: the bf16 copy."""
    return BF16


def _f32(w):
    return None if w is None else w.astype(np.float32)


# ----------------------------------------------------------------------------
# the ops that read weights: the bf16 weight widened, then cpu.py's fp32 op

def encoder_forward(out, ids, wte, wpe):
    T = ids.shape[1]
    out[...] = wte[ids]                 # the gathered rows, widened as they are written
    out += _f32(wpe[:T])


def embedding_forward(out, ids, wte):
    out[...] = wte[ids]


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    cpu.layernorm_forward(out, mean, rstd, inp, _f32(weight), _f32(bias))


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias):
    cpu.residual_layernorm_forward(res, out, mean, rstd, a, b, _f32(weight), _f32(bias))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True):
    cpu.layernorm_backward(dinp, dweight, dbias, dout, inp, _f32(weight), mean, rstd, scratch, acc=acc)


def rmsnorm_forward(out, rstd, inp, weight, eps):
    cpu.rmsnorm_forward(out, rstd, inp, _f32(weight), eps)


def residual_rmsnorm_forward(res, out, rstd, a, b, weight, eps):
    cpu.residual_rmsnorm_forward(res, out, rstd, a, b, _f32(weight), eps)


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch, acc=True):
    cpu.rmsnorm_backward(dinp, dweight, dout, inp, _f32(weight), rstd, scratch, acc=acc)


# ----------------------------------------------------------------------------
# matmul: out = inp @ W^T + b with bf16 inputs, fp32 accumulation and output

_scratch = {}       # (which, shape) -> bf16 buffer, reused from step to step


def _as_bf16(x, which: str):
    """x (float32, 2-D) rounded to bf16 in a buffer kept for its shape."""
    if x.dtype == BF16:
        return x
    buf = _scratch.get((which, x.shape))
    if buf is None:
        buf = _scratch[(which, x.shape)] = np.empty(x.shape, BF16)

    def rows(lo, hi):
        buf[lo:hi] = x[lo:hi]           # the cast loop releases the GIL: row blocks on every core
    cpu_parallel.for_row_blocks(rows, *x.shape)
    return buf


def _matmul(out, a, b, beta=0.0):
    """out = a @ b + beta out: bf16 views a, b, float32 out; MKL, one block
    of out's rows per thread (cpu_parallel.for_gemm_blocks)."""
    cpu_parallel.for_gemm_blocks(lambda rows, cols: mkl.matmul(out[rows, cols], a[rows], b[:, cols], beta),
                                 *out.shape, a.shape[1], by_rows=True)


def matmul_forward(out, inp, weight, bias, gelu_out=None):
    # out (N, OC), inp (N, C), weight (OC, C) bf16, bias (OC,) bf16 or None
    a = _as_bf16(inp, "inp")
    _matmul(out, a, weight.T)
    if bias is not None:
        out += _f32(bias)
    if gelu_out is not None:
        gelu_forward(gelu_out, out)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, acc=True, gelu_inp=None, gelu_scratch=None):
    # dinp = dout @ W (N, C);  dW (+)= dout^T @ inp (OC, C);  db (+)= sum_n dout (OC,)
    d16 = _as_bf16(dout, "dout")
    if dinp is not None:
        _matmul(dinp, d16, weight)
        if gelu_inp is not None:
            gelu_backward(dinp, gelu_inp, dinp, gelu_scratch)
    x16 = _as_bf16(inp, "inp")
    _matmul(dweight, d16.T, x16, 1.0 if acc else 0.0)
    if dbias is not None:
        if acc:
            dbias += dout.sum(axis=0)
        else:
            np.sum(dout, axis=0, out=dbias)
