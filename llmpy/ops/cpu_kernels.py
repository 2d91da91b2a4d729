"""Compiled CPU loops (numba) where NumPy's passes over memory are the cost.

Each NumPy ufunc is one pass over a whole array, on one core. A loop
compiled here reads each value once and does all of an op's arithmetic on
it while it is in registers or L1, and releases the GIL (nogil), so the
cpu_parallel pool's threads run it side by side on their rows.

- AdamW: cpu.adamw_update, the reference, makes 13 passes over each chunk;
  here the same float32 operations in the same order run in one loop, so the
  result is the reference's to the bit (tests/test_cpu_kernels.py). It can
  also round the updated weights into the bf16 copy the ops read
  (--device cpu --dtype bf16) while they are in registers. optim.AdamW calls it.
- layernorm (forward, residual forward, backward), GELU, the classifier,
  attention's causal softmax, the gradient's sum of squares: cpu.py's ops
  hand their arrays here (cpu._kernels: numba installed, cpu.compiled on,
  C-contiguous float arrays). The math is cpu.py's, with its derivatives;
  sums run in another order, so results agree to float32 rounding.

numba compiles the loops on first use (3-4 s for all of them, once) and caches
the machine code next to this file (cache=True), so later runs start at
once. Without numba (an optional dependency) the NumPy code runs.
"""
from __future__ import annotations

import math

import numpy as np

from .contract import GELU_A, GELU_S

try:
    import numba
except ImportError:             # optim.AdamW falls back to cpu.adamw_update
    numba = None


if numba is not None:
    # error_model="numpy": a float division by zero gives inf / nan as in
    # NumPy (IEEE), instead of numba's default check that raises
    # ZeroDivisionError; that per-element branch kept LLVM from vectorizing
    # the loop (scalar vsqrtss / vdivss), and the vector loop moves ~2.5x the
    # bytes per second (bench/RESULTS.md). IEEE sqrt and division are exact
    # in either form, so the bits are the same.
    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _adamw(param, grad, m, v, c1, c2, gscale, scaled, eps_hat, decay, decayed, step_size, copy_bits, write_copy):
        # All float32: the reference's ufuncs cast their Python-float scalars to
        # float32 (NumPy's rule for a float32 array and a Python scalar), and so
        # are c1 ... step_size here; every line is one of the reference's passes.
        bits = param.view(np.uint32)
        for i in range(param.shape[0]):
            g = grad[i] * gscale if scaled else grad[i]
            mi = m[i] + (g - m[i]) * c1                 # m += (1 - b1) (g - m)
            vi = v[i] + (g * g - v[i]) * c2             # v += (1 - b2) (g^2 - v)
            m[i] = mi
            v[i] = vi
            u = mi / (np.sqrt(vi) + eps_hat)
            p = param[i] * decay if decayed else param[i]
            param[i] = p - u * step_size
            if write_copy:
                # round to nearest even into bf16 (a NaN stays a quiet NaN)
                b = bits[i]
                if (b & 0x7FFFFFFF) > 0x7F800000:
                    copy_bits[i] = np.uint16((b >> 16) | 0x40)
                else:
                    copy_bits[i] = np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)


available = numba is not None
_NO_COPY = np.zeros(1, np.uint16)


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch, grad_scale=1.0,
                 copy=None):
    """cpu.adamw_update (same arguments, same math, same bits) in one pass;
    copy: a bfloat16 array of param's length, written with the new weights
    rounded to nearest even, or None. scratch is unused (nothing to stage)."""
    bc1 = 1.0 - beta1 ** step
    sqrt_bc2 = math.sqrt(1.0 - beta2 ** step)
    f = np.float32
    _adamw(param, grad, m, v, f(1.0 - beta1), f(1.0 - beta2), f(grad_scale), grad_scale != 1.0,
           f(eps * sqrt_bc2), f(1.0 - lr * weight_decay), bool(weight_decay), f(lr * sqrt_bc2 / bc1),
           _NO_COPY if copy is None else copy.view(np.uint16), copy is not None)


