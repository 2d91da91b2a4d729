"""The host side of the CUDA backend (llmpy/ops/cuda.py), checked on the CPU.

Without a GPU the kernels cannot run, but everything around them can: here
cuda.py runs with NumPy standing in for CuPy, cuBLAS replaced by np.matmul,
and every kernel launch replaced by a NumPy stand-in that first checks the
launch against the kernel's `extern "C"` signature in kernels/*.cu (number
of arguments, pointer dtypes, int / long long / float scalars, block size)
and then does what the kernel's comment says it does.

CuPy need not be installed: where it is missing, a stand-in module is put
in its place while llmpy.ops.cuda is imported (and both are removed again).

This catches what is most easily got wrong between Python and CUDA C
(argument order, a dtype the kernel reads with the wrong width, a missing
scalar) and checks the host glue (views, in-place writes, acc flags, the
attention copies) against cpu.py: every op and a whole training step must
match the NumPy backend. It says nothing about the kernels' own code: that
is tests/test_cuda_ops.py, on a GPU.
"""
from __future__ import annotations

import importlib
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from llmpy.config import GPTConfig
from llmpy.ops import cpu

KERNELS = Path(__file__).resolve().parent.parent / "llmpy" / "ops" / "kernels"


# ---------------------------------------------------------------------------- signatures

def _signatures():
    """kernel name -> [C type of each parameter], from every kernels/*.cu."""
    sigs = {}
    for cu in KERNELS.glob("*.cu"):
        for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', cu.read_text()):
            types_ = []
            for p in params.split(","):
                p = " ".join(p.split())
                ctype = p.rsplit("*", 1)[0] + "*" if "*" in p else p.rsplit(" ", 1)[0]
                types_.append(ctype.replace("const ", "").strip())
            sigs[name] = types_
    return sigs


SIGS = _signatures()
POINTER_DTYPES = {"float*": np.float32, "floatX*": np.float32, "double*": np.float64,
                  "long long*": np.int64, "int*": np.int32}
SCALAR_TYPES = {"int": np.int32, "long long": np.int64, "float": np.float32}
WARP_KERNELS = {"layernorm_forward", "layernorm_backward_input", "attention_softmax_forward",
                "attention_softmax_backward", "crossentropy_forward", "sum_of_squares_partial"}


def _check_launch(name, grid, block, args):
    assert name in SIGS, f"no extern \"C\" kernel {name} in kernels/*.cu"
    sig = SIGS[name]
    assert len(args) == len(sig), f"{name}: {len(args)} arguments for {len(sig)} parameters {sig}"
    for i, (ctype, a) in enumerate(zip(sig, args)):
        if ctype.endswith("*"):
            assert isinstance(a, np.ndarray), f"{name} arg {i} ({ctype}): got {type(a).__name__}"
            assert a.dtype == POINTER_DTYPES[ctype], f"{name} arg {i} ({ctype}): dtype {a.dtype}"
            assert a.flags.c_contiguous, f"{name} arg {i}: not contiguous"
        else:
            assert type(a) is SCALAR_TYPES[ctype], f"{name} arg {i} ({ctype}): got {type(a).__name__}"
    assert all(int(g) >= 1 for g in grid) and len(grid) <= 3
    (threads,) = block
    assert 1 <= threads <= 1024
    if name in WARP_KERNELS:
        assert threads % 32 == 0, f"{name} needs whole warps, got {threads} threads"


# ---------------------------------------------------------------------------- NumPy stand-ins
# Each takes the launch's arguments (arrays as the kernel sees them: flat
# memory) and does what the kernel is documented to do.

def _flat(a):
    return a.reshape(-1)


def k_encoder_forward(out, ids, wte, wpe, N, T, C):
    _flat(out)[:N * C] = (wte.reshape(-1, C)[ids] + wpe.reshape(-1, C)[np.arange(N) % T]).reshape(-1)


def k_encoder_backward_wpe(dwpe, dout, B, T, C, acc):
    s = dout.reshape(B, T * C).sum(axis=0)
    d = _flat(dwpe)[:T * C]
    d[:] = d + s if acc else s


def k_encoder_backward_wte(dwte, dout, sorted_ids, order, N, C):
    assert np.all(np.diff(sorted_ids) >= 0), "ids must arrive sorted"
    np.add.at(dwte.reshape(-1, C), sorted_ids, dout.reshape(N, C)[order])


def k_layernorm_forward(out, mean, rstd, inp, w, b, N, C):
    x = inp.reshape(N, C)
    m = x.mean(axis=1)
    r = 1.0 / np.sqrt(((x - m[:, None]) ** 2).mean(axis=1) + 1e-5)
    out.reshape(N, C)[:] = (x - m[:, None]) * r[:, None] * w + b
    mean[:N], rstd[:N] = m, r


def k_layernorm_backward_input(dinp, dout, inp, w, mean, rstd, N, C):
    xhat = (inp.reshape(N, C) - mean[:N, None]) * rstd[:N, None]
    g = dout.reshape(N, C) * w
    dx = rstd[:N, None] * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    dinp.reshape(N, C)[:] += dx


