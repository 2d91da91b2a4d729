"""encoder: token + position embedding, out[b, t] = wte[ids[b, t]] + wpe[t]
(GPT-2); and embedding, the token rows alone (Llama: RoPE carries the positions).

Kernels in encoder.cu (read it for the math of the backward and why its
scatter-add is deterministic without atomics: runs of equal ids, summed in
sorted order, segment by segment, long runs in a second pass).
"""
from __future__ import annotations

import cupy
import numpy as np

from ..cuda_build import ENCODER_SEGMENT
from .runtime import BLOCK, WARP, blocks, check_floatx, i32, ids64, kernel, scratch, zero


def encoder_forward(out, ids, wte, wpe):
    # out (B, T, C), ids (B, T) int, wte (Vp, C), wpe (maxT, C)
    bf = check_floatx(out, wte, wpe)
    B, T = ids.shape
    C = wte.shape[1]
    n = B * T * C
    kernel("encoder.cu", "encoder_forward", bf)(
        (blocks(n),), (BLOCK,), (out, ids64(ids), wte, wpe, i32(B * T), i32(T), i32(C)))


def host_sort(ids):
    """(sorted ids, order) for encoder_backward, computed on the host from host
    ids: positions sorted by (token id, position), a unique key, so the order
    of the sums does not depend on the sort. (The device step does this on the
    CPU, where the batch comes from, instead of sorting on the GPU.)"""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    if flat.size and 0 <= flat.min() and flat.max() < 1 << 16:
        # a stable sort of the ids alone keeps equal ids in position order (the
        # same order as the unique key below); NumPy radix-sorts 16-bit keys
        order = np.argsort(flat.astype(np.uint16), kind="stable")
    else:
        order = np.argsort(flat * flat.size + np.arange(flat.size, dtype=np.int64), kind="stable")
    return flat[order], order


def encoder_backward(dwte, dwpe, dout, ids, acc=True, sorted_order=None):
    # dwte gets the scatter-add of dout's rows, dwpe the sum over the batch.
    # sorted_order: (sorted ids, order) as device int64 arrays (see host_sort),
    # else the sort is done here on the GPU.
    bf = check_floatx(dwte, dwpe, dout)
    B, T, C = dout.shape
    if not acc:
        zero(dwte)
        zero(dwpe[T:])
    kernel("encoder.cu", "encoder_backward_wpe", bf)(
        (blocks(T * C),), (BLOCK,), (dwpe, dout, i32(B), i32(T), i32(C), i32(1 if acc else 0)))
    _scatter_wte(dwte, dout, ids, sorted_order, bf)


def embedding_forward(out, ids, wte):
    # Llama: out[b, t] = wte[ids[b, t]]; out (B, T, C)
    bf = check_floatx(out, wte)
    B, T = ids.shape
    C = wte.shape[1]
    kernel("encoder.cu", "embedding_forward", bf)(
        (blocks(B * T * C),), (BLOCK,), (out, ids64(ids), wte, i32(B * T), i32(C)))


def embedding_backward(dwte, dout, ids, acc=True, sorted_order=None):
    # dwte (+)= the scatter-add of dout's rows (encoder_backward's, without dwpe)
    bf = check_floatx(dwte, dout)
    if not acc:
        zero(dwte)
    _scatter_wte(dwte, dout, ids, sorted_order, bf)


def _scatter_wte(dwte, dout, ids, sorted_order, bf):
    """dwte[v] += the rows of dout (B, T, C) at the positions of token v, in
    sorted order (see encoder.cu); sorted_order as encoder_backward's."""
    B, T, C = dout.shape
    N = B * T
    if sorted_order is not None:
        sorted_ids, order = sorted_order
    else:
        # Sort positions by token id; the key id * N + position is unique, so the
        # order (and with it the order of the sums) does not depend on the sort.
        flat = ids64(ids)
        order = cupy.argsort(flat * N + cupy.arange(N, dtype=cupy.int64))
        sorted_ids = cupy.ascontiguousarray(flat[order])
    # segments of ENCODER_SEGMENT sorted positions x a warp-multiple of channels;
    # pass 1 sums the runs inside each segment, pass 2 the runs that cross segments
    nseg = blocks(N, ENCODER_SEGMENT)
    threads = min(BLOCK, WARP * blocks(C, WARP))
    grid = (nseg, blocks(C, threads))
    pieces = scratch(nseg * 2 * C, slot="encoder_pieces")       # (nseg, 2, C) float32
    kernel("encoder.cu", "encoder_backward_wte", bf)(
        grid, (threads,), (dwte, pieces, dout, sorted_ids, order, i32(N), i32(C)))
    kernel("encoder.cu", "encoder_backward_wte_crossing", bf)(
        grid, (threads,), (dwte, pieces, sorted_ids, i32(N), i32(C)))
