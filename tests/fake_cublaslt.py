"""A stand-in for llmpy/ops/cublaslt.py on the CPU: the same `gemm` call,
column-major BLAS semantics, computed with NumPy on the memory the pointers
address. Written from cuBLAS's definition, independently of how cuda.py
maps row-major tensors onto it, so a wrong transpose, leading dimension or
m/n/k in that mapping gives wrong numbers in tests/test_cuda_host.py.

D (m x n, ld ldd) = op(A) @ op(B) [+ beta D], float32 accumulation (batch
times, the pointers advanced by their strides), then
the epilogue ("bias": + bias per row of D; "gelu_aux_bias": aux = D + bias,
D = gelu(aux); "dgelu": D *= gelu'(aux)), rounded once into D's type;
"bgradb" (CUBLASLT_EPILOGUE_BGRADB, "apply bias gradient to the input matrix
B: the bias size corresponds to the number of columns of the matrix D, the
reduction happens over the GEMM's k dimension"): bias[j] = sum_k op(B)[k, j],
written (not added) as float32 (cublaslt.py sets BIAS_DATA_TYPE to
CUDA_R_32F), whatever beta does to D.
"""
from __future__ import annotations

import ctypes

import numpy as np

from llmpy.ops import cpu

calls = []      # (epilogue, m, n, k) of every call, for tests that check the fused paths ran
refuse = set()  # (epilogue, dtype name) pairs whose heuristic finds no algorithm (cublaslt.NoAlgorithm)
tf32 = False    # the real module's switch (matmul.use_tf32); the products here stay float32


class NoAlgorithm(RuntimeError):
    """As cublaslt.NoAlgorithm: no algorithm for this GEMM and epilogue."""


def _matrix(ptr, rows, cols, ld, dtype):
    """The column-major rows x cols matrix at ptr with leading dimension ld, as a writable view."""
    assert ptr, "null pointer"
    assert ld >= max(1, rows), f"leading dimension {ld} < rows {rows}"
    dtype = np.dtype(dtype)
    count = ld * (cols - 1) + rows
    flat = np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(dtype.itemsize, ld * dtype.itemsize))


def gemm(transa, transb, m, n, k, a, lda, b, ldb, d, ldd, dtype, beta=0.0, epilogue="default",
         bias=0, aux=0, aux_ld=0, stream=0, batch=1, a_stride=0, b_stride=0, d_stride=0):
    if (epilogue, np.dtype(dtype).name) in refuse:
        raise NoAlgorithm(f"no algorithm for epilogue {epilogue} on {np.dtype(dtype).name}")
    calls.append((epilogue, m, n, k))
    if batch > 1:       # strided batched: matrix i starts stride * i elements further on
        assert epilogue == "default", "the batched products here have no epilogue"
        size = np.dtype(dtype).itemsize
        for i in range(batch):
            gemm(transa, transb, m, n, k, a + i * a_stride * size, lda, b + i * b_stride * size, ldb,
                 d + i * d_stride * size, ldd, dtype, beta)
        return
    A = _matrix(a, m if transa == "N" else k, k if transa == "N" else m, lda, dtype)
    B = _matrix(b, k if transb == "N" else n, n if transb == "N" else k, ldb, dtype)
    D = _matrix(d, m, n, ldd, dtype)
    opA = A if transa == "N" else A.T
    opB = B if transb == "N" else B.T
    acc = opA.astype(np.float32) @ opB.astype(np.float32)
    if beta:
        acc += np.float32(beta) * D.astype(np.float32)
    if epilogue in ("bias", "gelu_aux_bias"):
        acc += _matrix(bias, m, 1, m, dtype).astype(np.float32)
    if epilogue == "bgradb":
        # from op(B) as stored, before any product: the (n,) column sums over k
        _matrix(bias, n, 1, n, np.float32)[:, 0] = opB.astype(np.float64).sum(axis=0).astype(np.float32)
    if epilogue == "gelu_aux_bias":
        _matrix(aux, m, n, aux_ld, dtype)[...] = acc
        pre = acc.copy()
        cpu.gelu_forward(acc, pre)
    elif epilogue == "dgelu":
        pre = np.ascontiguousarray(_matrix(aux, m, n, aux_ld, dtype).astype(np.float32))
        grad = acc.copy()
        cpu.gelu_backward(acc, pre, grad, np.empty_like(pre))
    else:
        assert epilogue in ("default", "bias", "bgradb"), epilogue
    D[...] = acc