# ----------------------------------------------------------------------------
# layernorm and the gradient's sum of squares: one pass where NumPy makes many
#
# cpu.layernorm_forward makes 7 NumPy passes over (N, C), layernorm_backward
# about 15, each one ufunc over the whole array. Here a row is read once into
# L1 (C floats: 3 KB at GPT-2 small) and the reference's passes run over it
# there. The math is the reference's (cpu.py, with the derivative); the order
# of the sums differs: fastmath's "reassoc" lets LLVM split a row's sum over
# the vector lanes (the loop would not vectorize otherwise), so the results
# agree with the reference to rounding, not to the bit
# (tests/test_cpu_kernels.py). No "nnan"/"ninf": a NaN or an inf comes out as
# in NumPy, for the non-finite checks. `zero` is 0 in the arrays' dtype: the
# row sums accumulate in it (float32 in training, float64 in the
# finite-difference tests), as NumPy's do.

_REORDER = {"reassoc", "contract"}
# The 1-D loops take their block as a slice (x[lo:hi]) and run i from 0: with
# range(lo, hi), numba cannot rule out a negative i, adds NumPy's wraparound
# to every index, and an in-place loop (d[i] = d[i] * ...) no longer vectorizes.


if numba is not None:
    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER, inline="always")
    def _layernorm_row(out, mean, rstd, i, x, weight, bias, eps, zero):
        # x: row i of the input. mean[i], rstd[i] are used as stored (rounded
        # to their dtype), so the backward's xhat is the forward's.
        C = x.shape[0]
        s = zero
        for j in range(C):
            s += x[j]
        m = s / C
        ss = zero
        for j in range(C):
            # var = mean((x - mean)^2): two passes, no cancellation (m = s / C
            # is a float64, and so this sum is)
            d = x[j] - m
            ss += d * d
        mean[i] = m
        rstd[i] = 1.0 / np.sqrt(ss / C + eps)
        m, r = mean[i], rstd[i]
        for j in range(C):
            out[i, j] = (x[j] - m) * r * weight[j] + bias[j]

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _layernorm_rows(out, mean, rstd, inp, weight, bias, eps, zero, lo, hi):
        for i in range(lo, hi):
            _layernorm_row(out, mean, rstd, i, inp[i], weight, bias, eps, zero)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _residual_layernorm_rows(res, out, mean, rstd, a, b, weight, bias, eps, zero, lo, hi):
        for i in range(lo, hi):
            for j in range(a.shape[1]):
                res[i, j] = a[i, j] + b[i, j]
            _layernorm_row(out, mean, rstd, i, res[i], weight, bias, eps, zero)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _layernorm_backward_rows(dinp, dweight, dbias, dout, inp, weight, mean, rstd, zero, lo, hi):
        # dweight, dbias: this block's sums over its rows (overwritten)
        C = inp.shape[1]
        dweight[:] = 0
        dbias[:] = 0
        for i in range(lo, hi):
            m, r = mean[i], rstd[i]
            sg = zero           # sum_c g, g = dout * w: the gradient wrt xhat
            sgx = zero          # sum_c g xhat
            for j in range(C):
                xhat = (inp[i, j] - m) * r
                g = dout[i, j] * weight[j]
                sg += g
                sgx += g * xhat
            mg, mgx = sg / C, sgx / C
            for j in range(C):
                xhat = (inp[i, j] - m) * r
                dy = dout[i, j]
                dbias[j] += dy
                dweight[j] += dy * xhat
                dinp[i, j] += r * (dy * weight[j] - mg - xhat * mgx)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _sum_of_squares(x, zero):
        # in x's dtype over 4096-float pieces (the vector loop), the pieces in float64
        s = 0.0
        n = x.shape[0]
        for k in range(0, n, 4096):
            t = zero
            for i in range(k, min(k + 4096, n)):
                t += x[i] * x[i]
            s += t
        return s


