"""cudasim: run llmpy's CUDA C kernels on the CPU, on NumPy arrays.

A stand-in for the two CuPy calls llmpy.ops.cuda makes to run its own
kernels, `cupy.RawModule(code=..., options=...)` and `module.get_function(name)
(grid, block, args, shared_mem=0)`, for machines without a GPU. The source is
compiled with g++ as C++ behind cudasim.h (which turns every CUDA thread into
a fiber; read it for what is and is not checked), and each kernel is called
through a generated launcher that takes its arguments the way cuLaunchKernel
does: an array of pointers to the argument values.

Every launch also checks the memory the kernel touches: each array argument
is copied into a buffer with a guard zone of NaNs before and after it (as
large as the array, at least 1 KiB: an off-by-one row lands in it), and a
kernel that writes into a guard zone fails the launch with the argument's
number. (Arrays passed twice, like an in-place `dinp is dout`, share one
copy; arrays that overlap in other ways are passed without guards.)

The kernels are the real files from llmpy/ops/cuda, unchanged, compiled with
the options the runtime gives NVRTC (llmpy/ops/cuda_build.py: the -D
constants the Python side shares with the kernels reach g++ as they are), so
a test that compares a kernel's output here with the NumPy reference tests
the kernel's code. Speed is irrelevant here; keep the shapes small.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GUARD = 1024                      # least bytes of guard zone on each side of an array argument
# The guard zones' 32-bit pattern: a signalling NaN with a payload. Any
# arithmetic on it gives a different (quiet) NaN, so a kernel that reads out
# of bounds and writes the result out of bounds too is still caught.
POISON = 0xFFA5A5A5
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}

_SCALARS = {"int": ctypes.c_int32, "unsigned": ctypes.c_uint32, "unsigned int": ctypes.c_uint32,
            "long long": ctypes.c_int64, "unsigned long long": ctypes.c_uint64, "size_t": ctypes.c_uint64,
            "float": ctypes.c_float, "double": ctypes.c_double}


class CudasimError(RuntimeError):
    """A kernel did something that is wrong on a GPU too (deadlock, write out of bounds, ...)."""


def available() -> str | None:
    """None if kernels can be compiled here, else why not."""
    return None if shutil.which("g++") else "cudasim needs g++"


def signatures(code: str) -> dict[str, list[str]]:
    """kernel name -> the C type of each parameter, for every extern "C" kernel in `code`."""
    sigs = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', code):
        types_ = []
        for p in params.split(","):
            p = " ".join(p.split())
            types_.append(p.rsplit("*", 1)[0] + "*" if "*" in p else p.rsplit(" ", 1)[0])
        sigs[name] = types_
    return sigs


def _launcher(name: str, types_: list[str]) -> str:
    args = ", ".join(f"*({t}*)a[{i}]" for i, t in enumerate(types_))
    return (f'extern "C" int cudasim_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f'unsigned by, unsigned bz, unsigned long long shmem, int order, void** a, char* err, int errlen) {{\n'
            f'    return cudasim::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, shmem, order, '
            f'[a] {{ {name}({args}); }}, err, errlen);\n}}\n')


def _cache_dir() -> Path:
    d = Path(os.environ.get("LLMPY_CUDASIM_CACHE", Path(tempfile.gettempdir()) / f"llmpy-cudasim-{os.getuid()}"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class RawModule:
    """cupy.RawModule's interface: compile `code` (with `options` such as
    -DLLMPY_BF16; -std= and -arch= options are ignored) for the CPU."""

    def __init__(self, code: str, options=(), order: str = "forward"):
        self.code = code
        self.order = ORDERS[order]
        self.sigs = signatures(code)
        defines = [o for o in options if o.startswith(("-D", "-U"))]
        # `extern __shared__ T name[];` -> a pointer to this launch's dynamic shared buffer
        body = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;",
                      r"\1* \2 = (\1*)cudasim::g_dyn_shared;", code)
        src = body + "\n" + "".join(_launcher(n, t) for n, t in self.sigs.items())
        header = (HERE / "cudasim.h").read_text()
        key = hashlib.sha256("\0".join([src, header, *defines]).encode()).hexdigest()[:24]
        lib = _cache_dir() / f"{key}.so"
        if not lib.exists():
            cpp = lib.with_suffix(".cpp")
            cpp.write_text(src)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-fno-strict-aliasing",
                   "-Wno-unused-variable", "-I", str(HERE / "include"), "-include", str(HERE / "cudasim.h"),
                   *defines, "-x", "c++", str(cpp), "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise CudasimError(f"g++ could not compile the kernels:\n{r.stderr[-4000:]}")
            os.replace(tmp, lib)
        self.lib = ctypes.CDLL(str(lib))

    def get_function(self, name: str) -> RawKernel:
        if name not in self.sigs:
            raise CudasimError(f'no extern "C" __global__ kernel {name} in this module')
        return RawKernel(self, name)


class RawKernel:
    def __init__(self, module: RawModule, name: str):
        self.module, self.name, self.sig = module, name, module.sigs[name]
        self.fn = getattr(module.lib, f"cudasim_launch_{name}")
        self.fn.restype = ctypes.c_int

    def __call__(self, grid, block, args, shared_mem: int = 0):
        if len(args) != len(self.sig):
            raise CudasimError(f"{self.name}: {len(args)} arguments for {len(self.sig)} parameters")
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        keep, ptrs, guarded = [], [], _Guards(args, self.sig)
        for i, (ctype, a) in enumerate(zip(self.sig, args)):
            if ctype.endswith("*"):
                v = ctypes.c_void_p(guarded.address(i))
            else:
                v = _SCALARS[ctype](a.item() if isinstance(a, np.generic) else a)
            keep.append(v)
            ptrs.append(ctypes.addressof(v))
        argv = (ctypes.c_void_p * len(ptrs))(*ptrs)
        err = ctypes.create_string_buffer(512)
        rc = self.fn(*grid, *block, ctypes.c_ulonglong(shared_mem), self.module.order, argv, err, len(err))
        problem = guarded.finish()
        if rc != 0:
            raise CudasimError(f"{self.name}: {err.value.decode()}")
        if problem:
            raise CudasimError(f"{self.name}: {problem}")


class _Guards:
    """Copies of the array arguments with NaN-filled guard zones around them."""

    def __init__(self, args, sig):
        self.arrays = {}      # arg index -> (original array, guarded buffer, offset)
        spans = []
        for i, (ctype, a) in enumerate(zip(sig, args)):
            if not ctype.endswith("*"):
                continue
            if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                raise CudasimError(f"argument {i} ({ctype}) must be a C-contiguous NumPy array")
            start = a.__array_interface__["data"][0]
            spans.append((i, start, start + a.nbytes, a))
        self.shared = {}
        for i, s, e, a in spans:
            same = [j for j, s2, e2, _ in spans if (s2, e2) == (s, e) and j < i]
            overlaps = any(s2 < e and s < e2 and (s2, e2) != (s, e) for _, s2, e2, _ in spans)
            if same:
                self.shared[i] = same[0]
            elif overlaps or a.nbytes == 0:
                self.arrays[i] = (a, None, 0)
            else:
                g = max(GUARD, -(-a.nbytes // 256) * 256)
                buf = np.full(-(-(a.nbytes + 2 * g + 16) // 4), POISON, np.uint32).view(np.uint8)
                off = g + (-(buf.ctypes.data + g)) % 16      # 16-byte aligned, as cudaMalloc's are
                buf[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
                self.arrays[i] = (a, buf, off)
        self.pristine = {i: b.copy() for i, (_, b, _) in self.arrays.items() if b is not None}

    def address(self, i):
        a, buf, off = self.arrays[self.shared.get(i, i)]
        return a.__array_interface__["data"][0] if buf is None else buf.ctypes.data + off

    def finish(self):
        problem = None
        for i, (a, buf, off) in self.arrays.items():
            if buf is None:
                continue
            a.reshape(-1).view(np.uint8)[:] = buf[off:off + a.nbytes]
            clean = self.pristine[i]
            if not np.array_equal(buf[:off], clean[:off]):
                problem = problem or f"wrote before the start of argument {i}"
            if not np.array_equal(buf[off + a.nbytes:], clean[off + a.nbytes:]):
                problem = problem or f"wrote past the end of argument {i} ({a.nbytes} bytes)"
        return problem
