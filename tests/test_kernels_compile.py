"""Every CUDA kernel file compiles, on a machine without a GPU.

- nvcc: each llmpy/ops/cuda/*.cu to a cubin for sm_90 (H100), once for fp32
  storage and once for bf16 storage (-DLLMPY_BF16), warnings as errors, with
  the -D constants the runtime passes (llmpy/ops/cuda_build.py). Skipped
  only where nvcc is not installed.
- NVRTC (what llmpy.ops.cuda uses at run time): the exact source and options
  that the runtime hands to cupy.RawModule (header inlined), for sm_90.
  Skipped where CuPy or the NVRTC library is missing. It compiles without a
  GPU or driver.
- a kernel file refuses to compile without its -D constants (no silent default).
- `import llmpy` and the CPU backend never import CuPy.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmpy.ops import cuda_build

CU_FILES = cuda_build.cu_files()
NVCC = shutil.which("nvcc")


def test_kernel_files_exist():
    names = {p.name for p in CU_FILES}
    for want in ("encoder.cu", "layernorm.cu", "gelu.cu", "residual.cu", "classifier.cu",
                 "attention.cu", "adamw.cu", "norm.cu", "matmul.cu", "rmsnorm.cu", "rope.cu", "swiglu.cu"):
        assert want in names


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu, bf16):
    cmd = [NVCC, *cuda_build.options(bf16), "-arch=sm_90", "-cubin", "-o", "/dev/null", "-Werror=all-warnings",
           str(cu)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", ["layernorm.cu", "matmul.cu", "gelu.cu"])
def test_constants_must_come_from_python(cu):
    # without the -D options the file must not compile (an #error), rather
    # than fall back to a value of its own that could drift from Python's
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-o", "/dev/null", str(cuda_build.KERNEL_DIR / cu)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "cuda_build.py" in r.stdout + r.stderr


def test_every_define_is_used():
    # each shared constant is read by some kernel file (no stale -D)
    code = "\n".join(cu.read_text() for cu in CU_FILES)
    for name in cuda_build.DEFINES:
        assert name in code, name


def _nvrtc():
    try:
        import cupy  # noqa: F401  (the backend, whose source we compile, imports it)
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()            # loads libnvrtc; raises if it is missing
    except Exception as e:
        pytest.skip(f"CuPy or its NVRTC is unavailable: {type(e).__name__}: {e}")
    return nvrtc


def _cuda_include():
    """The CUDA toolkit's include folder (cuda_bf16.h, which the bf16 build
    includes; CuPy passes it to NVRTC the same way at run time), or None."""
    import os
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_PATH", "CUDA_HOME") if v in os.environ]
    if NVCC:
        candidates.append(Path(NVCC).resolve().parent.parent / "include")
    candidates += sorted(Path("/usr/local").glob("cuda*/include"))
    return next((inc for inc in candidates if (inc / "cuda_bf16.h").exists()), None)


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_nvrtc_compiles(cu, bf16):
    nvrtc = _nvrtc()
    options = [*cuda_build.options(bf16), "-arch=sm_90"]
    if bf16:
        inc = _cuda_include()
        if inc is None:
            pytest.skip("the bf16 build needs the CUDA headers (cuda_bf16.h); no CUDA toolkit here")
        options.append(f"-I{inc}")
    prog = nvrtc.createProgram(cuda_build.source(cu.name), cu.name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as e:
            pytest.fail(f"NVRTC: {e}\n{nvrtc.getProgramLog(prog)}")
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


def test_cpu_path_never_imports_cupy():
    code = ("import sys, numpy as np, llmpy\n"
            "from llmpy.model import GPT\n"
            "from llmpy.config import GPTConfig\n"
            "m = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=8))\n"
            "ids = np.zeros((1, 4), dtype=np.int64)\n"
            "m.forward(ids, ids); m.backward()\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
