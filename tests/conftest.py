"""GPU tests (marked `gpu`) are skipped, with the reason, where there is no
usable NVIDIA GPU or no CuPy; `pytest -m gpu` on a GPU machine runs them.

CuPy is imported only if some collected test is marked `gpu`, so the CPU
suite never loads it."""
from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason():
    """None when CuPy can run kernels on a GPU here, else why not."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        return f"needs CuPy (pip install 'llmpy[cuda]'): {type(e).__name__}: {e}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, driver too old, ...
        return f"no usable NVIDIA GPU: {type(e).__name__}: {e}"
    if n == 0:
        return "no NVIDIA GPU found"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=reason)
        for item in gpu_items:
            item.add_marker(skip)