def k_layernorm_backward_params_partial(pw, pb, dout, inp, mean, rstd, N, C):
    xhat = (inp.reshape(N, C) - mean[:N, None]) * rstd[:N, None]
    d = dout.reshape(N, C)
    for k, n0 in enumerate(range(0, N, 32)):
        _flat(pw)[k * C:(k + 1) * C] = (d[n0:n0 + 32] * xhat[n0:n0 + 32]).sum(axis=0)
        _flat(pb)[k * C:(k + 1) * C] = d[n0:n0 + 32].sum(axis=0)


def k_layernorm_backward_params_final(dw, db, pw, pb, nchunks, C, acc):
    sw = _flat(pw)[:nchunks * C].reshape(nchunks, C).sum(axis=0)
    sb = _flat(pb)[:nchunks * C].reshape(nchunks, C).sum(axis=0)
    dw[:] = dw + sw if acc else sw
    db[:] = db + sb if acc else sb


def k_gelu_forward(out, inp, n):
    x = _flat(inp)
    _flat(out)[:n] = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def k_gelu_backward(dinp, inp, dout, n):
    x = _flat(inp)
    s = math.sqrt(2 / math.pi)
    th = np.tanh(s * (x + 0.044715 * x ** 3))
    grad = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * s * (1 + 3 * 0.044715 * x * x)
    _flat(dinp)[:n] = _flat(dout) * grad


def k_residual_forward(out, a, b, n):
    _flat(out)[:n] = _flat(a) + _flat(b)


def k_crossentropy_forward(losses, lse, logits, targets, N, V):
    z = logits.reshape(N, V)
    m = z.max(axis=1)
    lse[:N] = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    losses[:N] = lse[:N] - z[np.arange(N), targets]


def k_crossentropy_backward(logits, lse, targets, dloss, N, V):
    z = logits.reshape(N, V)
    p = np.exp(z - lse[:N, None])
    p[np.arange(N), targets] -= 1.0
    z[:] = p * dloss


def k_attention_softmax_forward(att, scale, rows, T):
    a = att.reshape(rows, T)
    t = np.arange(rows) % T
    visible = np.arange(T)[None, :] <= t[:, None]
    x = np.where(visible, a * scale, -np.inf)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    a[:] = e / e.sum(axis=1, keepdims=True)


def k_attention_softmax_backward(datt, att, scale, rows, T):
    d, a = datt.reshape(rows, T), att.reshape(rows, T)
    d[:] = scale * a * (d - (d * a).sum(axis=1, keepdims=True))


def k_adamw_update(p, g, m, v, n, seg_stop, seg_decay, nseg, omb1, omb2, step_size, eps_hat, decay_factor, gs):
    seg = np.minimum(np.searchsorted(seg_stop, np.arange(n), side="right"), nseg - 1)
    gg = g * gs
    m += omb1 * (gg - m)
    v += omb2 * (gg * gg - v)
    p[:] = np.where(seg_decay[seg] == 1, p * decay_factor, p) - step_size * (m / (np.sqrt(v) + eps_hat))


def k_sum_of_squares_partial(partial, x, n):
    partial[:] = 0
    partial[0] = np.dot(_flat(x)[:n], _flat(x)[:n])


def k_sum_of_squares_final(out, partial, nblocks):
    out[0] = partial[:nblocks].sum(dtype=np.float64)


STANDINS = {name[2:]: f for name, f in globals().items() if name.startswith("k_")}


def test_every_kernel_has_a_standin():
    assert set(SIGS) == set(STANDINS), set(SIGS) ^ set(STANDINS)


# ---------------------------------------------------------------------------- the backend on NumPy

def _numpy_as_cupy():
    """A module that answers the CuPy calls cuda.py makes, with NumPy."""
    fake = types.ModuleType("cupy")
    fake.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    fake.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))
    return fake


