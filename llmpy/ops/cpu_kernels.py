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
