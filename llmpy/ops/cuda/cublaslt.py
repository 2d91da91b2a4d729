"""Matrix multiplies through cuBLASLt on raw device pointers (nvmath.bindings.cublasLt).

Why cuBLASLt and not cupy.matmul: its epilogues fuse what would otherwise be
extra passes over memory (the bias add, GELU and its derivative), it takes
raw pointers and a fixed workspace, so nothing is allocated per call (which a
CUDA graph capture requires), and the plan (descriptors and the algorithm
its heuristic picks) is made once per shape and reused.

The interface is BLAS's, column-major, so that this file is only a careful
transcription of the C API; matmul.py and attention.py beside it map our
row-major tensors onto it:

    D (m x n, leading dimension ldd) = op(A) (m x k) @ op(B) (k x n) [+ beta * D]

with op(X) = X for "N" and X^T for "T", A stored lda-strided, B ldb-strided,
repeated `batch` times with A, B and D advanced by a_stride, b_stride and
d_stride elements each time (strided batched GEMM), and then the epilogue on D:

    "default"        nothing
    "bias"           D += bias (a length-m vector, added to every column)
    "gelu_aux_bias"  aux = D + bias; D = gelu(aux)     (aux m x n, ld aux_ld)
    "dgelu"          D = D * gelu'(aux)                (aux: the pre-gelu values)
    "bgradb"         bias = sum over k of op(B), a float32 vector of length n
                     (CUBLASLT_EPILOGUE_BGRADB: one value per column of D,
                     written, not added; D is the product as usual)

Numerics: float32 compute (CUBLAS_COMPUTE_32F, no TF32) for both storage
types: bf16 inputs and outputs with float32 accumulation, or float32 all
through (matching the NumPy reference). `tf32 = True` (matmul.use_tf32,
`llmpy train --tf32`) lets float32 GEMMs planned from then on round their
inputs to TF32 on the tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32).

A heuristic that finds no algorithm (an epilogue the library has no kernel
for at this shape and type: fp32 GELU epilogues on some GPUs) raises
NoAlgorithm, once per plan: the caller then takes the unfused path.
"""
from __future__ import annotations

import numpy as np

from nvmath.bindings import cublasLt as lt

CUDA_R_32F, CUDA_R_16BF = 0, 14          # cudaDataType_t
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77   # cublasComputeType_t
OPS = {"N": 0, "T": 1}                    # cublasOperation_t
EPILOGUES = {"default": lt.Epilogue.DEFAULT, "bias": lt.Epilogue.BIAS,
             "gelu_aux_bias": lt.Epilogue.GELU_AUX_BIAS, "dgelu": lt.Epilogue.DGELU,
             "bgradb": lt.Epilogue.BGRADB}
WORKSPACE_BYTES = 32 << 20                # cuBLASLt's recommendation for Hopper
tf32 = False                              # float32 storage: TF32 tensor cores (set before the plans are made)


class NoAlgorithm(RuntimeError):
    """cuBLASLt's heuristic has no algorithm for this GEMM and epilogue."""


def _dtype_code(dtype) -> int:
    return CUDA_R_32F if np.dtype(dtype) == np.float32 else CUDA_R_16BF


class _State:
    handle = None
    workspace = None           # one fixed buffer, shared by every call (calls are serial on a stream)
    plans: dict = {}           # key -> (desc, adesc, bdesc, ddesc, heuristic result), or None: no algorithm
    scalars: dict = {}         # (alpha, beta) -> float32 host array kept alive


def _init():
    import cupy
    if _State.handle is None:
        _State.handle = lt.create()
        _State.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)


def _set(setter, dtype_of, obj, attr, value):
    """Set one attribute through a host buffer of the type cuBLASLt expects."""
    buf = np.array([value], dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.nbytes)


def _alignment(ptr: int) -> int:
    """The largest power of two (up to 256) dividing the address."""
    return min(256, ptr & -ptr) if ptr else 256


def _layout(t, rows, cols, ld, batch, stride):
    layout = lt.matrix_layout_create(t, rows, cols, ld)
    if batch > 1:
        L = lt.MatrixLayoutAttribute
        set_layout = lambda attr, v: _set(lt.matrix_layout_set_attribute,  # noqa: E731
                                          lt.get_matrix_layout_attribute_dtype, layout, attr, v)
        set_layout(L.BATCH_COUNT, batch)
        set_layout(L.STRIDED_BATCH_OFFSET, stride)
    return layout


