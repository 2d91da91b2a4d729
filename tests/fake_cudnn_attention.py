"""A stand-in for llmpy/ops/cudnn_attention.py on the CPU: the same calls on
the same pointers, computed with the NumPy reference (llmpy/ops/cpu.py) in
float32 and rounded to bf16. It lets tests/test_cuda_host.py run the flash-
attention route of cuda.py and the model (a (B, NH, T) float32 logsumexp
saved instead of the (T, T) probabilities, the first-use check against our
kernels) without cuDNN.

    forward:  out (B, T, C), stats[b, h, t] = logsumexp_s (q_t . k_s * scale), s <= t
    backward: dqkv from q, k, v, dout and stats (probabilities recomputed from stats)
Grouped-query attention (NKV key/value heads) as cuDNN takes it: k and v
with fewer heads than q, query head h reading k/v head h // (NH / NKV).
"""
from __future__ import annotations

import ctypes
import math

import ml_dtypes
import numpy as np

from llmpy.ops import cpu

BF16 = np.dtype(ml_dtypes.bfloat16)
calls = []


def _array(ptr, shape, dtype):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    return np.frombuffer((ctypes.c_char * (n * dtype.itemsize)).from_address(ptr), dtype=dtype, count=n).reshape(shape)


def _scores(qkv, B, NH, NKV, T, hs):
    """(B, NH, T, T) scaled, causally masked scores; query head h against k head h // (NH / NKV)."""
    C = NH * hs
    q = qkv[..., :C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    k = np.repeat(qkv[..., C:C + NKV * hs].reshape(B, T, NKV, hs), NH // NKV, axis=2).transpose(0, 2, 1, 3)
    s = (q @ k.swapaxes(-1, -2)) / np.float32(math.sqrt(hs))
    s[..., np.triu(np.ones((T, T), bool), k=1)] = -np.inf
    return s


def forward(out_ptr, stats_ptr, qkv_ptr, B, NH, NKV, T, hs, stream):
    calls.append("forward")
    C, W = NH * hs, (NH + 2 * NKV) * hs
    qkv = _array(qkv_ptr, (B, T, W), BF16).astype(np.float32)
    out = np.empty((B, T, C), np.float32)
    cpu.gqa_attention_forward(out, np.empty((B, NH, T, T), np.float32), qkv, NH, NKV)
    _array(out_ptr, (B, T, C), BF16)[...] = out
    s = _scores(qkv, B, NH, NKV, T, hs)
    m = s.max(axis=-1)
    _array(stats_ptr, (B, NH, T), np.float32)[...] = m + np.log(np.exp(s - m[..., None]).sum(axis=-1))


def backward(dqkv_ptr, dout_ptr, qkv_ptr, out_ptr, stats_ptr, B, NH, NKV, T, hs, stream):
    calls.append("backward")
    C, W = NH * hs, (NH + 2 * NKV) * hs
    qkv = _array(qkv_ptr, (B, T, W), BF16).astype(np.float32)
    dout = _array(dout_ptr, (B, T, C), BF16).astype(np.float32)
    stats = _array(stats_ptr, (B, NH, T), np.float32)
    # the probabilities recomputed from q, k and the saved logsumexps, as flash attention does
    att = np.exp(_scores(qkv, B, NH, NKV, T, hs) - stats[..., None]).astype(np.float32)
    dqkv = np.empty((B, T, W), np.float32)
    cpu.gqa_attention_backward(dqkv, dout, qkv, att, np.empty_like(att), NH, NKV)
    _array(dqkv_ptr, (B, T, W), BF16)[...] = dqkv
