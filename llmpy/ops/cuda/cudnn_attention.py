"""Causal self-attention through cuDNN's fused flash attention (SDPA), bf16.

Flash attention never forms the (T, T) score matrix: it streams blocks of
keys and values past each block of queries, keeping a running max and sum
of the softmax (the "online softmax", as our classifier kernel does over the
vocabulary), so memory is O(T) per row instead of O(T^2), and the backward
pass recomputes the scores from q, k and the per-row logsumexp ("stats")
saved by the forward pass. cuDNN's implementation uses the tensor cores.

We call it through the cuDNN frontend's Python graph API on raw device
pointers (no framework). The tensors are described by dims and strides, so
q, k and v are read straight out of the fused qkv activation (B, T, NH +
2 NKV, hs) and the output is written straight into (B, T, NH, hs) = (B, T, C):
no permute copies. Grouped-query attention (Llama) is cuDNN's own case of k
and v with fewer heads than q (NKV dividing NH; dk, dv summed over each
group). One graph per shape and direction is built once and cached.

    forward:  out = softmax(q k^T * scale + causal mask) v,  stats (B, NH, T) float32
    backward: dq, dk, dv from q, k, v, out, dout, stats, written into dqkv

Everything here is wrapped by attention.py beside this file, which checks
the first call of each shape against its own kernels and falls back to them
(with a message) if cuDNN is missing, refuses the graph or disagrees.
"""
from __future__ import annotations

import math

import cudnn

_BF16, _F32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT


class _State:
    handle = None
    graphs: dict = {}          # (direction, B, NH, NKV, T, hs) -> (graph, tensors)
    workspace = None


def _graph():
    if _State.handle is None:
        _State.handle = cudnn.create_handle()
    return cudnn.pygraph(io_data_type=_BF16, intermediate_data_type=_F32, compute_data_type=_F32,
                         handle=_State.handle)


def _qkv_dims(B, NH, NKV, T, hs):
    """(dims, strides) of q, k, v in the (B, T, (NH + 2 NKV) hs) buffer:
    q[b, h, t, d] = qkv[b, t, h, d], k and v NH and NH + NKV heads further."""
    W = (NH + 2 * NKV) * hs
    stride = [T * W, hs, W, 1]
    return [([B, H, T, hs], stride) for H in (NH, NKV, NKV)]


def _qkv_tensors(g, B, NH, NKV, T, hs):
    return [g.tensor(name=n, dim=dim, stride=stride, data_type=_BF16)
            for n, (dim, stride) in zip(("q", "k", "v"), _qkv_dims(B, NH, NKV, T, hs))]


def _offsets(NH, NKV, hs):
    """Bytes from a qkv row's start to its k heads and to its v heads (bf16)."""
    return NH * hs * 2, (NH + NKV) * hs * 2


def _bthd(B, NH, T, hs):
    # (b, h, t, d) in a (B, T, NH, hs) buffer
    C = NH * hs
    return [B, NH, T, hs], [T * C, hs, C, 1]


def _build(g):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _sdpa(g, q, k, v, scale):
    try:
        return g.sdpa(name="attention", q=q, k=k, v=v, generate_stats=True, attn_scale=scale,
                      use_causal_mask=True)
    except TypeError:          # frontends before generate_stats
        return g.sdpa(name="attention", q=q, k=k, v=v, is_inference=False, attn_scale=scale,
                      use_causal_mask=True)


def describe_forward(g, B, NH, NKV, T, hs):
    """Add the forward attention to graph g; returns its tensors (q, k, v, o, stats)."""
    q, k, v = _qkv_tensors(g, B, NH, NKV, T, hs)
    o, stats = _sdpa(g, q, k, v, 1.0 / math.sqrt(hs))
    dim, stride = _bthd(B, NH, T, hs)
    o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(_BF16)
    stats.set_output(True).set_dim([B, NH, T, 1]).set_stride([NH * T, T, 1, 1]).set_data_type(_F32)
    return q, k, v, o, stats


def describe_backward(g, B, NH, NKV, T, hs):
    """Add the backward attention to graph g; returns (q, k, v, o, dO, stats, dq, dk, dv)."""
    q, k, v = _qkv_tensors(g, B, NH, NKV, T, hs)
    dim, stride = _bthd(B, NH, T, hs)
    o = g.tensor(name="o", dim=dim, stride=stride, data_type=_BF16)
    do = g.tensor(name="dO", dim=dim, stride=stride, data_type=_BF16)
    stats = g.tensor(name="stats", dim=[B, NH, T, 1], stride=[NH * T, T, 1, 1], data_type=_F32)
    dq, dk, dv = g.sdpa_backward(name="attention_backward", q=q, k=k, v=v, o=o, dO=do, stats=stats,
                                 attn_scale=1.0 / math.sqrt(hs), use_causal_mask=True)
    for t, (dim, stride) in zip((dq, dk, dv), _qkv_dims(B, NH, NKV, T, hs)):
        # written straight into dqkv, laid out like q, k, v in qkv
        t.set_output(True).set_dim(dim).set_stride(stride).set_data_type(_BF16)
    return q, k, v, o, do, stats, dq, dk, dv


def _built(describe, B, NH, NKV, T, hs):
    """(built graph, its tensors) for describe_forward or describe_backward at
    this shape, made once and cached."""
    key = (describe.__name__, B, NH, NKV, T, hs)
    if key not in _State.graphs:
        g = _graph()
        tensors = describe(g, B, NH, NKV, T, hs)
        _State.graphs[key] = (_build(g), tensors)
    return _State.graphs[key]


def _workspace(graph):
    import cupy

    from .runtime import outgrow
    n = max(1, graph.get_workspace_size())
    if _State.workspace is None or _State.workspace.size < n:
        outgrow(_State.workspace)      # a captured graph may still hold the old address
        _State.workspace = cupy.empty(n, dtype=cupy.uint8)
    return _State.workspace


def _run(graph, pack, stream):
    cudnn.set_stream(handle=_State.handle, stream=stream)
    graph.execute(pack, _workspace(graph).data.ptr, handle=_State.handle)


def forward(out_ptr, stats_ptr, qkv_ptr, B, NH, NKV, T, hs, stream):
    """out (B, T, NH hs) bf16 and stats (B, NH, T) float32 from qkv (B, T, (NH + 2 NKV) hs) bf16
    (device pointers)."""
    graph, (q, k, v, o, stats) = _built(describe_forward, B, NH, NKV, T, hs)
    to_k, to_v = _offsets(NH, NKV, hs)
    _run(graph, {q: qkv_ptr, k: qkv_ptr + to_k, v: qkv_ptr + to_v, o: out_ptr, stats: stats_ptr}, stream)


def backward(dqkv_ptr, dout_ptr, qkv_ptr, out_ptr, stats_ptr, B, NH, NKV, T, hs, stream):
    """dqkv (B, T, (NH + 2 NKV) hs) bf16, overwritten, from the forward's inputs and outputs and
    dout (B, T, NH hs)."""
    graph, (q, k, v, o, do, stats, dq, dk, dv) = _built(describe_backward, B, NH, NKV, T, hs)
    to_k, to_v = _offsets(NH, NKV, hs)
    _run(graph, {q: qkv_ptr, k: qkv_ptr + to_k, v: qkv_ptr + to_v, o: out_ptr, do: dout_ptr,
                 stats: stats_ptr, dq: dqkv_ptr, dk: dqkv_ptr + to_k, dv: dqkv_ptr + to_v}, stream)
