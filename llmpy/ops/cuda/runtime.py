"""The CUDA backend's runtime: compiling and launching our kernels, the
memory they work in, and the checks on the arrays they are handed.

Every layer module (encoder.py, layernorm.py, ...) launches its kernels as

    kernel("layernorm.cu", "layernorm_forward", bf16)(grid, block, args)

Each .cu file is compiled by NVRTC through cupy.RawModule once per process
and storage type (and cached on disk by CuPy across processes), with the
options of llmpy/ops/cuda_build.py; each kernel handle is looked up once and
kept, so a launch is a dictionary lookup and the launch itself.
"""
from __future__ import annotations

import cupy
import numpy as np

from .. import cuda_build
from ...errors import LlmpyError

BLOCK = 256                 # threads per block for elementwise kernels (and most others)
WARP = 32                   # threads per warp (the hardware's; WARP_SIZE in common.cuh)
i32, i64, f32 = np.int32, np.int64, np.float32   # kernel scalar argument types


# ----------------------------------------------------------------------------
# compiling and launching

_modules: dict[tuple[str, bool], cupy.RawModule] = {}             # (file, bf16) -> compiled module
_kernels: dict[tuple[str, str, bool], cupy.RawKernel] = {}        # (file, kernel, bf16) -> handle


def kernel(filename: str, name: str, bf16: bool = False) -> cupy.RawKernel:
    """Kernel `name` of `filename` (beside this module) for fp32 or bf16
    storage. RawModule compiles for the current device's architecture."""
    key = (filename, name, bf16)
    k = _kernels.get(key)
    if k is None:
        mod = _modules.get((filename, bf16))
        if mod is None:
            mod = cupy.RawModule(code=cuda_build.source(filename), options=cuda_build.options(bf16))
            _modules[(filename, bf16)] = mod
        k = _kernels[key] = mod.get_function(name)
    return k


def packs128(*arrays) -> int | None:
    """How many 16-byte packs each array holds, when a kernel may move them
    with 128-bit loads (common.cuh's load128): every array starts on a
    16-byte boundary and holds the same whole number of packs. None: use
    the one-value-per-thread kernel (a view starting mid-pack, a size that
    leaves a tail)."""
    nbytes = arrays[0].nbytes
    if nbytes % 16 or any(a.nbytes != nbytes or ptr(a) % 16 for a in arrays):
        return None
    return nbytes // 16


def rows128(C: int, *arrays) -> bool:
    """Whether a row kernel may read rows of C values with 128-bit loads:
    C is whole 16-byte packs and every array starts on a 16-byte boundary
    (so every row does too)."""
    return (C * arrays[0].itemsize) % 16 == 0 and all(ptr(a) % 16 == 0 for a in arrays)


def blocks(n: int, per_block: int = BLOCK) -> int:
    """Blocks of per_block threads (or rows) that cover n: ceil(n / per_block), at least 1."""
    return max(1, (n + per_block - 1) // per_block)


# ----------------------------------------------------------------------------
# storage types

def bf16_dtype():
    try:
        import ml_dtypes
    except ImportError:
        raise LlmpyError("--dtype bf16 needs the ml_dtypes package (pip install 'llmpy[cuda]')") from None
    return np.dtype(ml_dtypes.bfloat16)


def storage_dtype(dtype: str):
    """The array dtype for a model of precision `dtype` ("fp32" or "bf16")."""
    if dtype == "fp32":
        return np.float32
    if dtype == "bf16":
        return bf16_dtype()
    raise LlmpyError(f"--dtype {dtype!r}: use fp32 or bf16")


def params_dtype(dtype: str):
    """The weights the ops read (model.compute_params): the storage dtype."""
    return storage_dtype(dtype)


def _dense(a, dtypes):
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"expected a cupy.ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes or not a.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous {' or '.join(str(d) for d in dtypes)} array, got dtype "
                         f"{a.dtype}, shape {a.shape}, strides {a.strides}")


def check_f32(*arrays):
    """Arrays a kernel reads as `float*`. Our kernels index raw pointers as dense
    row-major memory: check it, so a strided view fails loudly instead of
    being read wrongly. (None entries are skipped.)"""
    for a in arrays:
        if a is not None:
            _dense(a, (np.dtype(np.float32),))


def check_floatx(*arrays) -> bool:
    """Arrays a kernel reads as `floatX*`: all float32 or all bfloat16.
    Returns True for bfloat16 (the kernels' -DLLMPY_BF16 build)."""
    arrays = [a for a in arrays if a is not None]
    bf16 = arrays[0].dtype != np.float32
    for a in arrays:
        _dense(a, (np.dtype(np.float32),) if not bf16 else (bf16_dtype(),))
    return bf16


