"""Where a CPU training step's matmul time goes, shape by shape.

Every product of the NumPy backend (llmpy/ops/cpu.py: its 2-D `_gemm`,
on MKL or NumPy's BLAS, and attention's batched np.matmul) is timed inside a
few real training steps (HostStep: forward, backward, clipping, AdamW), then
every 2-D call is repeated at once (its operands now hot), and after the
steps each distinct call runs again on its own (best of 5). The gap between
"in step" and "again" is what cold operands cost a GEMM inside the step.
(Attention's small batched products run on both threads at once, each timed
on its own thread: their "in step" sums overlap.)

    python bench/cpu_gemms_in_step.py [MODEL B T]      (default: d12 4 64)

Run it on a quiet machine, with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset
(see bench/cpu_suite.sh).
"""
from __future__ import annotations

import collections
import sys
import time
import types

import numpy as np

from llmpy import bench
from llmpy.config import preset
from llmpy.dist import SingleProcess
from llmpy.model import GPT
from llmpy.ops import cpu
from llmpy.optim import AdamW
from llmpy.step import HostStep


def main(model="d12", B=4, T=64, steps=5):
    times = collections.defaultdict(list)       # (shapes, strides) -> seconds of each call
    again = collections.defaultdict(float)      # the same, of the repeat at once (2-D calls)
    operands = {}

    def timed(call, a, b, out, again_into=None):
        t = time.perf_counter()
        r = call(out)
        t1 = time.perf_counter()
        key = (a.shape, b.shape, a.strides, b.strides)
        times[key].append(t1 - t)
        operands[key] = (a, b, out, call)
        if again_into is not None:              # the same product into a copy of the output: the step is unchanged
            spare = again_into.copy()
            t1 = time.perf_counter()
            call(spare)
            again[key] += time.perf_counter() - t1
        return r

    def timed_matmul(a, b, out=None, **kw):     # attention's batched products (and NumPy's BLAS inside _gemm)
        if a.ndim == 2:
            return np.matmul(a, b, out=out, **kw)
        return timed(lambda o: np.matmul(a, b, out=o, **kw), a, b, out)

    def timed_gemm(out, a, b, acc=False):       # every 2-D product, whichever BLAS cpu._gemm runs it on
        return timed(lambda o: gemm(o, a, b, acc), a, b, out, again_into=out)

    cfg = preset(model, seq_len=T)
    m = GPT(cfg, device="cpu", seed=0)
    step = HostStep(m, AdamW(m, weight_decay=0.1), SingleProcess(), grad_clip=1.0)
    ids = bench.real_text_batch(B, T, cfg.vocab_size)
    batch = (ids[:, :-1], ids[:, 1:])
    for t in (1, 2):                             # warm-up: page faults, numba's first calls
        step(batch, 1e-4, t)
    proxy = types.ModuleType("numpy")            # cpu.py's np, with matmul timed
    proxy.__dict__.update(np.__dict__)
    proxy.matmul = timed_matmul
    cpu.np = proxy
    gemm, cpu._gemm = cpu._gemm, timed_gemm
    try:
        t0 = time.perf_counter()
        for t in range(3, 3 + steps):
            step(batch, 1e-4, t)
        step_ms = (time.perf_counter() - t0) / steps * 1e3
    finally:
        cpu.np, cpu._gemm = np, gemm
    rows, in_step, alone = [], 0.0, 0.0
    for key, ts in times.items():
        a, b, out, call = operands[key]
        best = min(_time(lambda: call(out)) for _ in range(5))
        ms_in, ms_alone = sum(ts) / steps * 1e3, best * len(ts) / steps * 1e3
        flop = 2 * np.prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1] * len(ts) / steps
        ms_again = again[key] / steps * 1e3 if key in again else float("nan")
        rows.append((ms_in, ms_again, ms_alone, flop / ms_in / 1e6, key[0], key[1], len(ts) // steps))
        in_step += ms_in
        alone += ms_alone
    print(f"{model} B={B} T={T}: ms per step, every product of the CPU backend "
          f"(2-D: {'MKL' if cpu._mkl_module() else 'NumPy'})")
    print(f"{'in step':>9} {'again':>9} {'alone':>9} {'GFLOP/s':>8}  shapes")
    for r in sorted(rows, key=lambda r: -r[0]):
        print(f"{r[0]:9.1f} {r[1]:9.1f} {r[2]:9.1f} {r[3]:8.1f}  {r[4]} @ {r[5]} x{r[6]}")
    two_d = [r for r in rows if r[1] == r[1]]
    print(f"step {step_ms:.1f} ms (with the timing wrappers and the repeats); the matmuls {in_step:.1f} ms in the "
          f"step, {alone:.1f} ms alone (best of 5); the 2-D ones {sum(r[0] for r in two_d):.1f} ms in the step, "
          f"{sum(r[1] for r in two_d):.1f} repeated at once; sgemm {bench.sgemm_gflops():.1f} GFLOP/s")


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], int(args[1]), int(args[2])) if args else main()
