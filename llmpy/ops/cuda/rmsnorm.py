"""rmsnorm (Llama): y = x * rstd * w over each row's C channels,
rstd = 1 / sqrt(mean_c(x^2) + eps); and the residual add fused with it.

Kernels in rmsnorm.cu, laid out as layernorm.py's: a warp per row forward;
backward one block per chunk of LN_ROWS_PER_CHUNK rows (the input gradient
and the chunk's column sums of dweight in one pass; rows wider than its
registers: a warp per row, then a column-sum kernel), then the chunk sums
in a fixed order (deterministic).
"""
from __future__ import annotations

from ..cuda_build import COLSUM_THREADS, LN_BWD_COLS_PER_THREAD, LN_ROWS_PER_CHUNK
from .runtime import BLOCK, WARP, blocks, check_f32, check_floatx, f32, i32, kernel

ROWS_PER_BLOCK = BLOCK // WARP          # one warp per row


def rmsnorm_forward(out, rstd, inp, weight, eps):
    # out, inp (N, C); rstd (N,) float32; weight (C,)
    check_f32(rstd)
    bf = check_floatx(out, inp, weight)
    C = inp.shape[-1]
    N = inp.size // C
    kernel("rmsnorm.cu", "rmsnorm_forward", bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (out, rstd, inp, weight, f32(eps), i32(N), i32(C)))


def residual_rmsnorm_forward(res, out, rstd, a, b, weight, eps):
    # res = a + b (res may be a), out = rmsnorm(res); res, out, a, b (N, C)
    check_f32(rstd)
    bf = check_floatx(res, out, a, b, weight)
    C = a.shape[-1]
    N = a.size // C
    kernel("rmsnorm.cu", "residual_rmsnorm_forward", bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (res, out, rstd, a, b, weight, f32(eps), i32(N), i32(C)))


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, scratch, acc=True):
    # dinp is ADDED to; scratch (2, >= ceil(N / LN_ROWS_PER_CHUNK), C) float32,
    # of which the first holds the chunks' column sums of dweight
    check_f32(rstd, scratch)
    bf = check_floatx(dinp, dweight, dout, inp, weight)
    C = inp.shape[-1]
    N = inp.size // C
    nchunks = blocks(N, LN_ROWS_PER_CHUNK)
    if scratch.shape[0] != 2 or scratch[0].size < nchunks * C:
        raise ValueError(f"rmsnorm_backward: scratch {scratch.shape} holds less than (2, {nchunks}, {C})")
    partial_w = scratch[0]
    if C <= LN_BWD_COLS_PER_THREAD * BLOCK:
        kernel("rmsnorm.cu", "rmsnorm_backward_fused", bf)(
            (nchunks,), (BLOCK,), (dinp, partial_w, dout, inp, weight, rstd, i32(N), i32(C)))
    else:
        # rows too wide for the fused kernel's registers (Llama 3.2 3B, 3.1 8B)
        kernel("rmsnorm.cu", "rmsnorm_backward_input", bf)(
            (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (dinp, dout, inp, weight, rstd, i32(N), i32(C)))
        kernel("rmsnorm.cu", "rmsnorm_backward_params_partial", bf)(
            (blocks(C), nchunks), (BLOCK,), (partial_w, dout, inp, rstd, i32(N), i32(C)))
    kernel("rmsnorm.cu", "rmsnorm_backward_params_final", bf)(
        (blocks(C, WARP),), (COLSUM_THREADS,), (dweight, partial_w, i32(nchunks), i32(C), i32(1 if acc else 0)))
