"""dist.NCCLComm against a stand-in for CuPy 14's cupy.cuda.nccl, on the CPU.

What the stand-in copies from CuPy 14 (cupy/cuda/nccl.py and
cupy_backends/cuda/libs/nccl.pyx; issue 13 states the 14.x API):
- `available`: cupy/cuda/nccl.py imports the Cython module inside a try and
  sets available = False when libnccl cannot be loaded; the import of
  cupy.cuda.nccl itself succeeds, and the module then has no NcclCommunicator;
- get_unique_id() returns the 128 bytes of the ncclUniqueId as `bytes`
  ("versionchanged 14.0: Previously this returned a tuple");
- NcclCommunicator(int ndev, bytes commId, int rank): Cython's typed
  arguments raise TypeError for a tuple commId (or a float ndev), and the
  constructor asserts len(commId) == NCCL_UNIQUE_ID_BYTES.

The communicator is built the way `llmpy train --device cuda --dist nccl`
builds it: dist.make_communicator("nccl", "cuda"), outside mpirun (a world
of one) and as rank 1 of 2 under an MPI launcher (the id then comes from
rank 0 over MPI, and this rank must not make its own).
"""
import os
import sys
import types

import numpy as np
import pytest

from llmpy import dist
from llmpy.errors import LlmpyError

NCCL_UNIQUE_ID_BYTES = 128


def _fake_nccl(available=True):
    """A module with the part of CuPy 14's cupy.cuda.nccl that NCCLComm uses."""
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = available
    if not available:        # the names come from the Cython module, which did not import
        return nccl
    nccl.made_ids, nccl.communicators = [], []
    for i, name in enumerate(("INT8", "INT32", "INT64", "FLOAT16", "FLOAT32", "FLOAT64")):
        setattr(nccl, f"NCCL_{name}", i)
    nccl.NCCL_SUM = 0

    def get_unique_id():
        uid = os.urandom(NCCL_UNIQUE_ID_BYTES)
        nccl.made_ids.append(uid)
        return uid

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):
            # what Cython does with `int ndev, bytes commId, int rank`
            for what, v in (("ndev", ndev), ("rank", rank)):
                if isinstance(v, float) or not hasattr(v, "__index__"):
                    raise TypeError(f"an integer is required for {what}, got {type(v).__name__}")
            if not isinstance(commId, bytes):
                raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got {type(commId).__name__})")
            assert len(commId) == NCCL_UNIQUE_ID_BYTES
            if not 0 <= rank < ndev:
                raise RuntimeError("NCCL_ERROR_INVALID_ARGUMENT")
            self.ndev, self.comm_id, self.rank = int(ndev), commId, int(rank)
            nccl.communicators.append(self)

        def destroy(self):
            pass

    nccl.get_unique_id, nccl.NcclCommunicator = get_unique_id, NcclCommunicator
    return nccl


def _fake_cupy(nccl, version="14.0.0"):
    cupy = types.ModuleType("cupy")
    cupy.__version__ = version
    used = []
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = lambda i: types.SimpleNamespace(use=lambda: used.append(i))
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 2)
    cuda.Stream = lambda non_blocking=False: types.SimpleNamespace(non_blocking=non_blocking,
                                                                   synchronize=lambda: None)
    cuda.nccl = nccl
    cupy.cuda, cupy.devices_used = cuda, used
    return cupy


@pytest.fixture
def cupy14(monkeypatch):
    """Install the stand-ins as cupy / cupy.cuda / cupy.cuda.nccl; no MPI launcher in the environment."""
    def install(available=True, version="14.0.0"):
        nccl = _fake_nccl(available)
        cupy = _fake_cupy(nccl, version)
        for name, mod in (("cupy", cupy), ("cupy.cuda", cupy.cuda), ("cupy.cuda.nccl", nccl)):
            monkeypatch.setitem(sys.modules, name, mod)
        return cupy, nccl
    for var in (*dist._MPI_ENV, "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    return install


def test_dist_nccl_builds_the_communicator_with_cupy14_types(cupy14):
    cupy, nccl = cupy14()
    comm = dist.make_communicator("nccl", "cuda")
    assert isinstance(comm, dist.NCCLComm) and comm.world_size == 1 and comm.rank == 0
    (made,), (c,) = nccl.made_ids, nccl.communicators
    assert c.comm_id == made and (c.ndev, c.rank) == (1, 0)       # the id rank 0 made, as bytes
    assert comm.stream.non_blocking and cupy.devices_used == [0]


class _FakeMPI:
    """Rank 1 of 2: broadcast(buf, root=0) delivers rank 0's id."""
    rank, world_size = 1, 2

    def __init__(self, timeout=None):
        self.root_id = bytes(range(256))[128:]                   # every byte value >= 128 (negative as C chars)

    def broadcast(self, buf, root=0):
        assert root == 0 and buf.nbytes == NCCL_UNIQUE_ID_BYTES and buf.flags.c_contiguous
        buf.view(np.uint8)[:] = np.frombuffer(self.root_id, dtype=np.uint8)


def test_dist_nccl_under_mpirun_takes_rank_0s_id(cupy14, monkeypatch):
    cupy, nccl = cupy14()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    monkeypatch.setattr(dist, "MPIComm", _FakeMPI)
    comm = dist.make_communicator("auto", "cuda")               # auto + cuda under mpirun: NCCL
    assert isinstance(comm, dist.NCCLComm) and (comm.rank, comm.world_size) == (1, 2)
    (c,) = nccl.communicators
    assert not nccl.made_ids                                     # only rank 0 makes an id
    assert c.comm_id == _FakeMPI().root_id and (c.ndev, c.rank) == (2, 1)
    assert cupy.devices_used == [1]                              # local rank 3 on a machine of 2 GPUs


def test_missing_libnccl_is_one_line_naming_the_cuda13_package(cupy14):
    cupy14(available=False)                  # CuPy 14 without libnccl: the import works, available is False
    with pytest.raises(LlmpyError) as e:
        dist.make_communicator("nccl", "cuda")
    msg = str(e.value)
    assert "\n" not in msg and "cupy-cuda13x" in msg and "llmpy[cuda]" in msg and "12x" not in msg


def test_no_cupy_at_all_is_the_same_line(cupy14, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)            # import cupy -> ImportError
    with pytest.raises(LlmpyError, match="cupy-cuda13x"):
        dist.make_communicator("nccl", "cuda")


def test_unique_id_of_an_older_cupy_is_converted():
    # CuPy < 14 returned a tuple of 128 C chars; the bytes must be the same
    raw = bytes(range(128, 256))
    old = tuple(int(c) for c in np.frombuffer(raw, dtype=np.int8))
    assert dist._unique_id_bytes(old) == raw == dist._unique_id_bytes(raw)
    with pytest.raises(LlmpyError, match="128"):
        dist._unique_id_bytes(b"\0" * 64)
