"""Compiled CPU loops (numba) where NumPy's passes over memory are the cost.

AdamW is the one today. cpu.adamw_update, the reference, makes 13 NumPy
passes over each chunk (every ufunc reads and writes whole arrays); here the
same arithmetic runs in ONE loop over the elements, each value loaded once,
in the same float32 operations in the same order, so the result is the
reference's to the bit (tests/test_ops_gradcheck.py checks it). The loop
releases the GIL (nogil), so optim.AdamW's threads run it side by side on
their chunks, as they run the NumPy version. It can also round the updated
weights into the bf16 copy the ops read (--device cpu --dtype bf16) while
they are in registers.

numba compiles the loop on first use (~1 s) and caches the machine code
next to this file (cache=True), so later runs start at once. Without numba
(an optional dependency), optim.AdamW uses the NumPy reference.
"""
from __future__ import annotations

import math

import numpy as np

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
            d = x[j] - m
            ss += d * d                         # var = mean((x - mean)^2): two passes, no cancellation
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
    def _sum_of_squares(x, zero, lo, hi):
        # in x's dtype over 4096-float pieces (the vector loop), the pieces in float64
        s = 0.0
        for k in range(lo, hi, 4096):
            t = zero
            for i in range(k, min(k + 4096, hi)):
                t += x[i] * x[i]
            s += t
        return s


def _row_block(n_rows: int, row_size: int) -> int:
    # Each row is one pass in L1, so a block needs no cache-sized bound: rows
    # are cut evenly over the pool's threads, or not at all below
    # LN_PARALLEL floats, where handing half to a thread (~0.1 ms, measured on
    # 2 cores) costs more than it saves.
    from .cpu_parallel import threads
    nt = threads() if n_rows * row_size >= LN_PARALLEL else 1
    return -(-n_rows // nt) * row_size


LN_PARALLEL = 1 << 20


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    """cpu.layernorm_forward on 2-D C-contiguous arrays, one pass per row."""
    from .cpu_parallel import for_row_blocks
    N, C = inp.shape
    zero = inp.dtype.type(0)
    for_row_blocks(lambda lo, hi: _layernorm_rows(out, mean, rstd, inp, weight, bias, eps, zero, lo, hi),
                   N, C, block=_row_block(N, C))


def residual_layernorm_forward(res, out, mean, rstd, a, b, weight, bias, eps):
    """cpu.residual_layernorm_forward (res may be a), one pass per row."""
    from .cpu_parallel import for_row_blocks
    N, C = a.shape
    zero = a.dtype.type(0)
    for_row_blocks(lambda lo, hi: _residual_layernorm_rows(res, out, mean, rstd, a, b, weight, bias, eps, zero,
                                                           lo, hi), N, C, block=_row_block(N, C))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc):
    """cpu.layernorm_backward (dinp added to) in one pass per row (two over
    the row in L1). Block k's sums of dweight, dbias go to scratch[0, k],
    scratch[1, k] and are added up after, in block order."""
    from .cpu_parallel import blocks, for_row_blocks
    N, C = inp.shape
    block = _row_block(N, C)
    rows = block // C
    part_w, part_b = scratch[0], scratch[1]
    zero = inp.dtype.type(0)
    for_row_blocks(lambda lo, hi: _layernorm_backward_rows(dinp, part_w[lo // rows], part_b[lo // rows], dout, inp,
                                                           weight, mean, rstd, zero, lo, hi), N, C, block=block)
    nb = len(blocks(N, C, block))
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
        partial[lo // _SUMSQ_BLOCK] = _sum_of_squares(x, zero, lo, hi)

    for_row_blocks(part, n, 1, block=_SUMSQ_BLOCK)
    return float(partial.sum())


# ----------------------------------------------------------------------------
# GELU (tanh form) in three passes per cache-sized block instead of 9 (forward)
# and 17 (backward) over the whole (N, 4C) array: a compiled pass for
# u = s (x + a x^3), NumPy's tanh over the block (vectorized; numba's tanh
# would be one libm call per element: pip's numba has no SVML), and a
# compiled pass for the rest. The blocks run on the pool's threads and are
# large (GELU_BLOCK): each of a block's three calls gives up the GIL and takes
# it back, and on 2 cores a round trip costs more than a small block's
# arithmetic (measured at d12's (256, 3072): 64K-float blocks 0.64 ms, 256K
# 0.54 ms, one thread 0.55 ms; the NumPy reference 1.4 ms).

GELU_BLOCK = 1 << 18        # floats: 1 MB, three such arrays a block, in a 2-4 MB L2

if numba is not None:
    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _gelu_u(u, x, a, s):
        for i in range(x.shape[0]):
            xi = x[i]
            u[i] = s * (xi + a * xi * xi * xi)

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _gelu_out(out, x, t):
        # t = tanh(u): y = 0.5 x (1 + t)
        for i in range(x.shape[0]):
            out[i] = 0.5 * x[i] * (1 + t[i])

    @numba.njit(nogil=True, cache=True, error_model="numpy", fastmath=_REORDER)
    def _gelu_dinp(dinp, x, dout, t, a, s):
        # dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 a x^2);  dinp may be dout
        for i in range(x.shape[0]):
            xi, ti = x[i], t[i]
            dinp[i] = dout[i] * (0.5 * (1 + ti) + 0.5 * xi * (1 - ti * ti) * s * (1 + 3 * a * xi * xi))


def gelu_forward(out, inp, a, s):
    """cpu.gelu_forward on 1-D contiguous arrays (a, s: GELU's constants)."""
    from .cpu_parallel import for_row_blocks, work_buffer
    dt = inp.dtype.type
    a, s = dt(a), dt(s)              # constants in the arrays' dtype: float32 math on float32 arrays

    def block(lo, hi):
        t = work_buffer((hi - lo,), 0)
        _gelu_u(t, inp[lo:hi], a, s)
        np.tanh(t, out=t)
        _gelu_out(out[lo:hi], inp[lo:hi], t)

    for_row_blocks(block, inp.shape[0], 1, block=GELU_BLOCK)


def gelu_backward(dinp, inp, dout, a, s):
    """cpu.gelu_backward on 1-D contiguous arrays (dinp may be dout)."""
    from .cpu_parallel import for_row_blocks, work_buffer
    dt = inp.dtype.type
    a, s = dt(a), dt(s)

    def block(lo, hi):
        t = work_buffer((hi - lo,), 0)
        _gelu_u(t, inp[lo:hi], a, s)
        np.tanh(t, out=t)
        _gelu_dinp(dinp[lo:hi], inp[lo:hi], dout[lo:hi], t, a, s)

    for_row_blocks(block, inp.shape[0], 1, block=GELU_BLOCK)