# Each row is one pass in L1, so a block needs no cache-sized bound: one block
# of rows per thread (cpu_parallel.for_thread_blocks), or one in all below
# LN_PARALLEL floats, where handing half to a thread (~0.1 ms, measured on
# 2 cores) costs more than it saves.
LN_PARALLEL = 1 << 20


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """cpu.layernorm_forward on 2-D C-contiguous arrays, one pass per row."""
    from .cpu_parallel import for_thread_blocks
    N, C = inp.shape
    zero = inp.dtype.type(0)
    for_thread_blocks(lambda lo, hi: _layernorm_rows(out, mean, rstd, inp, weight, bias, eps, zero, lo, hi),
                      N, C, LN_PARALLEL)


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias, eps):
    """cpu.residual_layernorm_forward (res may be a), one pass per row."""
    from .cpu_parallel import for_thread_blocks
    N, C = a.shape
    zero = a.dtype.type(0)
    for_thread_blocks(lambda lo, hi: _residual_layernorm_rows(res, out, mean, rstd, a, b, weight, bias, eps, zero,
                                                              lo, hi), N, C, LN_PARALLEL)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc):
    """cpu.layernorm_backward (dinp added to) in one pass per row (two over
    the row in L1). Block k's sums of dweight, dbias go to scratch[0, k],
    scratch[1, k] and are added up after, in block order."""
    from .cpu_parallel import for_thread_blocks, rows_per_thread
    N, C = inp.shape
    rows = rows_per_thread(N, C, LN_PARALLEL)
    part_w, part_b = scratch[0], scratch[1]
    zero = inp.dtype.type(0)
    for_thread_blocks(lambda lo, hi: _layernorm_backward_rows(dinp, part_w[lo // rows], part_b[lo // rows], dout,
                                                              inp, weight, mean, rstd, zero, lo, hi),
                      N, C, LN_PARALLEL)
    nb = -(-N // rows)
    if acc:
        dweight += part_w[:nb].sum(axis=0)
        dbias += part_b[:nb].sum(axis=0)
    else:
        np.sum(part_w[:nb], axis=0, out=dweight)
        np.sum(part_b[:nb], axis=0, out=dbias)


_SUMSQ_BLOCK = 1 << 20     # floats (4 MB) a partial sum: fixed blocks in a fixed order, whatever the threads


def sum_of_squares(x) -> float:
    """cpu.sum_of_squares of a 1-D contiguous array, on the pool's threads.
    The reference's np.dot reads d12's 124M gradients at ~17 GB/s; the pool's
    two threads at ~22 GB/s (2-core Xeon), and the blocks add up in float64."""
    from .cpu_parallel import for_row_blocks
    n = x.shape[0]
    zero = x.dtype.type(0)
    partial = np.zeros(max(1, -(-n // _SUMSQ_BLOCK)))

    def part(lo, hi):
        partial[lo // _SUMSQ_BLOCK] = _sum_of_squares(x[lo:hi], zero)

    for_row_blocks(part, n, 1, block=_SUMSQ_BLOCK)
    return float(partial.sum())


# ----------------------------------------------------------------------------
# exp and tanh for the vector loops (float32)
#
# numba compiles np.exp / np.tanh on a scalar to one libm call per element
# (pip's numba has no SVML vector library), which keeps a loop from
# vectorizing; NumPy's own ufuncs are vectorized but are one more pass over
# memory each. So the loops below use this exp, written out:
#   e^x = 2^k e^r,  k = round(x / ln 2),  r = x - k ln 2  (|r| <= ln(2)/2),
#   e^r = sum_{n<=7} r^n / n!  (the Taylor remainder r^8/8! < 6e-9 relative,
#   under float32's 6e-8), and 2^k made from its exponent bits, (k + 127) << 23.
# ln 2 is split in two (LN2_HI has 12 significant bits, so k * LN2_HI is
# exact for the |k| <= 128 that occur) to keep r accurate. Measured against float64 exp over
# [-87, 88]: at most 1.3 float32 ulp (2^-24 relative; NumPy's float32 exp: 3.3).
# Below -87 (e^-87 = 1.6e-38, at float32's smallest normal) it returns 0, so
# a masked -inf gives exactly 0; a NaN stays NaN.
#   tanh u = sign(u) (1 - e) / (1 + e),  e = e^(-2|u|) in (0, 1]:
# no overflow; for small u the error is absolute (~1e-7), which is what
# GELU's 1 + tanh u needs.

if numba is not None:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _float32_from_bits(typingctx, bits):
        # the float32 whose IEEE bits are the int32 `bits` (one register move)
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _ir.FloatType())
        return _types.float32(_types.int32), codegen

    _LOG2E = np.float32(1.4426950408889634)
    _LN2_HI = np.float32(0.693145751953125)
    _LN2_LO = np.float32(1.4286068203094173e-06)
    _EXP_MIN = np.float32(-87.0)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER, inline="always")
    def _exp(x):
        # x float32, at most 88 (e^88.7 overflows float32)
        xc = x if x > _EXP_MIN else _EXP_MIN
        k = np.floor(xc * _LOG2E + np.float32(0.5))
        r = (xc - k * _LN2_HI) - k * _LN2_LO
        p = np.float32(1 / 5040)
        p = p * r + np.float32(1 / 720)
        p = p * r + np.float32(1 / 120)
        p = p * r + np.float32(1 / 24)
        p = p * r + np.float32(1 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        y = p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        if x >= _EXP_MIN:
            return y
        return np.float32(0.0) if x < _EXP_MIN else x           # else x is NaN

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER, inline="always")
    def _tanh(u):
        e = _exp(np.float32(-2.0) * abs(u))
        t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
        return t if u >= 0 else -t                                # (a NaN u: t is NaN)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _exp_array(out, x):
        # for the tests: _exp over a 1-D array
        for i in range(x.shape[0]):
            out[i] = _exp(x[i])

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _tanh_array(out, x):
        for i in range(x.shape[0]):
            out[i] = _tanh(x[i])


# ----------------------------------------------------------------------------
# GELU (tanh form) in one pass instead of NumPy's 9 (forward) and 17
# (backward) over the (N, 4C) array: the reference's formulas (cpu.py) with
# the tanh above; one call per thread over its half of the array (every call
# from Python gives up the GIL and takes it back: on 2 cores a round trip
# costs more than a small block's arithmetic).

if numba is not None:
    _STAGE = 4096      # floats: two 16 KB staging buffers fit a 48 KB L1
    _GELU_A = np.float32(GELU_A)
    _GELU_S = np.float32(GELU_S)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER, inline="always")
    def _gelu(x):
        # y = 0.5 x (1 + tanh u),  u = s (x + a x^3)
        t = _tanh(_GELU_S * (x + _GELU_A * x * x * x))
        return np.float32(0.5) * x * (np.float32(1.0) + t)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER, inline="always")
    def _gelu_grad(x):
        # dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 a x^2)
        t = _tanh(_GELU_S * (x + _GELU_A * x * x * x))
        du = _GELU_S * (np.float32(1.0) + np.float32(3.0) * _GELU_A * x * x)
        return np.float32(0.5) * ((np.float32(1.0) + t) + x * (np.float32(1.0) - t * t) * du)

    # The loops below read their inputs in pieces of _STAGE floats copied
    # into small buffers first (in L1), and compute from there. Measured inside
    # a d12 step (the fc layer's (256, 3072) GELU backward, one thread): 2.15 ms
    # a call reading straight from the arrays, 0.92 ms staged. (Our reading:
    # a loop of ~50 instructions per 8 floats issues its loads too slowly to
    # hide memory latency, where a bare copy keeps many in flight.)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _gelu_forward(out, x):
        n = x.shape[0]
        xs = np.empty(_STAGE, np.float32)
        for k in range(0, n, _STAGE):
            m = min(_STAGE, n - k)
            x_k, out_k = x[k:k + m], out[k:k + m]
            for i in range(m):
                xs[i] = x_k[i]
            for i in range(m):
                out_k[i] = _gelu(xs[i])

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _gelu_backward(dinp, x, dout):
        # dinp = dout * gelu'(x); dinp may be dout: each piece of both is
        # staged before any of it is written
        n = x.shape[0]
        xs = np.empty(_STAGE, np.float32)
        ds = np.empty(_STAGE, np.float32)
        for k in range(0, n, _STAGE):
            m = min(_STAGE, n - k)
            x_k, dout_k, dinp_k = x[k:k + m], dout[k:k + m], dinp[k:k + m]
            for i in range(m):
                xs[i] = x_k[i]
                ds[i] = dout_k[i]
            for i in range(m):
                dinp_k[i] = ds[i] * _gelu_grad(xs[i])


def gelu_forward(out, inp):
    """cpu.gelu_forward on 1-D contiguous float32 arrays."""
    from .cpu_parallel import for_thread_blocks
    for_thread_blocks(lambda lo, hi: _gelu_forward(out[lo:hi], inp[lo:hi]), inp.shape[0], 1)


def gelu_backward(dinp, inp, dout):
    """cpu.gelu_backward on 1-D contiguous float32 arrays (dinp may be dout)."""
    from .cpu_parallel import for_thread_blocks
    for_thread_blocks(lambda lo, hi: _gelu_backward(dinp[lo:hi], inp[lo:hi], dout[lo:hi]), inp.shape[0], 1)


# ----------------------------------------------------------------------------
# the classifier: softmax + cross-entropy over (N, V) logits, V = 50257
#
# cpu.py's fused step makes 6 NumPy passes over each 8-row chunk; here a row
# (196 KB: in L2) takes three: its max, exp(x - max) written in place while
# summed, and the scaling into the gradient. The sum accumulates in float32
# over 1024-float pieces (the vector loop) and the pieces in float64.

if numba is not None:
    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER, inline="always")
    def _row_max(row, lanes):
        # max of a 1-D row. LLVM left `m = x if x > m else m` (and numba's
        # max()) a scalar loop, ~1 float/ns, even with fastmath's "nnan"
        # (which we do not give: NaN must reach the loss); kept in 16 lanes
        # by hand (`lanes`: a 16-float scratch) it runs ~5x faster. A NaN is skipped
        # here; it makes the exp sum NaN in the callers.
        n16 = row.shape[0] // 16 * 16
        lanes[:] = row[0]
        for j in range(0, n16, 16):
            for k in range(16):
                x = row[j + k]
                lanes[k] = x if x > lanes[k] else lanes[k]
        m = row[0]
        for k in range(16):
            m = lanes[k] if lanes[k] > m else m
        for j in range(n16, row.shape[0]):
            m = row[j] if row[j] > m else m
        return m

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _crossentropy_rows(losses, lse, logits, V, targets, dloss, backward):
        # rows of logits (n, Vp), the first V columns real; backward: those
        # become (softmax - onehot) * dloss. (Each loop runs over a 1-D slice
        # from 0: logits[i, :V] would be typed strided, and an index that may
        # be negative gets NumPy's wraparound; either stops the vector loop.)
        lanes = np.empty(16, logits.dtype)
        for i in range(logits.shape[0]):
            row = logits[i][:V]
            m = _row_max(row, lanes)
            picked = row[targets[i]]
            s = 0.0
            for k in range(0, V, 1024):
                piece = row[k:k + 1024]
                t = np.float32(0.0)
                if backward:
                    for j in range(piece.shape[0]):
                        e = _exp(piece[j] - m)
                        piece[j] = e
                        t += e
                else:
                    for j in range(piece.shape[0]):
                        t += _exp(piece[j] - m)
                s += t
            lse[i] = m + np.log(s)
            losses[i] = lse[i] - picked
            if backward:
                # dlogits = exp(x - m) (dloss / s) - onehot dloss
                scale = np.float32(dloss / s)
                for j in range(V):
                    row[j] = row[j] * scale
                row[targets[i]] -= dloss

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _crossentropy_backward_rows(logits, V, lse, targets, dloss):
        # dlogits = (exp(x - lse) - onehot) dloss, one pass over each row
        for i in range(logits.shape[0]):
            row = logits[i][:V]
            lse_i = lse[i]
            for j in range(V):
                row[j] = _exp(row[j] - lse_i) * dloss
            row[targets[i]] -= dloss


def crossentropy_forward(losses, lse, logits, V, targets):
    """cpu.crossentropy_forward on C-contiguous float32 logits (N, Vp), V <= Vp real columns."""
    from .cpu_parallel import for_thread_blocks
    for_thread_blocks(lambda lo, hi: _crossentropy_rows(losses[lo:hi], lse[lo:hi], logits[lo:hi], V, targets[lo:hi],
                                                        np.float32(0), False), logits.shape[0], V)


def crossentropy_forward_backward(losses, lse, logits, V, targets, dloss):
    """cpu.crossentropy_forward_backward: logits[:, :V] become the gradient
    (the caller zeroes the padding)."""
    from .cpu_parallel import for_thread_blocks
    d = np.float32(dloss)
    for_thread_blocks(lambda lo, hi: _crossentropy_rows(losses[lo:hi], lse[lo:hi], logits[lo:hi], V, targets[lo:hi],
                                                        d, True), logits.shape[0], V)


def crossentropy_backward(logits, V, lse, targets, dloss):
    """cpu.crossentropy_backward: logits[:, :V] become the gradient."""
    from .cpu_parallel import for_thread_blocks
    d = np.float32(dloss)
    for_thread_blocks(lambda lo, hi: _crossentropy_backward_rows(logits[lo:hi], V, lse[lo:hi], targets[lo:hi], d),
                      logits.shape[0], V)


# ----------------------------------------------------------------------------
# attention's softmax, causal: one compiled call per sequence where NumPy makes
# five passes over all (NH, T, T) scores (scale, mask, max, exp, sum and
# divide) and its backward four. Row t has t + 1 live entries (s <= t); the
# rest are written 0 without being computed, which halves the softmax's work
# (the products around it still compute every entry).

if numba is not None:
    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _softmax_causal(att, scale):
        # att (NH, T, T) holds q k^T and becomes softmax_s(scale * att[h, t, s]), s <= t.
        # With m = max_s x: softmax(scale x) = e / sum e, e = exp(scale (x - m)) (scale > 0).
        T = att.shape[1]
        lanes = np.empty(16, att.dtype)
        for h in range(att.shape[0]):
            for t in range(T):
                row = att[h, t]
                live = row[:t + 1]
                m = _row_max(live, lanes)
                s = np.float32(0.0)
                for j in range(t + 1):
                    e = _exp((live[j] - m) * scale)
                    live[j] = e
                    s += e
                inv = np.float32(1.0) / s
                for j in range(t + 1):
                    live[j] = live[j] * inv
                masked = row[t + 1:]
                for j in range(masked.shape[0]):
                    masked[j] = 0

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _softmax_causal_backward(datt, att, scale):
        # datt (NH, T, T) holds dL/datt and becomes dL/d(q k^T):
        #   dpre_s = scale * att_s * (datt_s - sum_s' datt_s' att_s')
        # (masked entries have att = 0, so their gradient is 0)
        T = att.shape[1]
        for h in range(att.shape[0]):
            for t in range(T):
                d = datt[h, t][:t + 1]
                a = att[h, t][:t + 1]
                dot = np.float32(0.0)
                for j in range(t + 1):
                    dot += d[j] * a[j]
                for j in range(t + 1):
                    d[j] = scale * a[j] * (d[j] - dot)
                masked = datt[h, t][t + 1:]
                for j in range(masked.shape[0]):
                    masked[j] = 0


def softmax_causal(att, scale):
    """att (NH, T, T) float32, C-contiguous: q k^T becomes the causal softmax
    of scale * q k^T (one sequence of cpu.attention_forward)."""
    _softmax_causal(att, np.float32(scale))


def softmax_causal_backward(datt, att, scale):
    """datt (NH, T, T): dL/datt becomes dL/d(q k^T) (cpu.attention_backward)."""
    _softmax_causal_backward(datt, att, np.float32(scale))
