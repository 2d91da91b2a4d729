"""layernorm: y = (x - mean) * rstd * w + b over each row's C channels,
rstd = 1 / sqrt(var + LN_EPS); and the residual add fused with it.

Kernels in layernorm.cu: one warp per row for the forward (with 128-bit
loads where the rows allow, runtime.rows128). The backward:
one block per chunk of LN_ROWS_PER_CHUNK rows reads dout and inp once, adds
the input gradient and leaves the chunk's column sums of the parameter
gradients (layernorm_backward_fused; rows wider than its registers hold:
a warp per row, then a column-sum kernel); then the chunk sums in a fixed
order, a block of COLSUM_THREADS threads per 32 columns (deterministic).
"""
from __future__ import annotations

from ..cuda_build import COLSUM_THREADS, LN_BWD_COLS_PER_THREAD, LN_ROWS_PER_CHUNK
from .runtime import BLOCK, WARP, blocks, check_f32, check_floatx, i32, kernel, rows128

ROWS_PER_BLOCK = BLOCK // WARP          # one warp per row


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    # out, inp (N, C); mean, rstd (N,) float32; weight, bias (C,)
    check_f32(mean, rstd)
    bf = check_floatx(out, inp, weight, bias)
    C = inp.shape[-1]
    N = inp.size // C
    name = "layernorm_forward_x128" if rows128(C, out, inp, weight, bias) else "layernorm_forward"
    kernel("layernorm.cu", name, bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (out, mean, rstd, inp, weight, bias, i32(N), i32(C)))


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias):
    # res = a + b (res may be a), out = layernorm(res); res, out, a, b (N, C)
    check_f32(mean, rstd)
    bf = check_floatx(res, out, a, b, weight, bias)
    C = a.shape[-1]
    N = a.size // C
    vec = rows128(C, res, out, a, b, weight, bias)
    kernel("layernorm.cu", "residual_layernorm_forward_x128" if vec else "residual_layernorm_forward", bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (res, out, mean, rstd, a, b, weight, bias, i32(N), i32(C)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True):
    # dinp is ADDED to; scratch (2, >= ceil(N / LN_ROWS_PER_CHUNK), C) float32
    # holds the column partial sums (the contract's (2, N, C) is more than enough).
    check_f32(mean, rstd, scratch)
    bf = check_floatx(dinp, dweight, dbias, dout, inp, weight)
    C = inp.shape[-1]
    N = inp.size // C
    nchunks = blocks(N, LN_ROWS_PER_CHUNK)
    if scratch.shape[0] != 2 or scratch[0].size < nchunks * C:
        raise ValueError(f"layernorm_backward: scratch {scratch.shape} holds less than (2, {nchunks}, {C})")
    partial_w, partial_b = scratch[0], scratch[1]         # each holds >= nchunks * C floats
    if C <= LN_BWD_COLS_PER_THREAD * BLOCK:
        # one pass over dout and inp: dinp and the chunks' column sums together
        kernel("layernorm.cu", "layernorm_backward_fused", bf)(
            (nchunks,), (BLOCK,), (dinp, partial_w, partial_b, dout, inp, weight, mean, rstd, i32(N), i32(C)))
    else:
        # rows too wide for the fused kernel's registers: a warp per row, then the column sums
        kernel("layernorm.cu", "layernorm_backward_input", bf)(
            (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)))
        kernel("layernorm.cu", "layernorm_backward_params_partial", bf)(
            (blocks(C), nchunks), (BLOCK,), (partial_w, partial_b, dout, inp, mean, rstd, i32(N), i32(C)))
    kernel("layernorm.cu", "layernorm_backward_params_final", bf)(
        (blocks(C, WARP),), (COLSUM_THREADS,), (dweight, dbias, partial_w, partial_b, i32(nchunks), i32(C),
                                                i32(1 if acc else 0)))
