"""Backends: each implements the op contract of llmpy/ops/contract.py (see
also ARCHITECTURE.md).

`cpu` is NumPy (the fp32 reference); `cpu_bf16` the same with bf16 matmuls
(Intel MKL, `--device cpu --dtype bf16`); `cuda` (a package) is hand-written CUDA
kernels plus cuBLASLt and cuDNN, imported only when asked for, so a CPU
machine never needs CuPy. `shared` is what both compute the same way;
`cuda_build` how the kernels are compiled (CuPy-free).
"""
from __future__ import annotations

import sys

from ..errors import LlmpyError

_noted = set()


def _note_once(line: str):
    if line not in _noted:
        _noted.add(line)
        print(line, file=sys.stderr)


def get_backend(device: str, dtype: str = "fp32"):
    """The ops module for `device` and precision `dtype` (LlmpyError, one
    line, where it cannot run here)."""
    if device == "cpu" and dtype == "bf16":
        try:
            from . import cpu_bf16
        except ImportError as e:         # ml_dtypes
            raise LlmpyError(f"--device cpu --dtype bf16 is unavailable: {e}; pip install 'llmpy[cpu-bf16]'") from None
        note = cpu_bf16._check()         # MKL loads, or one line on how to install it
        if note:
            _note_once(note)
        return cpu_bf16
    if device == "cpu":
        from . import cpu
        if cpu.blas != "auto":
            cpu._mkl_module()            # LLMPY_CPU_BLAS misspelt, or =mkl without MKL: one line now
        return cpu
    if device == "cuda":
        try:
            from . import cuda  # noqa: F401  (imports CuPy)
        except ImportError as e:
            raise LlmpyError(f"--device cuda is unavailable: {e}; install the GPU extra "
                             "(pip install 'llmpy[cuda]') on a machine with an NVIDIA GPU") from None
        try:
            n = cuda.cupy.cuda.runtime.getDeviceCount()
        except Exception as e:      # no driver, a driver older than the CUDA runtime, ...
            raise LlmpyError(f"--device cuda: no usable NVIDIA GPU ({type(e).__name__}: {e}); "
                             "use --device cpu") from None
        if n == 0:
            raise LlmpyError("--device cuda: no NVIDIA GPU found; use --device cpu")
        return cuda
    raise LlmpyError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
