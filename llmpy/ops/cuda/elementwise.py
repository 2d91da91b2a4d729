"""gelu (tanh approximation, gelu.cu) and the residual add (residual.cu):
elementwise kernels, one thread per element."""
from __future__ import annotations

from .runtime import BLOCK, blocks, check_floatx, i64, kernel


def gelu_forward(out, inp):
    # out = 0.5 x (1 + tanh(GELU_S (x + GELU_A x^3)))
    bf = check_floatx(out, inp)
    kernel("gelu.cu", "gelu_forward", bf)((blocks(inp.size),), (BLOCK,), (out, inp, i64(inp.size)))


def gelu_backward(dinp, inp, dout, scratch):
    # dinp may be the same array as dout; scratch is unused (the kernel keeps
    # its temporaries in registers).
    bf = check_floatx(dinp, inp, dout)
    kernel("gelu.cu", "gelu_backward", bf)((blocks(inp.size),), (BLOCK,), (dinp, inp, dout, i64(inp.size)))


def residual_forward(out, a, b):
    # out = a + b
    bf = check_floatx(out, a, b)
    kernel("residual.cu", "residual_forward", bf)((blocks(a.size),), (BLOCK,), (out, a, b, i64(a.size)))
