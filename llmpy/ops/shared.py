"""What both backends compute the same way, written once for NumPy and CuPy
arrays alike (`xp` is the array module): the head split of the fused qkv
activation, the causal mask, and attention against a KV cache.
"""
from __future__ import annotations

import math

import numpy as np


def gqa_heads(x, B, T, NH, NKV):
    """(B, T, (NH + 2 NKV) hs) -> q (B, NH, T, hs), k and v (B, NKV, T, hs):
    views of grouped-query attention's fused qkv (no copy: only a reshape and
    a transpose, so BLAS or the caller takes the strides)."""
    hs = x.shape[-1] // (NH + 2 * NKV)
    heads = x.reshape(B, T, NH + 2 * NKV, hs).transpose(0, 2, 1, 3)
    return heads[:, :NH], heads[:, NH:NH + NKV], heads[:, NH + NKV:]


def split_heads(x, B, T, NH):
    """(B, T, 3C) -> q, k, v, three (B, NH, T, hs) views: multi-head
    attention's fused qkv, gqa_heads with NKV = NH."""
    return gqa_heads(x, B, T, NH, NH)


_MASKS: dict = {}


def upper_triangle(xp, T):
    """(T, T) bool, True above the diagonal: the keys s > t that query t may
    not see. Made once per array module and size."""
    key = (xp, T)
    if key not in _MASKS:
        _MASKS[key] = xp.triu(xp.ones((T, T), dtype=bool), k=1)
    return _MASKS[key]


# ----------------------------------------------------------------------------
# cached attention (inference only): t new queries against every key so far
#
# Incremental decoding keeps each layer's keys and values of all earlier
# positions (the KV cache, see inference.py); a step then computes q, k, v for
# the t new tokens only. New token i sits at absolute position pos + i and, as
# in the causal mask of attention_forward, may look at positions 0 .. pos + i:
#   att = softmax(q K^T / sqrt(hs) + mask),  out = att V
# where K, V are the cache's first pos + t rows (the new k, v already written).
# Grouped-query attention (Llama): the cache holds NKV <= NH key/value heads,
# and query head h reads k/v head h // G, G = NH / NKV. Splitting q's heads
# into (NKV, G) and giving k, v a group axis of 1 lets the batched matmuls
# broadcast each k/v head over its G query heads, with no copy of the cache
# (NKV = NH, G = 1: multi-head attention, GPT-2).
# A sampling path, small next to a training step: plain array code.

def attention_forward_cached(xp, out, q, k, v, pos):
    # out, q (B, NH, t, hs); k, v (B, NKV, pos + t, hs), NKV dividing NH; no backward is kept.
    B, NH, t, hs = q.shape
    NKV = k.shape[1]
    if q.dtype != np.float32:
        # bf16 model (CUDA): this small computation in float32 (CuPy's bf16
        # support covers fewer functions), rounded once into out
        q, k, v = (a.astype(np.float32) for a in (q, k, v))
    q = q.reshape(B, NKV, NH // NKV, t, hs)              # (B, NKV, G, t, hs): splitting an axis is a view
    k, v = k[:, :, None], v[:, :, None]                  # (B, NKV, 1, S, hs)
    att = xp.matmul(q, k.swapaxes(-1, -2))               # (B, NKV, G, t, S)
    att *= np.float32(1.0 / math.sqrt(hs))
    if t > 1:
        # query i may not see key s > pos + i: only the new block is masked
        att[..., :, pos:] = xp.where(upper_triangle(xp, t), np.float32(-np.inf), att[..., :, pos:])
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    out[...] = xp.matmul(att, v).reshape(B, NH, t, hs)
