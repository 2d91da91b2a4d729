"""Row chunks on a thread pool: the NumPy backend's non-matmul work on every core.

NumPy's ufuncs run on one core, but they release the GIL while they loop
over a large array. So an op whose rows are independent (layernorm, GELU,
softmax, the classifier) can give each thread a block of rows and run the
same NumPy code on it: the threads' ufunc loops overlap, and only the
Python between them is serialized. (Measured on 2 cores: it pays for
attention, GELU's backward and the (N, 50257) classifier; not for NumPy's
layernorm or GELU forward at GPT-2's sizes. The compiled loops of
cpu_kernels.py give each thread one call over its rows: every call from
Python gives up the GIL and takes it back, which costs more than a small
block's arithmetic.)
Two rules make that pay:
- blocks large enough that the Python per call (~1-2 us) is small beside
  the loop it starts, and small enough to stay in cache while several
  passes run over them (a 64K-float block is 256 KB: Zen 4's L2 is 1 MB);
- no BLAS call inside a block, since OpenBLAS already uses every core;
  except with blas_inside=True: then the BLAS runs on one thread per call
  while the blocks run (each of our threads calls it for its own block).
  That is what small batched matmuls want (attention's (T, T) products per
  head): OpenBLAS splitting a 256 x 256 x 64 product over 2 threads costs
  more in hand-off than it gains (measured: 48 of them, 93 ms with 2 BLAS
  threads, 15 ms with 1, on this 2-core machine).

The pool has as many threads as the BLAS uses (blas_threads(), the same
rule as AdamW's pool); with one thread, or little work, a call runs inline.
Each row's arithmetic is the same whichever thread or block runs it.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIN_PARALLEL = 1 << 15      # floats: below this an op runs on the caller's thread (the hand-off costs more)
BLOCK = 1 << 16             # floats per block of rows: 256 KB, stays in L2 through the op's passes

_pool = None
_threads = None


def threads() -> int:
    global _threads
    if _threads is None:
        _threads = blas_threads()
    return _threads


_blas = None           # threadpoolctl's controller of the BLAS library, or False where there is none


def blas_threads() -> int:
    """The threads NumPy's BLAS runs on (its OpenBLAS's setting; MKL, which the
    CPU bf16 path loads, runs sequential and does not count), else the cores
    this process may use: the size of the thread pools here and in optim.AdamW."""
    blas = _blas_controller()
    if blas:
        return max(1, int(blas.num_threads))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _blas_controller():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            libs = [c for c in ThreadpoolController().lib_controllers
                    if c.user_api == "blas" and c.internal_api != "mkl"]    # NumPy's, not the bf16 path's MKL
            _blas = libs[0] if len(libs) == 1 else False
        except Exception:           # no threadpoolctl: the BLAS threads cannot be set
            _blas = False
    return _blas


@contextlib.contextmanager
def _single_threaded_blas(blas):
    before = blas.num_threads
    blas.set_num_threads(1)
    try:
        yield
    finally:
        blas.set_num_threads(before)


_local = threading.local()   # each thread's work buffers (work_buffer)


def work_buffer(shape, slot: int = 0):
    """A float32 array of `shape` that this thread may use as scratch until
    its next call with the same slot: memory kept and reused, one buffer per
    (thread, slot), grown as needed. A temporary NumPy allocates for an
    expression over a block (256 KB and more) is mmap'ed fresh by the C
    library and page-faulted in again on every call, and page faults from
    the pool's threads queue on one lock of the process: an op on two
    threads was slower than on one until its temporaries came from here."""
    n = int(np.prod(shape))
    bufs = getattr(_local, "buffers", None)
    if bufs is None:
        bufs = _local.buffers = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        buf = bufs[slot] = np.empty(max(n, BLOCK), dtype=np.float32)
    return buf[:n].reshape(shape)


def _get_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(threads(), thread_name_prefix="llmpy-rows")
    return _pool


def _forget_pool_after_fork():
    # A forked child has the pool object but none of its threads (fork copies
    # only the calling thread): work submitted to it would wait for ever. The
    # child makes a pool of its own on first use.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def blocks(n_rows: int, row_size: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """[(lo, hi), ...]: n_rows cut into contiguous blocks of about `block`
    floats each (at least one row a block)."""
    step = max(1, block // max(1, row_size))
    return [(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def for_row_blocks(fn, n_rows: int, row_size: int, block: int = BLOCK, blas_inside: bool = False):
    """Call fn(lo, hi) for every block of rows, spread over the pool's
    threads (thread i takes every threads()-th block, so all finish at
    about the same time); inline when the work is small or there is one thread.
    fn must only touch rows lo:hi of its arrays, and call no BLAS unless
    blas_inside=True (then the BLAS runs single-threaded meanwhile, or, where
    its threads cannot be set, the blocks run one after the other)."""
    parts = blocks(n_rows, row_size, block)
    nt = threads()
    blas = _blas_controller() if blas_inside else None
    if nt == 1 or len(parts) == 1 or n_rows * row_size < MIN_PARALLEL or blas is False:
        for lo, hi in parts:
            fn(lo, hi)
        return
    with contextlib.nullcontext() if blas is None else _single_threaded_blas(blas):
        _run_on_pool(fn, parts, nt)


def rows_per_thread(n_rows: int, row_size: int, min_parallel: int = MIN_PARALLEL) -> int:
    """Rows in each block of for_thread_blocks: n_rows cut evenly over the
    pool's threads, or all of them in one block below min_parallel floats."""
    nt = threads() if n_rows * row_size >= min_parallel else 1
    return max(1, -(-n_rows // nt))


def for_thread_blocks(fn, n_rows: int, row_size: int, min_parallel: int = MIN_PARALLEL):
    """fn(lo, hi) over ONE block of rows per thread (see rows_per_thread):
    for work that needs no cache-sized blocks (a compiled loop, a sequential
    MKL call per block), where every extra call from Python costs a GIL
    round trip. Inline below min_parallel floats."""
    for_row_blocks(fn, n_rows, row_size, block=rows_per_thread(n_rows, row_size, min_parallel) * row_size)


GEMM_PARALLEL = 1 << 22     # M*N*K below which one thread runs a whole product (~8 MFLOP, ~25 us)


def for_gemm_blocks(fn, M: int, N: int, K: int, min_work: int | None = None, by_rows: bool = False):
    """fn(rows, cols), two slices, over ONE block of an (M, N) product's
    output per thread (K: the inner dimension), for a sequential library
    GEMM per block (ops/mkl.py). The output is cut along its longer side:
    GPT-2's 256-row products run best split by columns (measured with MKL,
    bench/RESULTS.md 2026-12-03); columns at multiples of 16 floats (a
    64-byte line), so no line is written by both threads. Inline below
    min_work multiply-adds (default GEMM_PARALLEL). by_rows: always by rows
    (MKL's bf16 GEMM: 1-3% faster so, in a d12 step)."""
    work = M * N * K
    min_work = GEMM_PARALLEL if min_work is None else min_work
    everything = slice(None)
    if M >= N or by_rows:
        for_thread_blocks(lambda lo, hi: fn(slice(lo, hi), everything), M, N * K, min_work)
    else:
        lines = -(-N // 16)
        for_thread_blocks(lambda lo, hi: fn(everything, slice(16 * lo, 16 * hi)), lines, max(1, work // lines),
                          min_work)


def _run_on_pool(fn, parts, nt):

    def work(i):
        for lo, hi in parts[i::nt]:
            fn(lo, hi)

    pool = _get_pool()
    futures = [pool.submit(work, i) for i in range(1, nt)]
    work(0)                                          # the caller's thread takes a share too
    for f in futures:
        f.result()                                   # re-raises a worker's exception here
