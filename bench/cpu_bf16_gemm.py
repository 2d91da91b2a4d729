"""bf16 GEMM candidates on this CPU (issue 14), against NumPy's OpenBLAS sgemm in the same run.

MKL (the pip wheel `mkl`, extracted to a temporary folder and loaded with
ctypes): cblas_sgemm and cblas_gemm_bf16bf16f32 (bf16 inputs, fp32
accumulation and output), row-major; and torch's bf16 matmul (oneDNN) as the
yardstick of what the CPU's bf16 instructions can give. Nothing here is
llmpy at run time: it is the measurement bench/RESULTS.md cites.

    pip download --no-deps -d /tmp/mkl mkl && (cd /tmp/mkl && unzip -q mkl-*.whl)
    L=$(dirname $(find /tmp/mkl -name 'libmkl_rt.so.*' | head -1))
    LD_LIBRARY_PATH=$L MKL_THREADING_LAYER=GNU MKL_NUM_THREADS=2 python bench/cpu_bf16_gemm.py $L
"""
import ctypes
import os
import sys
import time

import ml_dtypes
import numpy as np
import torch

torch.set_num_threads(2)
lib = ctypes.CDLL(os.path.join(sys.argv[1], "libmkl_rt.so.3"))
ver = ctypes.create_string_buffer(256)
lib.mkl_get_version_string(ver, 256)
print(ver.value.decode())
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
f, p = ctypes.c_float, ctypes.c_void_p


def best(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


rng = np.random.default_rng(0)
for M, K, N in [(2048, 2048, 2048), (256, 768, 3072), (256, 3072, 768), (256, 768, 50257), (2048, 768, 3072)]:
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K), dtype=np.float32)          # b as a weight W (N, K): a @ b.T
    c, c2, c3 = (np.empty((M, N), np.float32) for _ in range(3))
    a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    gflop = 2 * M * N * K / 1e9
    t_np = best(lambda: np.matmul(a, b.T, out=c))
    t_mkl = best(lambda: lib.cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, M, N, K, f(1.0), a.ctypes.data_as(p), K,
                                         b.ctypes.data_as(p), K, f(0.0), c2.ctypes.data_as(p), N))
    t_bf = best(lambda: lib.cblas_gemm_bf16bf16f32(ROW_MAJOR, NO_TRANS, TRANS, M, N, K, f(1.0), a16.ctypes.data_as(p),
                                                   K, b16.ctypes.data_as(p), K, f(0.0), c3.ctypes.data_as(p), N))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    t_tf = best(lambda: torch.matmul(ta, tb.T))
    t_tb = best(lambda: torch.matmul(ta16, tb16.T))
    ref = a16.astype(np.float32) @ b16.astype(np.float32).T
    err = float(np.abs(c3 - ref).max() / np.abs(ref).max())
    print(f"M={M} K={K} N={N}: numpy OpenBLAS sgemm {gflop / t_np:6.1f} GFLOP/s | MKL sgemm {gflop / t_mkl:6.1f} | "
          f"MKL gemm_bf16bf16f32 {gflop / t_bf:6.1f} (x{t_np / t_bf:.2f} vs numpy sgemm; max rel err {err:.1e}) | "
          f"torch fp32 {gflop / t_tf:6.1f} | torch bf16 (oneDNN) {gflop / t_tb:6.1f}")
