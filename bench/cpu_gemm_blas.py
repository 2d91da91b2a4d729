"""GPT-2's products on the CPU through each BLAS the fp32 backend can use.

Every 2-D product of a d12 B=4 T=64 step (N = 256 rows; the layers'
forward, dinp and dW, and the LM head's), in the layouts the model hands
them (weights as W.T and W, dout.T), plus a square 2048^3: NumPy's matmul
(OpenBLAS, its own threads) against ops.cpu._gemm with MKL (sequential MKL,
one block of the output per thread of llmpy's pool), GFLOP/s, best of 7,
the two taking turns three times. The last line sums a step's products.

OpenBLAS's threads spin for a while after each call, and a spinning thread
takes a core from the next MKL call: a pause follows every NumPy
measurement (without it MKL's 2-thread calls measured at about 1-thread rates).

    python bench/cpu_gemm_blas.py          (needs the mkl wheel: pip install -e '.[cpu-bf16]')
"""
from __future__ import annotations

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


def main():
    cpu.blas = "mkl"
    if cpu._mkl_module() is None:
        raise SystemExit("MKL not found: pip install -e '.[cpu-bf16]'")
    rng = np.random.default_rng(0)
    step = {"numpy": 0.0, "mkl": 0.0}
    print(f"{'product':14} {'M x K x N':>18} {'NumPy (OpenBLAS) GFLOP/s':>26} {'MKL blocks GFLOP/s':>22}")
    for name, M, K, N, ta, tb, calls in shapes():
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        a, b = (a.T if ta else a), (b.T if tb else b)
        c = np.empty((M, N), np.float32)
        rates = {"numpy": [], "mkl": []}
        for _ in range(3):
            t = best(lambda: np.matmul(a, b, out=c))
            rates["numpy"].append(t)
            time.sleep(0.3)                     # OpenBLAS's threads stop spinning
            rates["mkl"].append(best(lambda: cpu._gemm(c, a, b)))
        gflop = 2 * M * N * K / 1e9
        for k in step:
            step[k] += calls * min(rates[k])
        cells = ["/".join(f"{gflop / t:.0f}" for t in rates[k]) for k in ("numpy", "mkl")]
        print(f"{name:14} {f'{M}x{K}x{N}':>18} {cells[0]:>26} {cells[1]:>22}", flush=True)
    print(f"a d12 B=4 T=64 step's products (best of each): NumPy {step['numpy'] * 1e3:.1f} ms, "
          f"MKL blocks {step['mkl'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
