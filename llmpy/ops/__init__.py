"""Backends: each implements the op contract of DESIGN.md section 2.

`cpu` is NumPy (the fp32 reference); `cuda` is hand-written CUDA kernels plus
cuBLASLt, imported only when asked for, so a CPU machine never needs CuPy.
"""
from __future__ import annotations

from ..errors import LlmpyError


def get_backend(device: str):
    if device == "cpu":
        from . import cpu
        return cpu
    if device == "cuda":
        try:
            from . import cuda  # noqa: F401  (not written yet on CPU-only sessions)
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
