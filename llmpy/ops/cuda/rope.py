"""rope (Llama): rotary position embedding on the q and k heads, Hugging
Face's rotate-half layout; the kernel and its math are rope.cu's.

The heads arrive as a strided (B, T, H, hs) view into the fused qkv
activation (the model rotates q and k where they lie); the kernel gets the
memory the view spans and the rows' stride, and indexes it itself.
"""
from __future__ import annotations

from .runtime import blocks, BLOCK, check_f32, check_floatx, i32, i64, kernel, span


def _row_stride(x) -> int:
    """The distance in values between consecutive (b, t) rows of a (B, T, H, hs)
    view whose heads are hs apart and whose values are adjacent."""
    B, T, H, hs = x.shape
    st = [s // x.itemsize for s in x.strides]
    row = st[1] if T > 1 else st[0]
    if (st[3] != 1 and hs > 1) or (st[2] != hs and H > 1) or (B > 1 and st[0] != T * row):
        raise ValueError(f"rope: the heads must be rows of hs adjacent values, rows evenly spaced; "
                         f"got shape {x.shape}, strides {x.strides}")
    return row


def _rotate(out, inp, cos, sin, inverse):
    if out.shape != inp.shape or out.strides != inp.strides:
        raise ValueError(f"rope: out {out.shape} {out.strides} must be laid out as inp {inp.shape} {inp.strides}")
    B, T, H, hs = inp.shape
    half = hs // 2
    if cos.shape != (T, half) or sin.shape != (T, half):
        raise ValueError(f"rope: cos, sin must be {(T, half)}, got {cos.shape}, {sin.shape}")
    check_f32(cos, sin)
    row = _row_stride(inp)
    o, i = span(out), span(inp)
    bf = check_floatx(o, i)
    n = B * T * H * half
    kernel("rope.cu", "rope_rotate", bf)(
        (blocks(n),), (BLOCK,), (o, i, cos, sin, i32(B * T), i32(T), i32(H), i32(half), i64(row), i32(inverse)))


def rope_forward(out, inp, cos, sin):
    # out, inp (B, T, H, hs) views laid out alike (out may be inp); cos, sin (T, hs/2) float32
    _rotate(out, inp, cos, sin, inverse=0)


def rope_backward(dinp, dout, cos, sin):
    # the rotation by -angle (a rotation's transpose); dinp may be dout
    _rotate(dinp, dout, cos, sin, inverse=1)
