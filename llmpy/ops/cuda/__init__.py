"""CUDA backend: the op contract (llmpy/ops/contract.py) on the GPU, with CuPy.

Same functions, same signatures and the same gradient conventions as cpu.py
(the reference): out-parameter style, parameter gradients overwritten when
`acc=False` and added to when `acc=True`, layernorm_backward ADDING into
dinp. Arrays are cupy.ndarray; `xp = cupy` is what the model allocates with.

Where the work is done (one module per layer family, beside its kernels):
    runtime.py       compiling (NVRTC through cupy.RawModule, once, cached
                     kernel handles), scratch buffers, dtype checks, streams
    encoder.py       encoder.cu      embedding forward, deterministic scatter-add backward
    layernorm.py     layernorm.cu    layernorm, and the residual add fused with it
    rmsnorm.py       rmsnorm.cu      Llama's RMSNorm, and the residual add fused with it
    rope.py          rope.cu         Llama's rotary embedding, on the q, k heads where they lie
    matmul.py        matmul.cu       cuBLASLt (cublaslt.py) with fused epilogues, else
                                     cuBLAS through CuPy; our bias gradient kernel
    attention.py     attention.cu    softmax and head permutes between batched GEMMs, or
                                     cuDNN flash attention (cudnn_attention.py) for bf16;
                                     multi-head and grouped-query
    classifier.py    classifier.cu   softmax + cross-entropy, forward, backward, or both
    elementwise.py   gelu.cu, residual.cu, swiglu.cu
    optimizer.py     adamw.cu, norm.cu: AdamW (clipping, bf16 rounding), sums of squares
The kernels' compiler options, and the constants the Python side shares
with them (-D NAME=value), are llmpy/ops/cuda_build.py's.

Nothing here allocates in the steady state on the cuBLASLt path (scratch
buffers are kept and reused), and nothing waits for the GPU except the
functions that return a Python number: what llmpy/step.py needs to capture
a whole training step as a CUDA graph (`capturable`).

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

import cupy

from . import attention, matmul, runtime  # noqa: F401  (the submodules, for tests and tools)
from .attention import (attention_backward, attention_forward, attention_forward_cached,  # noqa: F401
                        attention_library, attention_saved, gqa_attention_backward, gqa_attention_forward)
from .classifier import crossentropy_backward, crossentropy_forward, crossentropy_forward_backward  # noqa: F401
from .elementwise import gelu_backward, gelu_forward, residual_forward, swiglu_backward, swiglu_forward  # noqa: F401
from .encoder import embedding_backward, embedding_forward, encoder_backward, encoder_forward, host_sort  # noqa: F401
from .layernorm import layernorm_backward, layernorm_forward, residual_layernorm_forward  # noqa: F401
from .matmul import matmul_backward, matmul_forward, matmul_library  # noqa: F401
from .optimizer import (accumulate_sum, adamw_hyper, adamw_step_flat, cast, sum_of_squares,  # noqa: F401
                        sum_of_squares_into)
from .rmsnorm import residual_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward  # noqa: F401
from .rope import rope_backward, rope_forward  # noqa: F401
from .runtime import params_dtype, storage_dtype, synchronize, to_host, upload, zero  # noqa: F401
from ..cuda_build import LN_ROWS_PER_CHUNK

name = "cuda"
xp = cupy                   # the array module of this backend

# A training step can be captured as a CUDA graph when nothing in it
# allocates or copies from the host per call: the cuBLASLt path (fixed
# workspace, scratch buffers), not CuPy's cuBLAS calls.
capturable = matmul.lt is not None

# How much scratch the backward's ops need here (model.Activations asks; the
# CPU reference needs the contract's shapes): layernorm_backward keeps only
# the column sums of each chunk of LN_ROWS_PER_CHUNK rows, (2, N / 128, C)
# float32 instead of (2, N, C), and matmul_backward's GELU derivative needs no
# gelu_scratch (the DGELU epilogue, or our kernel in place).
ln_scratch_rows_per_chunk = LN_ROWS_PER_CHUNK
needs_gelu_scratch = False
