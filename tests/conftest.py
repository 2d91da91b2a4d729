"""GPU tests (marked `gpu`) are skipped, with the reason, where there is no
usable NVIDIA GPU or no CuPy; `pytest -m gpu` on a GPU machine runs them.

CuPy is imported only if some collected test is marked `gpu`, so the CPU
suite never loads it.

A test that runs past LLMPY_TEST_LIMIT seconds (default 900) ends the whole
run at once with every thread's stack: a hang (a deadlocked worker process,
a wait without a timeout) then fails CI in minutes, saying where, instead of
running into CI's own limit with nothing to show."""
from __future__ import annotations

import faulthandler
import functools
import os
import sys
import threading

import pytest

TEST_LIMIT_S = float(os.environ.get("LLMPY_TEST_LIMIT", "900"))


@pytest.fixture(autouse=True)
def _hang_watchdog(request):
    def hung():
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)     # the real stderr, not the test's capture
        print(f"\n{request.node.nodeid} ran past {TEST_LIMIT_S:.0f} s (LLMPY_TEST_LIMIT): "
              "stopping the test run; the stacks of every thread follow", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(3)
    timer = threading.Timer(TEST_LIMIT_S, hung)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


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
