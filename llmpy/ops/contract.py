"""The op contract: what every backend (llmpy.ops.cpu, llmpy.ops.cuda) provides.

The model (llmpy/model.py) is written once against this list; a backend is a
module with these names, these signatures and this math. ARCHITECTURE.md
tells the story; this file is the list itself, and tests/test_contract.py
checks both backends against it (names and inspect.signature).

Conventions (the same in every op, on every backend):
- out-parameter style, as in llm.c: an op writes into arrays it is given and
  allocates nothing large, so a training step reuses the same memory;
- parameter gradients (dweight, dbias, dwte, ...) are overwritten when
  `acc=False` and added to when `acc=True` (gradient accumulation);
- activation gradients are overwritten (`dinp = ...`), except layernorm's,
  which adds into the residual stream's gradient (`dinp += ...`): the
  residual connection sends the same gradient down two paths that meet there;
- storage: activations and parameters are float32 ("fp32"), or bfloat16
  ("bf16", CUDA only) with every statistic (layernorm mean/rstd, logsumexp,
  losses, AdamW's m and v, the master weights) float32; arithmetic is float32.

Shapes: B batch, T time, C channels, NH heads, hs = C // NH head size,
V vocabulary (Vp >= V padded), N = B * T rows. Row-major; activations as
(N, C) where that is simpler. Weights W are stored (OC, C), as in llm.c.

This module imports nothing but NumPy, so the CPU side (memory_estimate,
llmpy/profile.py, the tests) can read it without CuPy.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# GPT-2's constants, shared by the NumPy ops and the CUDA kernels (which get
# them as -D options, see llmpy/ops/cuda_build.py): one definition each.
LN_EPS = 1e-5                       # layer_norm_epsilon: rstd = 1 / sqrt(var + eps)
GELU_S = math.sqrt(2.0 / math.pi)   # gelu (tanh form): 0.5 x (1 + tanh(s (x + a x^3)))
GELU_A = 0.044715


class Op(NamedTuple):
    signature: str      # the parameters, exactly as the backends' `def` spells them
    math: str           # what it computes (shapes in the signature's order)
    kernel: bool = True  # device work worth timing (llmpy/profile.py); False: host-side glue


# ----------------------------------------------------------------------------
# the layers: forward and backward, the same on both backends

OPS: dict[str, Op] = {
    # encoder: token + position embedding
    "encoder_forward": Op(
        "(out, ids, wte, wpe)",
        "out[b, t] = wte[ids[b, t]] + wpe[t];  out (B, T, C), ids (B, T) int, wte (Vp, C), wpe (maxT, C)"),
    "encoder_backward": Op(
        "(dwte, dwpe, dout, ids, acc=True, sorted_order=None)",
        "dwte[v] (+)= sum of dout[b, t] over ids[b, t] == v (a scatter-add);  dwpe[t] (+)= sum_b dout[b, t]; "
        "sorted_order: (sorted ids, order) precomputed by cuda.host_sort (CPU ignores it)"),
    # layernorm: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + LN_EPS)
    "layernorm_forward": Op(
        "(out, mean, rstd, inp, weight, bias)",
        "out = (inp - mean) * rstd * weight + bias per row;  out, inp (N, C); mean, rstd (N,) float32; "
        "weight, bias (C,)"),
    "residual_layernorm_forward": Op(
        "(res, out, mean, rstd, a, b, weight, bias)",
        "res = a + b (res may be a), then out = layernorm(res): the residual add fused with the layernorm "
        "after it;  res, out, a, b (N, C)"),
    "layernorm_backward": Op(
        "(dinp, dweight, dbias, dout, inp, weight, mean, rstd, scratch, acc=True)",
        "xhat = (inp - mean) * rstd, g = dout * weight:  dinp += rstd (g - mean_c(g) - xhat mean_c(g xhat)) "
        "(ADDED: the residual stream's gradient);  dweight (+)= sum_n dout xhat;  dbias (+)= sum_n dout; "
        "scratch (2, N, C) float32"),
    # matmul: out = inp @ W^T + b, optionally fused with the GELU after GPT-2's fc layer
    "matmul_forward": Op(
        "(out, inp, weight, bias, gelu_out=None)",
        "out = inp @ weight^T + bias (bias may be None);  with gelu_out: also gelu_out = gelu(out); "
        "out (N, OC), inp (N, C), weight (OC, C), bias (OC,)"),
    "matmul_backward": Op(
        "(dinp, dweight, dbias, dout, inp, weight, acc=True, gelu_inp=None, gelu_scratch=None)",
        "dinp = dout @ weight (skipped if None; with gelu_inp: times gelu'(gelu_inp), gelu_scratch of dinp's "
        "shape);  dweight (+)= dout^T @ inp;  dbias (+)= sum_n dout (skipped if None)"),
    # attention: causal multi-head self-attention from the fused qkv projection
    "attention_forward": Op(
        "(out, att, qkv, n_head)",
        "att = softmax(q k^T / sqrt(hs) + causal mask), out = att v, heads merged;  out (B, T, C), "
        "qkv (B, T, 3C); att keeps what the backward needs, of the shape attention_saved says"),
    "attention_backward": Op(
        "(dqkv, dout, qkv, att, datt, n_head, out=None)",
        "dv = att^T dy, datt = dy v^T, dpre = att (datt - rowsum(datt att)) / sqrt(hs), dq = dpre k, "
        "dk = dpre^T q;  dqkv (B, T, 3C) overwritten; datt scratch; out: the forward's output (flash only)"),
    "attention_forward_cached": Op(
        "(out, q, k, v, pos)",
        "inference: t new queries against the pos + t cached keys, query i sees keys s <= pos + i; "
        "out, q (B, NH, t, hs); k, v (B, NKV, pos + t, hs), NKV dividing NH: query head h reads k/v head "
        "h // (NH / NKV) (NKV = NH: multi-head); nothing is kept for a backward"),
    # gelu (tanh form) and the residual add: elementwise
    "gelu_forward": Op(
        "(out, inp)",
        "out = 0.5 x (1 + tanh u),  u = GELU_S (x + GELU_A x^3)"),
    "gelu_backward": Op(
        "(dinp, inp, dout, scratch)",
        "dinp = dout * (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) GELU_S (1 + 3 GELU_A x^2)); dinp may be dout; "
        "scratch has inp's shape"),
    "residual_forward": Op(
        "(out, a, b)",
        "out = a + b (its backward passes the gradient to both unchanged: no op)"),
    # the classifier: softmax + cross-entropy over (N, Vp) logits of which the first V columns are real
    "crossentropy_forward": Op(
        "(losses, lse, logits, targets, V=None)",
        "lse_n = logsumexp(logits_n[:V]), losses_n = lse_n - logits_n[y_n];  losses, lse (N,) float32; "
        "targets (N,) int; V defaults to all columns"),
    "crossentropy_forward_backward": Op(
        "(losses, lse, logits, targets, dloss, V=None)",
        "crossentropy_forward, then crossentropy_backward, in one pass over the logits"),
    "crossentropy_backward": Op(
        "(logits, lse, targets, dloss, V=None)",
        "in place: logits_n[:V] = (softmax(logits_n) - onehot(y_n)) * dloss, logits_n[V:] = 0; "
        "dloss a scalar (1 / N for a mean, times the loss scale)"),
    # the global gradient norm is sqrt of this
    "sum_of_squares": Op(
        "(x)",
        "sum(x^2) over the whole array, as a Python float (on the GPU: this synchronizes)"),
}


# ----------------------------------------------------------------------------
# the backend itself: attributes and helpers the model reads, on both backends

ATTRIBUTES = {
    "name": "the backend's name, 'cpu' or 'cuda'",
    "xp": "its array module (numpy, or cupy): what the model allocates with",
    "ln_scratch_rows_per_chunk": "layernorm_backward's scratch holds (2, ceil(N / this), C) float32 partial sums",
    "needs_gelu_scratch": "whether matmul_backward(gelu_inp=...) needs gelu_scratch (N, 4C), or None will do",
}

HELPERS: dict[str, Op] = {
    "storage_dtype": Op("(dtype)", "the array dtype for a model of precision 'fp32' or 'bf16' (or a refusal)",
                        kernel=False),
    "params_dtype": Op("(dtype)", "the dtype of the weights the ops read (model.compute_params): the storage "
                       "dtype, except on the CPU in bf16 (bf16 weights, fp32 activations)", kernel=False),
    "cast": Op("(dst, src)", "dst = src (float32) rounded to dst's storage type, to nearest even", kernel=False),
    "zero": Op("(x)", "x[...] = 0", kernel=False),
    "to_host": Op("(x)", "x as a NumPy array", kernel=False),
    "synchronize": Op("()", "wait for all queued work (time a step only after this)", kernel=False),
    "attention_saved": Op("(B, NH, T, hs, dtype, n_kv_head=None)",
                          "(att shape, att dtype, datt shape) attention_forward (gqa_attention_forward with "
                          "n_kv_head key/value heads) keeps: see attention_saved below",
                          kernel=False),
}


# ----------------------------------------------------------------------------
# what only one backend has, and why
#
# The optimizer's update differs per backend by design: the CPU updates the
# flat buffer in chunks that stay in cache, on several threads
# (optim.AdamW calls adamw_update per chunk); the GPU has no cache to chunk
# for and updates the whole buffer in one launch, with gradient clipping and
# the bf16 weights' stochastic rounding folded in (adamw_step_flat). Both
# compute the same AdamW step (the math in cpu.adamw_update's docstring).
# The CUDA backend also has the pieces that let a training step run with no
# host synchronization (llmpy/step.py's DeviceStep, a CUDA graph).

ONLY_ON: dict[str, dict[str, Op]] = {
    "cpu": {
        "adamw_update": Op(
            "(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, scratch, grad_scale=1.0)",
            "one AdamW step on a flat chunk, in place, g = grad_scale * grad; scratch (2, >= chunk) float32"),
    },
    "cuda": {
        "adamw_step_flat": Op(
            "(param, grad, m, v, segments, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0, "
            "param_copy=None, sumsq=None, max_norm=-1.0, upload_hyper=True)",
            "one AdamW step over the whole flat buffer in one launch; segments [(start, stop, decay)]; "
            "param_copy: the bf16 weights, rewritten with stochastic rounding; with sumsq and max_norm >= 0 "
            "the clipping (and the skip of a non-finite step) in the kernel"),
        "adamw_hyper": Op(
            "(lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0, max_norm=-1.0)",
            "write step `step`'s AdamW scalars to the device buffer adamw_step_flat reads (before a graph replay)",
            kernel=False),
        "sum_of_squares_into": Op("(x, out)", "out[0] (float64, device) = sum(x^2), without waiting for it"),
        "accumulate_sum": Op("(acc, x, scale, first)",
                             "acc[0] (float64, device) = (0 if first else acc[0]) + scale * sum(x), x float32"),
        "host_sort": Op("(ids)", "(sorted ids, order) of host ids for encoder_backward's sorted_order",
                        kernel=False),
        "upload": Op("(dst, host)", "copy a small host array into a device buffer, in order on the stream",
                     kernel=False),
    },
}

# Non-function attributes only the CUDA backend has.
CUDA_ATTRIBUTES = {
    "cupy": "the CuPy module (streams, graphs)",
    "matmul_library": "which library does the matmuls, and why not cuBLASLt if not",
    "attention_library": "which path attention takes, and why not cuDNN if not",
    "capturable": "True when a training step can be captured as a CUDA graph (nothing allocates per step: cuBLASLt)",
}


# ----------------------------------------------------------------------------
# the Llama family's layers (llmpy/llama.py): RMSNorm, rotary embeddings,
# SwiGLU, grouped-query attention, and an embedding without positions
#
# Shapes as above, plus: NKV key/value heads (NH % NKV == 0: each k/v head
# serves G = NH / NKV query heads), hs the head size (Llama's head_dim, not
# always C / NH), I the MLP's intermediate size. The attention input is the
# fused projection qkv (B, T, (NH + 2 NKV) hs): NH query heads, then NKV key
# heads, then NKV value heads, each hs wide (q_proj, k_proj and v_proj
# stacked). Same conventions as the GPT-2 ops: out-parameters, acc for the
# parameter gradients, rmsnorm's backward ADDS into the residual stream.
# Every backend has them (functions() demands them of both).

LLAMA_OPS: dict[str, Op] = {
    # token embedding alone (RoPE carries the positions)
    "embedding_forward": Op(
        "(out, ids, wte)",
        "out[b, t] = wte[ids[b, t]];  out (B, T, C), ids (B, T) int, wte (Vp, C)"),
    "embedding_backward": Op(
        "(dwte, dout, ids, acc=True, sorted_order=None)",
        "dwte[v] (+)= sum of dout[b, t] over ids[b, t] == v (a scatter-add); sorted_order as encoder_backward's"),
    # rmsnorm: y = x * rstd * w,  rstd = 1 / sqrt(mean_c(x^2) + eps)  (no mean removed, no bias)
    "rmsnorm_forward": Op(
        "(out, rstd, inp, weight, eps)",
        "out = inp * rstd * weight per row, rstd = 1 / sqrt(mean_c(inp^2) + eps);  out, inp (N, C); "
        "rstd (N,) float32; weight (C,); eps the config's rms_norm_eps"),
    "residual_rmsnorm_forward": Op(
        "(res, out, rstd, a, b, weight, eps)",
        "res = a + b (res may be a), then out = rmsnorm(res): the residual add fused with the norm after it"),
    "rmsnorm_backward": Op(
        "(dinp, dweight, dout, inp, weight, rstd, scratch, acc=True)",
        "xhat = inp * rstd, g = dout * weight:  dinp += rstd (g - xhat mean_c(g xhat)) (ADDED: the residual "
        "stream's gradient);  dweight (+)= sum_n dout xhat;  scratch (2, N, C) float32 (as layernorm_backward's)"),
    # rotary position embedding, Hugging Face's rotate-half layout: each head's
    # halves x1 = x[:hs/2], x2 = x[hs/2:] rotated as pairs (x1_i, x2_i) by angle t * inv_freq_i
    "rope_forward": Op(
        "(out, inp, cos, sin)",
        "out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin;  out, inp (B, T, H, hs) (any strides; out may be inp); "
        "cos, sin (T, hs / 2) float32: the angles of the T positions (a slice of the host's table)"),
    "rope_backward": Op(
        "(dinp, dout, cos, sin)",
        "the inverse rotation (a rotation's transpose): dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin; "
        "dinp may be dout"),
    # SwiGLU on the fused gate and up projections
    "swiglu_forward": Op(
        "(out, inp)",
        "out = silu(gate) * up, silu(x) = x sigmoid(x);  out (N, I), inp (N, 2I) = [gate | up]"),
    "swiglu_backward": Op(
        "(dinp, dout, inp)",
        "dgate = dout up sigmoid(gate) (1 + gate (1 - sigmoid(gate))), dup = dout silu(gate);  dinp (N, 2I) "
        "overwritten"),
    # grouped-query causal attention (NKV = NH is multi-head attention)
    "gqa_attention_forward": Op(
        "(out, att, qkv, n_head, n_kv_head)",
        "query head h uses k/v head h // G:  att = softmax(q k^T / sqrt(hs) + causal mask), out = att v, heads "
        "merged;  out (B, T, NH hs), qkv (B, T, (NH + 2 NKV) hs); att as attention_saved(B, NH, T, hs) says"),
    "gqa_attention_backward": Op(
        "(dqkv, dout, qkv, att, datt, n_head, n_kv_head, out=None)",
        "as attention_backward per query head; dk, dv of a k/v head summed over its G query heads;  "
        "dqkv (B, T, (NH + 2 NKV) hs) overwritten; datt scratch; out: the forward's output (flash only)"),
}

def functions(backend: str) -> dict[str, Op]:
    """Every function backend `backend` ('cpu' or 'cuda') must define: the
    layer ops of both families, the helpers and its own optimizer /
    device-step pieces."""
    return {**OPS, **LLAMA_OPS, **HELPERS, **ONLY_ON[backend]}


def timed_ops() -> tuple[str, ...]:
    """The functions llmpy/profile.py times (device work, either backend)."""
    names = {n: None for n, op in {**OPS, **ONLY_ON["cpu"], **ONLY_ON["cuda"], **LLAMA_OPS}.items() if op.kernel}
    return tuple(names)


# ----------------------------------------------------------------------------
# what attention keeps for its backward pass

def attention_saved(B, NH, T, hs, dtype, flash: bool):
    """(att shape, att dtype, datt shape) for attention_forward / _backward
    with storage type `dtype`.

    Our own attention keeps the softmax probabilities, (B, NH, T, T) of the
    storage type, and its backward needs scratch of the same shape for datt.
    Flash attention (cuDNN, used for non-float32 storage only: `flash` is
    ignored for float32) never forms the (T, T) matrix: it keeps one float32
    logsumexp per row, (B, NH, T), and recomputes the probabilities from q, k
    and it in the backward pass, which needs no datt (a (1,) placeholder).
    """
    if flash and np.dtype(dtype) != np.float32:
        return (B, NH, T), np.float32, (1,)
    return (B, NH, T, T), dtype, (B, NH, T, T)
