"""gelu (tanh approximation, gelu.cu) and the residual add (residual.cu):
elementwise kernels, one thread per 16-byte pack of values (128-bit loads)
where the buffers allow it (runtime.packs128), else one thread per element.
And Llama's swiglu (swiglu.cu), one thread per output value."""
from __future__ import annotations

from .runtime import BLOCK, blocks, check_floatx, i32, i64, kernel, packs128


def _launch(file, name, bf, n, arrays):
    # the x128 kernel over the packs, or the scalar one over the n values
    packs = packs128(*arrays)
    if packs is None:
        kernel(file, name, bf)((blocks(n),), (BLOCK,), (*arrays, i64(n)))
    else:
        kernel(file, name + "_x128", bf)((blocks(packs),), (BLOCK,), (*arrays, i64(packs)))


def gelu_forward(out, inp):
    # out = 0.5 x (1 + tanh(GELU_S (x + GELU_A x^3)))
    bf = check_floatx(out, inp)
    _launch("gelu.cu", "gelu_forward", bf, inp.size, (out, inp))


def gelu_backward(dinp, inp, dout, scratch):
    # dinp may be the same array as dout; scratch is unused (the kernel keeps
    # its temporaries in registers).
    bf = check_floatx(dinp, inp, dout)
    _launch("gelu.cu", "gelu_backward", bf, inp.size, (dinp, inp, dout))


def residual_forward(out, a, b):
    # out = a + b
    bf = check_floatx(out, a, b)
    _launch("residual.cu", "residual_forward", bf, a.size, (out, a, b))


def swiglu_forward(out, inp):
    # out (N, I) = silu(gate) * up, inp (N, 2I) = [gate | up]
    bf = check_floatx(out, inp)
    I = out.shape[-1]
    N = out.size // I
    kernel("swiglu.cu", "swiglu_forward", bf)((blocks(N * I),), (BLOCK,), (out, inp, i32(N), i32(I)))


def swiglu_backward(dinp, dout, inp):
    # dinp (N, 2I) overwritten: [dgate | dup]
    bf = check_floatx(dinp, dout, inp)
    I = dout.shape[-1]
    N = dout.size // I
    kernel("swiglu.cu", "swiglu_backward", bf)((blocks(N * I),), (BLOCK,), (dinp, dout, inp, i32(N), i32(I)))
