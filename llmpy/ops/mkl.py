"""Intel MKL's bf16 GEMM, through ctypes: what `--device cpu --dtype bf16` multiplies with.

cblas_gemm_bf16bf16f32 computes C = alpha op(A) op(B) + beta C with A and B
in bfloat16 and C, the accumulation and alpha/beta in float32. On a CPU
with AMX-BF16 (Intel Xeon 4th generation and later) it runs on the tile
units: 2.7-5.8x NumPy's fp32 sgemm on GPT-2's shapes, 2 cores (bench/RESULTS.md).
Without AMX it still computes the same numbers, slower than fp32.

The library is the `mkl` wheel (pip install 'llmpy[cpu-bf16]'), which puts
libmkl_rt.so.3 in the environment's lib/ folder; a system MKL found by the
dynamic loader works too. MKL runs sequential here: the backend splits each
product into row blocks on its own thread pool (ops.cpu_parallel), so no
OpenMP runtime is loaded beside NumPy's OpenBLAS (or PyTorch's, in tests).

The fp32 CPU backend multiplies with MKL's sgemm too, on Intel CPUs
(ops/cpu.py's `_gemm`). Once these libraries are loaded, a PyTorch imported
into the same process binds its own MKL calls to them, thread counts
included, and runs on one thread; `llmpy bench --compare torch` therefore
times PyTorch in a child process of its own (bench.py).
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from ..errors import LlmpyError

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112      # CBLAS_LAYOUT, CBLAS_TRANSPOSE
_THREADING_SEQUENTIAL = 1                          # MKL_Set_Threading_Layer's MKL_THREADING_SEQUENTIAL
_INTERFACE_LP64 = 0                                # MKL_Set_Interface_Layer: 32-bit MKL_INT

INSTALL_HINT = "pip install 'llmpy[cpu-bf16]' (Intel MKL, x86-64 Linux)"

_lib = None


def _candidates():
    yield os.path.join(sys.prefix, "lib", "libmkl_rt.so.3")    # where the mkl wheel puts it
    yield "libmkl_rt.so.3"                                      # LD_LIBRARY_PATH, a system install
    yield "libmkl_rt.so.2"


def library():
    """The loaded libmkl_rt, set up sequential and LP64; LlmpyError if there is none."""
    global _lib
    if _lib is not None:
        return _lib
    errors = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise LlmpyError(f"--device cpu --dtype bf16 needs Intel MKL's bf16 GEMM, and libmkl_rt was not "
                         f"found ({errors[0]}); {INSTALL_HINT}")
    # Both must come before any other MKL call.
    lib.MKL_Set_Interface_Layer(_INTERFACE_LP64)
    lib.MKL_Set_Threading_Layer(_THREADING_SEQUENTIAL)
    f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    for fn in (lib.cblas_gemm_bf16bf16f32, lib.cblas_sgemm):
        fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        fn.restype = None
    _lib = lib
    return lib


def version() -> str:
    buf = ctypes.create_string_buffer(256)
    library().MKL_Get_Version_String(buf, 256)
    return buf.value.decode().strip()


def _cpuinfo(key: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_has_amx_bf16() -> bool:
    return "amx_bf16" in _cpuinfo("flags").split()


def intel_cpu() -> bool:
    """An Intel CPU: where the fp32 backend's "auto" takes MKL's sgemm (ops/cpu.py)."""
    return _cpuinfo("vendor_id") == "GenuineIntel"


def _leading(x) -> int:
    """The row stride of a 2-D row-major array (elements), checking that its rows are contiguous."""
    if x.ndim != 2 or (x.shape[1] > 1 and x.strides[1] != x.itemsize):
        raise ValueError(f"MKL GEMM needs rows of contiguous elements, got shape {x.shape} strides {x.strides}")
    return max(x.strides[0] // x.itemsize, x.shape[1], 1)


def gemm(c, a, b, trans_a: bool, trans_b: bool, beta: float = 0.0):
    """c = op(a) @ op(b) + beta c: a, b bfloat16 (cblas_gemm_bf16bf16f32) or
    float32 (cblas_sgemm) 2-D views, c float32; op(x) = x.T where trans_x.
    Strided views (a block of rows, a column slice of rows) are read in place
    through their leading dimensions."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if c.dtype != np.float32 or (a.shape[1] if trans_a else a.shape[0]) != m \
            or (b.shape[0] if trans_b else b.shape[1]) != n or (b.shape[1] if trans_b else b.shape[0]) != k \
            or a.dtype != b.dtype:
        raise ValueError(f"gemm shapes: c {c.shape} {c.dtype}, a {a.shape}{'^T' if trans_a else ''} {a.dtype}, "
                         f"b {b.shape}{'^T' if trans_b else ''} {b.dtype}")
    if m == 0 or n == 0:
        return
    lib = library()
    fn = lib.cblas_sgemm if a.dtype == np.float32 else lib.cblas_gemm_bf16bf16f32
    fn(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k, 1.0,
       a.ctypes.data, _leading(a), b.ctypes.data, _leading(b), float(beta), c.ctypes.data, _leading(c))


def matmul(c, a, b, beta: float = 0.0):
    """c = a @ b + beta c for 2-D views as NumPy indexes them (a @ b, not
    op(a)): a view with contiguous columns instead of rows (x.T, a transposed
    weight or dout.T) is passed to MKL as the transpose of the array it views,
    so nothing is copied."""
    a, trans_a = _as_row_major(a)
    b, trans_b = _as_row_major(b)
    gemm(c, a, b, trans_a, trans_b, beta)


def _as_row_major(x):
    """(x, False) if x's rows are contiguous, (x.T, True) if its columns are."""
    if x.ndim == 2 and x.shape[1] > 1 and x.strides[1] != x.itemsize and x.strides[0] == x.itemsize:
        return x.T, True
    return x, False