def _plan(transa, transb, m, n, k, lda, ldb, ldd, dtype, epilogue, aux_ld, aligns, batch, strides):
    fast = tf32 and np.dtype(dtype) == np.float32
    key = (transa, transb, m, n, k, lda, ldb, ldd, np.dtype(dtype).str, epilogue, aux_ld, aligns, batch, strides,
           fast)
    if key in _State.plans:
        plan = _State.plans[key]
        if plan is None:
            raise NoAlgorithm(f"cuBLASLt has no algorithm for {key}")
        return plan
    A = lt.MatmulDescAttribute
    t = _dtype_code(dtype)
    desc = lt.matmul_desc_create(CUBLAS_COMPUTE_32F_FAST_TF32 if fast else CUBLAS_COMPUTE_32F, CUDA_R_32F)
    set_desc = lambda attr, v: _set(lt.matmul_desc_set_attribute,  # noqa: E731
                                    lt.get_matmul_desc_attribute_dtype, desc, attr, v)
    set_desc(A.TRANSA, OPS[transa])
    set_desc(A.TRANSB, OPS[transb])
    set_desc(A.EPILOGUE, int(EPILOGUES[epilogue]))
    if epilogue in ("gelu_aux_bias", "dgelu"):
        set_desc(A.EPILOGUE_AUX_LD, aux_ld)
    if epilogue == "bgradb":
        # the bias gradient in float32 whatever the storage: matmul.py adds it
        # into dbias (or writes it) with one rounding, as our own kernel does
        set_desc(A.BIAS_DATA_TYPE, CUDA_R_32F)
    # layouts of A, B and D as stored (before op): rows x cols, column-major
    a_stride, b_stride, d_stride = strides
    adesc = _layout(t, m if transa == "N" else k, k if transa == "N" else m, lda, batch, a_stride)
    bdesc = _layout(t, k if transb == "N" else n, n if transb == "N" else k, ldb, batch, b_stride)
    ddesc = _layout(t, m, n, ldd, batch, d_stride)
    pref = lt.matmul_preference_create()
    P = lt.MatmulPreferenceAttribute
    set_pref = lambda attr, v: _set(lt.matmul_preference_set_attribute,  # noqa: E731
                                    lt.get_matmul_preference_attribute_dtype, pref, attr, v)
    set_pref(P.MAX_WORKSPACE_BYTES, WORKSPACE_BYTES)
    # The heuristic assumes 256-byte aligned matrices unless told otherwise;
    # our operands are views into flat buffers (one layer's weights, one
    # layer's activations), so say how aligned they really are.
    a_align, b_align, d_align = aligns
    set_pref(P.MIN_ALIGNMENT_A_BYTES, a_align)
    set_pref(P.MIN_ALIGNMENT_B_BYTES, b_align)
    set_pref(P.MIN_ALIGNMENT_C_BYTES, d_align)
    set_pref(P.MIN_ALIGNMENT_D_BYTES, d_align)
    result = lt.MatmulHeuristicResult(1)
    found = np.zeros(1, dtype=np.int32)
    # The pointer attributes (bias, aux) are set per call: the heuristic
    # depends on the epilogue's kind, not on the addresses.
    try:
        lt.matmul_algo_get_heuristic(_State.handle, desc, adesc, bdesc, ddesc, ddesc, pref, 1, result.ptr,
                                     found.ctypes.data)
    except lt.cuBLASLtError:        # CUBLAS_STATUS_NOT_SUPPORTED: no heuristic for this configuration
        found[0] = 0
    lt.matmul_preference_destroy(pref)
    if found[0] == 0:
        lt.matmul_desc_destroy(desc)
        for layout in (adesc, bdesc, ddesc):
            lt.matrix_layout_destroy(layout)
        _State.plans[key] = None                 # asked once: the next call goes straight to the fallback
        raise NoAlgorithm(f"cuBLASLt has no algorithm for {key}")
    plan = (desc, adesc, bdesc, ddesc, result)
    _State.plans[key] = plan
    return plan


def gemm(transa, transb, m, n, k, a, lda, b, ldb, d, ldd, dtype, beta=0.0, epilogue="default",
         bias=0, aux=0, aux_ld=0, stream=0, batch=1, a_stride=0, b_stride=0, d_stride=0):
    """D = op(A) op(B) [+ beta D], then the epilogue; see the module docstring.
    a, b, d, bias, aux are device pointers (ints); stream a cudaStream_t."""
    _init()
    aligns = (_alignment(a), _alignment(b), _alignment(d))
    desc, adesc, bdesc, ddesc, result = _plan(transa, transb, m, n, k, lda, ldb, ldd, dtype, epilogue, aux_ld,
                                              aligns, batch, (a_stride, b_stride, d_stride))
    A = lt.MatmulDescAttribute
    set_desc = lambda attr, v: _set(lt.matmul_desc_set_attribute,  # noqa: E731
                                    lt.get_matmul_desc_attribute_dtype, desc, attr, v)
    if epilogue in ("bias", "gelu_aux_bias", "bgradb"):
        set_desc(A.BIAS_POINTER, bias)
    if epilogue in ("gelu_aux_bias", "dgelu"):
        set_desc(A.EPILOGUE_AUX_POINTER, aux)
    scal = _State.scalars.get(beta)
    if scal is None:
        scal = _State.scalars[beta] = np.array([1.0, beta], dtype=np.float32)   # alpha, beta
    lt.matmul(_State.handle, desc, scal.ctypes.data, a, adesc, b, bdesc, scal.ctypes.data + 4, d, ddesc,
              d, ddesc, result.ptr, _State.workspace.data.ptr, WORKSPACE_BYTES, stream)
