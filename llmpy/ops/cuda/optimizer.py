"""Optimizer pieces: AdamW over the whole flat buffer (adamw.cu), the sum of
squares behind the global gradient norm and the device-side loss sum
(norm.cu), and the bf16 weights cast from the float32 master weights.

All of them are written so that nothing waits for the GPU (except
sum_of_squares, which returns a Python number): what a CUDA graph of a
whole training step needs (llmpy/step.py).
"""
from __future__ import annotations

import math

import cupy
import numpy as np

from .runtime import BLOCK, blocks, check_f32, check_floatx, f32, i32, i64, kernel, ptr, scratch, upload

NORM_BLOCKS = 1024          # stage-1 blocks of sum_of_squares (fixed: deterministic)
SUM_THREADS = 1024          # accumulate_sum: one block


def cast(dst, src):
    """dst = src (float32) rounded to dst's storage type, to nearest even
    (our kernel: the training path does not rely on CuPy's bf16 support)."""
    check_f32(src)
    bf = check_floatx(dst)
    kernel("adamw.cu", "cast_to_storage", bf)((blocks(src.size),), (BLOCK,), (dst, src, i64(src.size)))


def sum_of_squares_into(x, out):
    """out[0] (a float64 device array) = sum(x^2), without waiting for it."""
    x = x.reshape(-1)
    bf = check_floatx(x)
    nblocks = min(NORM_BLOCKS, blocks(x.size))
    partial = scratch(nblocks, np.float32, slot="norm")
    kernel("norm.cu", "sum_of_squares_partial", bf)((nblocks,), (BLOCK,), (partial, x, i64(x.size)))
    kernel("norm.cu", "sum_of_squares_final", bf)((1,), (32,), (out, partial, i32(nblocks)))


def sum_of_squares(x):
    """sum(x^2) over the whole array, as a Python float (this synchronizes)."""
    out = scratch(1, np.float64, slot="norm_out")
    sum_of_squares_into(x, out)
    return float(out[0])


def accumulate_sum(acc, x, scale, first):
    """acc[0] (float64, device) = (0 if first else acc[0]) + scale * sum(x), x float32;
    nothing waits for it (see norm.cu)."""
    check_f32(x)
    kernel("norm.cu", "accumulate_sum")((1,), (SUM_THREADS,), (acc, x, i64(x.size), np.float64(scale),
                                                               i32(1 if first else 0)))


_segment_tables: dict[tuple, tuple] = {}


def _segment_table(segments):
    """(seg_stop int64, seg_decay int32) on the device, made once per layout."""
    key = tuple(segments)
    if key not in _segment_tables:
        _segment_tables[key] = (cupy.asarray([stop for _, stop, _ in segments], dtype=cupy.int64),
                                cupy.asarray([1 if decay else 0 for _, _, decay in segments], dtype=cupy.int32))
    return _segment_tables[key]


def adamw_step_flat(param, grad, m, v, segments, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
                    param_copy=None, sumsq=None, max_norm=-1.0, upload_hyper=True):
    """One AdamW step over whole flat buffers in ONE kernel launch (the GPU
    has no cache to chunk for). `segments` is [(start, stop, decay), ...]
    covering param contiguously from 0; weight decay applies where decay is
    true. Same update as cpu.adamw_update (see adamw.cu).

    param, m, v are float32. In bf16 training grad is bfloat16 and
    param_copy, the bf16 weights the forward pass reads, is rewritten from
    the updated float32 param with stochastic rounding (seeded by `step`:
    repeatable).

    With sumsq (a float64 device array holding the gradients' sum of
    squares) and max_norm >= 0, clipping happens in the kernel and a
    non-finite norm skips the update: nothing waits for the norm on the host
    (see adamw.cu, and llmpy/step.py which relies on it).
    upload_hyper=False launches the kernel without writing this step's
    hyperparameters to its device buffer: for a CUDA graph capture, which
    must not copy from the host; adamw_hyper() writes them before a replay."""
    check_f32(param, m, v)
    bf = check_floatx(grad, param_copy)
    if param_copy is None:
        if bf:
            raise ValueError("bf16 gradients need the bf16 param_copy to update")
        param_copy = param                     # fp32: the copy IS the parameters
    n = param.size
    if not segments or segments[0][0] != 0 or segments[-1][1] != n:
        raise ValueError(f"segments must cover [0, {n}) in order")
    seg_stop, seg_decay = _segment_table(segments)
    d_hyper = scratch(6, np.float32, slot="adamw_hyper")
    if upload_hyper:
        adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale, max_norm if sumsq is not None else -1.0)
    if sumsq is None:
        sumsq = scratch(1, np.float64, slot="norm_out")           # not read (max_norm < 0)
    # 128-bit loads (adamw.cu's x128 kernel) when n is whole packs of the
    # gradient's type and every buffer is 16-byte aligned (a ZeRO slice
    # need not be); else one element per thread. The same bits either way.
    per_pack = 16 // grad.itemsize
    if n % per_pack == 0 and all(ptr(a) % 16 == 0 for a in (param, param_copy, grad, m, v)):
        name, count = "adamw_update_x128", n // per_pack
    else:
        name, count = "adamw_update", n
    kernel("adamw.cu", name, bf)(
        (blocks(count),), (BLOCK,),
        (param, param_copy, grad, m, v, i64(count), seg_stop, seg_decay, i32(len(segments)),
         f32(1.0 - beta1), f32(1.0 - beta2), d_hyper, sumsq))


def adamw_hyper(lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0, max_norm=-1.0):
    """Write step `step`'s AdamW hyperparameters to the device buffer the
    kernel reads (see adamw.cu). The host computes them once, in double,
    1 - b1 and 1 - b2 included, so they round to float as the NumPy
    reference's do."""
    bc1 = 1.0 - beta1 ** step
    sqrt_bc2 = math.sqrt(1.0 - beta2 ** step)
    hyper = np.array([lr * sqrt_bc2 / bc1, eps * sqrt_bc2, 1.0 - lr * weight_decay, grad_scale,
                      max_norm, 0.0], dtype=np.float32)
    hyper[5:6].view(np.uint32)[0] = step & 0xFFFFFFFF               # the seed, as a float's bits
    upload(scratch(6, np.float32, slot="adamw_hyper"), hyper)
