"""matmul: out = inp @ W^T + b, W stored (OC, C) as in llm.c; and its backward.

The products: cuBLASLt (cublaslt.py beside this file, through nvmath-python)
when it imports, with the bias, and GELU or its derivative for the fc layer,
fused into the GEMM epilogue, and a beta = 1 GEMM accumulating parameter
gradients in place; otherwise cuBLAS through CuPy (_gemm) and separate bias /
GELU passes. The choice is made once, here, at import (LLMPY_CUBLASLT=0
turns cuBLASLt off, to compare); `matmul_library` says which, and why.
Where cuBLASLt has no algorithm for a fused epilogue (cublaslt.NoAlgorithm:
an fp32 GELU epilogue, say), that product takes the unfused path: the plain
GEMM, then our bias and GELU kernels. The bias gradient comes from the
weight-gradient GEMM's BGRADB epilogue on the cuBLASLt path (it reads dout
anyway: no second pass over it), else from our column sum (matmul.cu).
use_tf32(True): float32 GEMMs on TF32 tensor cores.
"""
from __future__ import annotations

import os

import cupy
import numpy as np

from ..cuda_build import BIAS_ROWS_PER_CHUNK, COLSUM_THREADS
from .elementwise import gelu_backward, gelu_forward
from .runtime import BLOCK, WARP, blocks, check_floatx, i32, kernel, ptr, scratch, stream

lt, matmul_library = None, "cublas (cupy)"
if os.environ.get("LLMPY_CUBLASLT", "1") != "0":
    try:
        from . import cublaslt as lt
        matmul_library = "cublaslt (nvmath)"
    except Exception as e:      # ImportError, or an nvmath that does not match the CUDA install
        matmul_library = f"cublas (cupy); cuBLASLt unavailable: {type(e).__name__}: {e}"


def use_tf32(on: bool):
    """float32 storage: let the GEMMs planned from now on use TF32 tensor cores
    (`llmpy train --tf32`). cuBLASLt's compute type; on CuPy's cuBLAS path,
    CuPy's own switch (CUPY_TF32=1 in the environment before CuPy starts)."""
    if lt is not None:
        lt.tf32 = bool(on)


def _add_bias(out, bias, N, OC, bf):
    # out (N, OC) += bias (OC,), our kernel (the fused epilogue's fallback)
    kernel("matmul.cu", "bias_forward", bf)((blocks(N * OC),), (BLOCK,), (out, bias, i32(N), i32(OC)))


