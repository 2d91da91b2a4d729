"""The fused classifier: softmax + cross-entropy over the vocabulary, and its
gradient written in place into the logits (classifier.cu: one block per row,
an online max / sum in one read of the row).

Every sweep over the logits uses 128-bit loads and stores where the rows allow
(runtime.rows128: Vp whole 16-byte packs, the logits aligned).

The logits are (N, Vp) with only the first V columns real (the model pads
the vocabulary for the matmuls): the forward skips the padding, the backward
writes 0 there.
"""
from __future__ import annotations

from .runtime import check_f32, check_floatx, f32, i32, ids64, kernel, rows128

CE_BLOCK = 1024             # one block per row of 50257 logits: ~50 values per thread


def _logits_shape(logits, V):
    """(bf16?, N, V, Vp) of (N, Vp) logits whose first V (default: all) columns are real."""
    bf = check_floatx(logits)
    N, Vp = logits.shape
    return bf, N, Vp if V is None else V, Vp


def crossentropy_forward(losses, lse, logits, targets, V=None):
    # losses, lse (N,) float32; logits (N, Vp) of which the first V columns are real; targets (N,) int
    check_f32(losses, lse)
    bf, N, V, Vp = _logits_shape(logits, V)
    x128 = "_x128" if rows128(Vp, logits) else ""      # the read pass with 128-bit loads
    kernel("classifier.cu", "crossentropy_forward" + x128, bf)(
        (N,), (CE_BLOCK,), (losses, lse, logits, ids64(targets), i32(N), i32(V), i32(Vp)))


def crossentropy_forward_backward(losses, lse, logits, targets, dloss, V=None):
    # crossentropy_forward, then crossentropy_backward, in one kernel (one pass over the logits)
    check_f32(losses, lse)
    bf, N, V, Vp = _logits_shape(logits, V)
    x128 = "_x128" if rows128(Vp, logits) else ""      # both sweeps with 128-bit access
    kernel("classifier.cu", "crossentropy_forward_backward" + x128, bf)(
        (N,), (CE_BLOCK,), (losses, lse, logits, ids64(targets), f32(dloss), i32(N), i32(V), i32(Vp)))


def crossentropy_backward(logits, lse, targets, dloss, V=None):
    # logits (N, Vp) become (softmax - onehot) * dloss in the first V columns, 0 after, in place
    check_f32(lse)
    bf, N, V, Vp = _logits_shape(logits, V)
    x128 = "_x128" if rows128(Vp, logits) else ""
    kernel("classifier.cu", "crossentropy_backward" + x128, bf)(
        (N,), (CE_BLOCK,), (logits, lse, ids64(targets), f32(dloss), i32(N), i32(V), i32(Vp)))
