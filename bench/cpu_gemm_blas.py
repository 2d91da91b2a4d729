"""GPT-2's products on the CPU through each BLAS the fp32 backend can use.

Every 2-D product of a d12 B=4 T=64 step (N = 256 rows; the layers'
forward, dinp and dW, and the LM head's), in the layouts the model hands
them (weights as W.T and W, dout.T), plus a square 2048^3: NumPy's matmul
(OpenBLAS, its own threads) against ops.cpu._gemm with MKL (sequential MKL,
one block of the output per thread of llmpy's pool), GFLOP/s, best of 7,
each library in a child process of its own, taking turns three times. The
last line sums a step's products.

Why children: once OpenBLAS's threads have run in a process, the kernel put
llmpy's two pool threads on one core for the small products (measured: a
256x768x768 product's two halves ran one after the other, 180-200 GFLOP/s
against 300-330 in a process where OpenBLAS had not run; no pause helped).

    python bench/cpu_gemm_blas.py          (needs the mkl wheel: pip install -e '.[cpu-bf16]')
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from llmpy.ops import cpu


def best(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def shapes(C=768, V=50304, N=256):
    # (name, M, K, N, a is a transposed view, b is a transposed view, calls a step)
    out = []
    for OC, IC in [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]:
        out += [(f"fwd {OC}x{IC}", N, IC, OC, False, True, 12),     # inp @ W.T
                (f"dinp {OC}x{IC}", N, OC, IC, False, False, 12),   # dout @ W
                (f"dW {OC}x{IC}", OC, N, IC, True, False, 12)]      # dout.T @ inp
    out += [("head fwd", N, C, V, False, True, 1), ("head dinp", N, V, C, False, False, 1),
            ("head dW", V, N, C, True, False, 1), ("square", 2048, 2048, 2048, False, False, 0)]
    return out


def measure(lib):
    """{product: seconds, best of 7} for one library, in this process."""
    if lib == "mkl":
        cpu.blas = "mkl"
        if cpu._mkl_module() is None:
            raise SystemExit("MKL not found: pip install -e '.[cpu-bf16]'")
    rng = np.random.default_rng(0)
    got = {}
    for name, M, K, N, ta, tb, _ in shapes():
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        a, b = (a.T if ta else a), (b.T if tb else b)
        c = np.empty((M, N), np.float32)
        got[name] = best((lambda: np.matmul(a, b, out=c)) if lib == "numpy" else (lambda: cpu._gemm(c, a, b)))
    return got


def main(turns=3):
    rates = {"numpy": [], "mkl": []}
    for turn in range(turns):
        for lib in ("numpy", "mkl") if turn % 2 == 0 else ("mkl", "numpy"):
            out = subprocess.run([sys.executable, __file__, "--one", lib], check=True, capture_output=True,
                                 text=True).stdout
            rates[lib].append(json.loads(out))
    step = {"numpy": 0.0, "mkl": 0.0}
    print(f"{'product':14} {'M x K x N':>18} {'NumPy (OpenBLAS) GFLOP/s':>26} {'MKL blocks GFLOP/s':>22}")
    for name, M, K, N, ta, tb, calls in shapes():
        gflop = 2 * M * N * K / 1e9
        cells = []
        for lib in ("numpy", "mkl"):
            ts = [r[name] for r in rates[lib]]
            step[lib] += calls * min(ts)
            cells.append("/".join(f"{gflop / t:.0f}" for t in ts))
        print(f"{name:14} {f'{M}x{K}x{N}':>18} {cells[0]:>26} {cells[1]:>22}")
    print(f"a d12 B=4 T=64 step's products (best of each): NumPy {step['numpy'] * 1e3:.1f} ms, "
          f"MKL blocks {step['mkl'] * 1e3:.1f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(sys.argv[2])))
    else:
        main()