def _gemm(transa, transb, a, b, out, alpha=1.0, beta=0.0):
    """out = alpha op(a) op(b) + beta out, op = transpose for "T" (cuBLAS
    through CuPy: the path without cuBLASLt; beta = 1 is gradient
    accumulation without a temporary)."""
    if out.dtype == np.float32:
        # cupy.cublas is a submodule `import cupy` does not load, and loading it
        # needs libcublas: imported on first use, so this module imports where
        # only NVRTC is installed.
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
    bf = check_floatx(out, inp, weight, bias, gelu_out)
    OC, C = weight.shape
    N = inp.size // C
    if lt is None:
        _gemm("N", "T", inp, weight, out=out)
        if bias is not None:
            out += bias
        if gelu_out is not None:
            gelu_forward(gelu_out, out)
        return
    if gelu_out is not None and bias is not None and OC % 8 == 0:
        # (cuBLASLt wants the aux matrix's leading dimension a multiple of 8)
        # one pass: out = inp W^T + b kept as the epilogue's aux, gelu_out = gelu(out)
        try:
            lt.gemm("T", "N", OC, N, C, ptr(weight), C, ptr(inp), C, ptr(gelu_out), OC, out.dtype,
                    epilogue="gelu_aux_bias", bias=ptr(bias), aux=ptr(out), aux_ld=OC, stream=stream())
            return
        except lt.NoAlgorithm:
            pass                        # the same in three steps, below
    try:
        lt.gemm("T", "N", OC, N, C, ptr(weight), C, ptr(inp), C, ptr(out), OC, out.dtype,
                epilogue="default" if bias is None else "bias", bias=0 if bias is None else ptr(bias),
                stream=stream())
    except lt.NoAlgorithm:
        if bias is None:
            raise
        lt.gemm("T", "N", OC, N, C, ptr(weight), C, ptr(inp), C, ptr(out), OC, out.dtype, stream=stream())
        _add_bias(out, bias, N, OC, bf)
    if gelu_out is not None:
        gelu_forward(gelu_out, out)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, acc=True, gelu_inp=None, gelu_scratch=None):
    # dinp = dout @ W (N, C);  dW (+)= dout^T @ inp (OC, C);  db (+)= sum_n dout (OC,)
    # With gelu_inp (N, C): dinp = (dout @ W) * gelu'(gelu_inp) (the DGELU epilogue).
    bf = check_floatx(dinp, dweight, dbias, dout, inp, weight, gelu_inp)
    OC, C = weight.shape
    N = inp.size // C
    if lt is None:
        if dinp is not None:
            _gemm("N", "N", dout, weight, out=dinp)
            if gelu_inp is not None:
                gelu_backward(dinp, gelu_inp, dinp, None)
        _gemm("T", "N", dout, inp, out=dweight, beta=1.0 if acc else 0.0)
    else:
        fuse_dgelu = gelu_inp is not None and C % 8 == 0    # aux leading dimension: a multiple of 8
        if dinp is not None:
            # dinp^T (C x N) = W^T (C x OC: W's buffer, op N, ld C) @ dout^T (OC x N: dout's buffer, ld OC)
            if fuse_dgelu:
                try:
                    lt.gemm("N", "N", C, N, OC, ptr(weight), C, ptr(dout), OC, ptr(dinp), C, dinp.dtype,
                            epilogue="dgelu", aux=ptr(gelu_inp), aux_ld=C, stream=stream())
                except lt.NoAlgorithm:
                    fuse_dgelu = False      # the plain product, then our GELU-derivative kernel
            if not fuse_dgelu:
                lt.gemm("N", "N", C, N, OC, ptr(weight), C, ptr(dout), OC, ptr(dinp), C, dinp.dtype,
                        stream=stream())
            if gelu_inp is not None and not fuse_dgelu:
                gelu_backward(dinp, gelu_inp, dinp, None)
        # dW^T (C x OC) (+)= inp^T (C x N: inp's buffer, op N, ld C) @ dout (N x OC: dout's buffer, op T, ld OC).
        # op(B) is dout (N x OC), k = N: the BGRADB epilogue's column sums over
        # k are exactly dbias = sum_n dout[n, :], taken while the GEMM reads
        # dout anyway. It writes them (float32, into scratch); the contract's
        # acc then applies in bias_backward_final with one chunk.
        fused_bgrad = False
        if dbias is not None:
            grad32 = scratch(OC, slot="bias_grad")
            try:
                lt.gemm("N", "T", C, OC, N, ptr(inp), C, ptr(dout), OC, ptr(dweight), C, dweight.dtype,
                        beta=1.0 if acc else 0.0, epilogue="bgradb", bias=ptr(grad32), stream=stream())
                fused_bgrad = True
            except lt.NoAlgorithm:
                pass                        # the plain product, then our column sum
        if fused_bgrad:
            _bias_grad_final(dbias, grad32, 1, OC, acc, bf)
            return
        lt.gemm("N", "T", C, OC, N, ptr(inp), C, ptr(dout), OC, ptr(dweight), C, dweight.dtype,
                beta=1.0 if acc else 0.0, stream=stream())
    if dbias is not None:
        # our two-stage column sum: float32, fixed order (see matmul.cu)
        nchunks = blocks(N, BIAS_ROWS_PER_CHUNK)
        partial = scratch(nchunks * OC)
        kernel("matmul.cu", "bias_backward_partial", bf)(
            (blocks(OC), nchunks), (BLOCK,), (partial, dout, i32(N), i32(OC)))
        _bias_grad_final(dbias, partial, nchunks, OC, acc, bf)


def _bias_grad_final(dbias, partial, nchunks, OC, acc, bf):
    # dbias (+)= the column sums of partial (nchunks, OC) float32, rounded once
    kernel("matmul.cu", "bias_backward_final", bf)(
        (blocks(OC, WARP),), (COLSUM_THREADS,), (dbias, partial, i32(nchunks), i32(OC), i32(1 if acc else 0)))
