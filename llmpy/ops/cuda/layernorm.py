"""layernorm: y = (x - mean) * rstd * w + b over each row's C channels,
rstd = 1 / sqrt(var + LN_EPS); and the residual add fused with it.

Kernels in layernorm.cu: one warp per row for the forward and the input
gradient; the parameter gradients as a two-stage column sum (chunks of
LN_ROWS_PER_CHUNK rows, then the chunks in order: deterministic).
"""
from __future__ import annotations

from ..cuda_build import LN_ROWS_PER_CHUNK
from .runtime import BLOCK, WARP, blocks, check_f32, check_floatx, i32, kernel

ROWS_PER_BLOCK = BLOCK // WARP          # one warp per row


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    # out, inp (N, C); mean, rstd (N,) float32; weight, bias (C,)
    check_f32(mean, rstd)
    bf = check_floatx(out, inp, weight, bias)
    C = inp.shape[-1]
    N = inp.size // C
    kernel("layernorm.cu", "layernorm_forward", bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (out, mean, rstd, inp, weight, bias, i32(N), i32(C)))


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias):
    # res = a + b (res may be a), out = layernorm(res); res, out, a, b (N, C)
    check_f32(mean, rstd)
    bf = check_floatx(res, out, a, b, weight, bias)
    C = a.shape[-1]
    N = a.size // C
    kernel("layernorm.cu", "residual_layernorm_forward", bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (res, out, mean, rstd, a, b, weight, bias, i32(N), i32(C)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True):
    # dinp is ADDED to; scratch (2, >= ceil(N / LN_ROWS_PER_CHUNK), C) float32
    # holds the column partial sums (the contract's (2, N, C) is more than enough).
    check_f32(mean, rstd, scratch)
    bf = check_floatx(dinp, dweight, dbias, dout, inp, weight)
    C = inp.shape[-1]
    N = inp.size // C
    kernel("layernorm.cu", "layernorm_backward_input", bf)(
        (blocks(N, ROWS_PER_BLOCK),), (BLOCK,), (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)))
    nchunks = blocks(N, LN_ROWS_PER_CHUNK)
    if scratch.shape[0] != 2 or scratch[0].size < nchunks * C:
        raise ValueError(f"layernorm_backward: scratch {scratch.shape} holds less than (2, {nchunks}, {C})")
    partial_w, partial_b = scratch[0], scratch[1]         # each holds >= nchunks * C floats
    kernel("layernorm.cu", "layernorm_backward_params_partial", bf)(
        (blocks(C), nchunks), (BLOCK,), (partial_w, partial_b, dout, inp, mean, rstd, i32(N), i32(C)))
    kernel("layernorm.cu", "layernorm_backward_params_final", bf)(
        (blocks(C),), (BLOCK,), (dweight, dbias, partial_w, partial_b, i32(nchunks), i32(C),
                                 i32(1 if acc else 0)))
