"""Backends: each implements the op contract of llmpy/ops/contract.py (see
also ARCHITECTURE.md).

`cpu` is NumPy (the fp32 reference); `cuda` (a package) is hand-written CUDA
kernels plus cuBLASLt and cuDNN, imported only when asked for, so a CPU
machine never needs CuPy. `shared` is what both compute the same way;
`cuda_build` how the kernels are compiled (CuPy-free).
"""
from __future__ import annotations

from ..errors import LlmpyError


def get_backend(device: str):
    if device == "cpu":
        from . import cpu
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