@pytest.fixture
def cuda(monkeypatch):
    import llmpy.ops
    fake_cupy = _numpy_as_cupy()
    try:
        import cupy  # noqa: F401  (installed: cuda.py imports as it is, without a GPU)
        cuda_mod, imported_here = importlib.import_module("llmpy.ops.cuda"), False
    except ImportError:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "cupy", fake_cupy)
            cuda_mod, imported_here = importlib.import_module("llmpy.ops.cuda"), True
    monkeypatch.setattr(llmpy.ops, "cuda", cuda_mod, raising=False)   # what get_backend("cuda") returns

    def kernel(filename, name):
        assert (KERNELS / filename).exists()
        assert re.search(rf'extern "C" __global__ void {name}\(', (KERNELS / filename).read_text()), \
            f"{name} is not in {filename}"

        def launch(grid, block, args):
            _check_launch(name, grid, block, args)
            STANDINS[name](*args)
        return launch

    def gemm(transa, transb, a, b, out, alpha=1.0, beta=0.0):
        A = a.T if transa == "T" else a
        B = b.T if transb == "T" else b
        out[...] = alpha * (A @ B) + (beta * out if beta else 0.0)
        return out

    monkeypatch.setattr(cuda_mod, "cupy", fake_cupy)
    monkeypatch.setattr(cuda_mod, "xp", np)
    monkeypatch.setattr(cuda_mod, "_kernel", kernel)
    monkeypatch.setattr(cuda_mod, "_gemm", gemm)
    monkeypatch.setattr(cuda_mod, "_segment_tables", {})
    yield cuda_mod
    if imported_here:   # imported against the stand-in: forget it, so nothing else sees it
        sys.modules.pop("llmpy.ops.cuda", None)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_ops_match_cpu(cuda):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nan = lambda *s: np.full(s, np.nan, np.float32)  # noqa: E731
    B, T, NH, hs = 2, 13, 2, 8
    C, N, V = NH * hs, B * T, 50
    ids = rng.integers(0, 10, (B, T))

    wte, wpe, x, x2 = r(64, C), r(T, C), r(N, C), r(N, C)
    lnw, lnb, w, b, qkv = r(C), r(C), r(3 * C, C), r(3 * C), r(B, T, 3 * C)
    # (op, its arguments given the output arrays, the outputs' shapes)
    cases = [
        ("encoder_forward", lambda o: (o[0], ids, wte, wpe), [(B, T, C)]),
        ("layernorm_forward", lambda o: (o[0], o[1], o[2], x, lnw, lnb), [(N, C), (N,), (N,)]),
        ("gelu_forward", lambda o: (o[0], x), [(N, C)]),
        ("residual_forward", lambda o: (o[0], x, x2), [(N, C)]),
        ("matmul_forward", lambda o: (o[0], x, w, b), [(N, 3 * C)]),
        ("attention_forward", lambda o: (o[0], o[1], qkv, NH), [(B, T, C), (B, NH, T, T)]),
    ]
    for name, args, outs in cases:
        ref = [np.empty(s, np.float32) for s in outs]
        got = [nan(*s) for s in outs]
        getattr(cpu, name)(*args(ref))
        getattr(cuda, name)(*args(got))
        for g, c in zip(got, ref):
            assert rel_err(g, c) <= 1e-5, name

    logits = r(N, V)
    tg = rng.integers(0, V, N)
    l_ref, s_ref, l_got, s_got = np.empty(N, np.float32), np.empty(N, np.float32), nan(N), nan(N)
    cpu.crossentropy_forward(l_ref, s_ref, logits, tg)
    cuda.crossentropy_forward(l_got, s_got, logits, tg)
    assert rel_err(l_got, l_ref) <= 1e-5 and rel_err(s_got, s_ref) <= 1e-5
    assert abs(cuda.sum_of_squares(x) - cpu.sum_of_squares(x)) <= 1e-5 * cpu.sum_of_squares(x)


@pytest.mark.parametrize("shard", [None, (1000, 9000)])
def test_training_step_matches_cpu(cuda, shard):
    from llmpy.model import GPT
    from llmpy.optim import AdamW, global_norm
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 200, (2, 24)), rng.integers(0, 200, (2, 24))
    results = []
    for device in ("cpu", "cuda"):
        model = GPT(cfg, device=device, seed=3)
        assert model.ops is (cuda if device == "cuda" else cpu)
        opt = AdamW(model, weight_decay=0.1, shard=shard)
        out = []
        for _ in range(2):
            model.zero_grad()
            _, loss = model.forward(ids, targets)
            model.backward()
            norm = global_norm(model)
            opt.step(lr=1e-3, grad_scale=0.5)
            out.append((loss, norm))
        results.append((out, model.grads_dict(), model.state_dict()))
    (c_out, c_g, c_p), (g_out, g_g, g_p) = results
    for (cl, cn), (gl, gn) in zip(c_out, g_out):
        assert abs(gl - cl) <= 1e-5 * abs(cl) and abs(gn - cn) <= 1e-5 * cn
    for name in c_g:
        if np.any(c_g[name]):
            assert rel_err(g_g[name], c_g[name]) <= 1e-4, name
    for name in c_p:
        if np.any(c_p[name]):
            assert rel_err(g_p[name], c_p[name]) <= 1e-4, name
        else:                                      # outside the shard: never updated
            assert not np.any(g_p[name]), name


def test_forward_cached(cuda):
    from llmpy.model import GPT
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, device="cuda", seed=4)
    ids = np.random.default_rng(2).integers(0, 200, (1, 10))
    full = model.forward(ids)[0].copy()
    cache = model.new_kv_cache(B=1)
    first = model.forward_cached(ids[:, :6], cache, all_logits=True)
    nxt = model.forward_cached(ids[:, 6:7], cache)
    assert rel_err(first, full[:, :6]) <= 1e-5
    assert rel_err(nxt, full[:, 6]) <= 1e-5