def span(view):
    """A 1-D contiguous array over the memory of a strided view, from its
    first element to its last: what a kernel that does its own indexing
    (with the strides as arguments) is handed, so the dense-memory checks
    and the CPU tests' guard zones see exactly the bytes it may touch.
    Needs non-negative strides that are whole elements."""
    it = view.itemsize
    if any(s < 0 or s % it for s in view.strides):
        raise ValueError(f"span(): strides {view.strides} are not whole, non-negative elements")
    n = 1 + sum((d - 1) * (s // it) for d, s in zip(view.shape, view.strides)) if view.size else 0
    return cupy.lib.stride_tricks.as_strided(view, shape=(n,), strides=(it,))


def ids64(ids):
    """Token ids as a contiguous int64 device array (the kernels read long long)."""
    return cupy.ascontiguousarray(cupy.asarray(ids).reshape(-1), dtype=cupy.int64)


# ----------------------------------------------------------------------------
# memory and streams

def on_gpu(x) -> bool:
    """A CuPy array (False for the NumPy arrays the CPU tests stand in with)."""
    return type(x).__module__.startswith("cupy")


def ptr(a) -> int:
    """The device address of an array's first element (for cuBLASLt and
    cuDNN; the host address of the NumPy arrays the CPU tests stand in with)."""
    return a.data.ptr if on_gpu(a) else a.ctypes.data


def stream() -> int:
    """The current CUDA stream, as the cudaStream_t the libraries take."""
    return cupy.cuda.get_current_stream().ptr


def synchronize():
    """Wait for every kernel queued so far (kernels run asynchronously: time a
    step only after this)."""
    cupy.cuda.get_current_stream().synchronize()


def zero(x):
    """x[...] = 0 for a contiguous array of any dtype, as a memset on the
    current stream (capturable; no dtype support needed from CuPy)."""
    if not x.flags.c_contiguous:
        raise ValueError(f"zero() needs a contiguous array, got strides {x.strides}")
    if not x.nbytes:
        return
    if on_gpu(x):
        x.data.memset_async(0, x.nbytes)
    else:
        x[...] = 0


def to_host(x) -> np.ndarray:
    """x copied to a NumPy array (the NumPy arrays the CPU tests stand in with pass through)."""
    return x.get() if on_gpu(x) else np.asarray(x)


def upload(dst, host):
    """Copy a small host array into a device buffer, in order on the current stream."""
    if on_gpu(dst):
        dst.set(np.ascontiguousarray(host, dtype=dst.dtype), stream=cupy.cuda.get_current_stream())
    else:
        dst[...] = host


_scratch_buf: dict = {}
# Buffers that a larger one replaced, kept alive: a captured CUDA graph holds
# the addresses it was recorded with, so a buffer freed while a graph refers
# to it would have the replay write into memory CuPy has handed to someone
# else. Growth happens during the first (eager) run of each new shape, so
# this holds a few small early buffers, not a leak per step.
_outgrown: list = []


def outgrow(old):
    """Keep `old`, a buffer being replaced by a larger one, alive for the process."""
    if old is not None:
        _outgrown.append(old)


def scratch(n: int, dtype=np.float32, slot: str = "reduce"):
    """A work buffer of at least n elements of dtype, one per (slot, dtype),
    kept and grown as needed (the same memory every step: no allocation in
    the steady state, which CUDA graph capture needs; a buffer it outgrows
    stays alive, see _outgrown)."""
    key = (slot, np.dtype(dtype).str)
    buf = _scratch_buf.get(key)
    if buf is None or buf.size < n:
        outgrow(buf)
        buf = _scratch_buf[key] = cupy.empty(max(n, 1), dtype=dtype)
    return buf[:n]


def scratch_slots() -> set:
    """The (slot, dtype) keys of the scratch buffers made so far."""
    return set(_scratch_buf)


def drop_scratch(keys):
    """Forget the scratch buffers `keys` (made after scratch_slots() was read,
    by work no graph has recorded: attention's one-time cuDNN check) and hand
    the memory CuPy's pool holds unused back to the driver."""
    for key in keys:
        _scratch_buf.pop(key, None)
    if hasattr(cupy, "get_default_memory_pool"):
        cupy.get_default_memory_pool().free_all_blocks()


def synchronize_device():
    """Wait for all work on every stream of the device (the legacy null stream
    included, which a non-blocking stream does not wait for)."""
    sync = getattr(cupy.cuda.runtime, "deviceSynchronize", None)
    if sync is not None:
        sync()


def device_memory() -> int | None:
    """The current GPU's memory in bytes, or None where it is not known (the CPU stand-in)."""
    try:
        return int(cupy.cuda.runtime.memGetInfo()[1])
    except Exception:
        return None


def _host_array(shape, dtype) -> np.ndarray:
    """A NumPy array in pinned host memory (cupyx.empty_pinned's recipe); a
    plain one on the NumPy stand-in, which has no alloc_pinned_memory."""
    alloc = getattr(cupy.cuda, "alloc_pinned_memory", None)
    if alloc is None:
        return np.empty(shape, dtype)
    n = int(np.prod(shape))
    mem = alloc(max(1, n) * np.dtype(dtype).itemsize)
    return np.frombuffer(mem, dtype, n).reshape(shape)


class Staging:
    """Pinned, double-buffered host arrays for the uploads of a device step.

    A copy from pageable host memory goes through a driver staging buffer
    and does not overlap the host; from page-locked ("pinned") memory it is
    one DMA, queued on the stream, and the host goes on at once. Two sets:
    the host fills set i % 2 with micro-batch i (its ids, targets and sort)
    while the GPU may still be copying set (i - 1) % 2; before a set is
    reused, the event recorded after its last copy is waited for, so the
    host never overwrites bytes still on their way. arrays: name -> (shape,
    dtype). On the NumPy stand-in (tests) plain arrays and plain copies."""

    def __init__(self, arrays: dict):
        self.sets = [{name: _host_array(shape, dtype) for name, (shape, dtype) in arrays.items()}
                     for _ in range(2)]
        self.copied = [None, None]       # per set: the event after its last copies
        self.i = 0

    def next(self) -> dict:
        """The set to fill now (name -> host array), free to write."""
        done = self.copied[self.i % 2]
        if done is not None:
            done.synchronize()
        return self.sets[self.i % 2]

    def upload(self, pairs):
        """Copy the current set into the device arrays, in order on the current
        stream: pairs = [(device array, name)]; then move on to the other set."""
        host = self.sets[self.i % 2]
        if any(on_gpu(dst) for dst, _ in pairs):
            s = cupy.cuda.get_current_stream()
            for dst, name in pairs:
                dst.set(host[name], stream=s)
            self.copied[self.i % 2] = s.record()
        else:
            for dst, name in pairs:
                dst[...] = host[name]
        self.i += 1
