"""How the CUDA backend's kernels are built: the sources and the options.

Every compiler of our CUDA C reads its recipe here: NVRTC at run time
(llmpy/ops/cuda/runtime.py), nvcc and NVRTC in tests/test_kernels_compile.py,
and g++ through tests/cudasim (which receives the same options). This module
imports nothing but the standard library and the contract, not CuPy, so the
compile tests run where CuPy is missing.

The constants that the Python side and the kernels must agree on (GPT-2's
numbers; chunk sizes that fix both a kernel's loop and the host's launch
grid) are defined once, below, and handed to the compiler as -D NAME=value:
a kernel file uses them without defining them, and refuses to compile
(#error) without them.
"""
from __future__ import annotations

from pathlib import Path

from . import contract

KERNEL_DIR = Path(__file__).parent / "cuda"      # *.cu, one per layer family, beside its .py; common.cuh

# The column sums behind the layernorm and bias gradients: stage 1 sums
# chunks of rows, one thread per column; stage 2 (common.cuh's
# column_sum_tile) adds the ceil(N / chunk) chunk sums with COLSUM_THREADS
# threads per 32 columns. At N = 65,536 (d12, B = 64) a chunk of 128 rows
# leaves 512 chunk sums: 16 per warp, then 32 warp totals; stage 1 still has
# 512 blocks per 256 columns to fill the GPU.
LN_ROWS_PER_CHUNK = 128     # layernorm.cu: rows per partial sum of dweight / dbias (stage 1)
BIAS_ROWS_PER_CHUNK = 128   # matmul.cu: rows per partial sum of a bias gradient (stage 1)
COLSUM_THREADS = 1024       # layernorm.cu, matmul.cu: the block of stage 2 (its shared array's size)
# layernorm.cu's fused backward keeps a row's C values in registers, this
# many per thread of a 256-thread block: C <= 2048 (GPT-2 up to d48, C = 1600)
LN_BWD_COLS_PER_THREAD = 8
ENCODER_SEGMENT = 128       # encoder.cu: sorted positions per block of the dwte scatter-add (pass 1)

DEFINES = {
    "LN_EPS": contract.LN_EPS,
    "LN_ROWS_PER_CHUNK": LN_ROWS_PER_CHUNK,
    "BIAS_ROWS_PER_CHUNK": BIAS_ROWS_PER_CHUNK,
    "COLSUM_THREADS": COLSUM_THREADS,
    "LN_BWD_COLS_PER_THREAD": LN_BWD_COLS_PER_THREAD,
    "ENCODER_SEGMENT": ENCODER_SEGMENT,
    "GELU_S": contract.GELU_S,
    "GELU_A": contract.GELU_A,
}


def _literal(value) -> str:
    """A C literal of the same value: ints as they are, floats as float
    literals (repr round-trips, `f`: the kernels compute in float)."""
    return str(value) if isinstance(value, int) else f"{float(value)!r}f"


def defines() -> list[str]:
    """-DNAME=value for every shared constant, in a fixed order."""
    return [f"-D{name}={_literal(value)}" for name, value in DEFINES.items()]


def options(bf16: bool = False) -> tuple[str, ...]:
    """The compiler options of every kernel file, for fp32 or bf16 storage
    (-DLLMPY_BF16 makes common.cuh's floatX __nv_bfloat16)."""
    return ("-std=c++17", *defines()) + (("-DLLMPY_BF16",) if bf16 else ())


def cu_files() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


def source(filename: str) -> str:
    """A kernel file with its `#include "common.cuh"` replaced by the header's
    text: NVRTC then needs no include path, and CuPy's on-disk cache, keyed by
    the source text, sees a change to the header as a change to the file."""
    common = (KERNEL_DIR / "common.cuh").read_text()
    return (KERNEL_DIR / filename).read_text().replace('#include "common.cuh"', common)
