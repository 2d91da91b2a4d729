"""The CUDA backend (the llmpy/ops/cuda package and its kernels), run on the CPU.

Without a GPU, everything but the GPU itself can still run: here the backend
runs with NumPy standing in for CuPy's arrays, np.matmul for cuBLAS, and the
real llmpy/ops/cuda/*.cu files compiled for the CPU by cudasim, with the
options NVRTC gets (llmpy/ops/cuda_build.py) (tests/cudasim: every
CUDA thread a fiber, barriers and warp shuffles honoured, threads between
barriers run in a shuffled order so a race shows, writes out of bounds
caught). Every launch is first checked against the kernel's `extern "C"`
signature (number of arguments, pointer dtypes, int / long long / float
scalars, block size).

So every op and a whole training step of the CUDA backend are compared here
with the NumPy backend: the kernels' arithmetic, indexing and reductions,
and the host glue (views, in-place writes, acc flags, the attention copies).
What only a GPU can show (speed, cuBLAS itself, the real memory model) is
tests/test_cuda_ops.py, marked gpu.

CuPy need not be installed: where it is missing, a stand-in module is put
in its place while llmpy.ops.cuda is imported (and both are removed again).
The backend's state (its CuPy, its matmul and attention libraries, its
caches) is replaced module by module in the `cuda` fixture.
"""
from __future__ import annotations

import importlib
import math
import json
import sys
import types

import bf16_checks
import cudasim
import fake_cublaslt
import numpy as np
import pytest

from llmpy.config import GPTConfig
from llmpy.ops import cpu, cuda_build

pytestmark = pytest.mark.skipif(cudasim.available() is not None, reason=str(cudasim.available()))
try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
    import fake_cudnn_attention
except ImportError:          # the bf16 tests skip
    ml_dtypes = BF16 = fake_cudnn_attention = None


# ---------------------------------------------------------------------------- signatures

def _all_kernels():
    return "\n".join(cu.read_text() for cu in cuda_build.cu_files())


SIGS = {name: [t.replace("const ", "").strip() for t in sig]
        for name, sig in cudasim.signatures(_all_kernels()).items()}
POINTER_DTYPES = {"float*": np.float32, "double*": np.float64,
                  "long long*": np.int64, "int*": np.int32}
SCALAR_TYPES = {"int": np.int32, "long long": np.int64, "float": np.float32, "unsigned": np.uint32,
                "double": np.float64}
WARP_KERNELS = {"accumulate_sum", "layernorm_forward", "residual_layernorm_forward", "layernorm_forward_x128",
                "residual_layernorm_forward_x128", "layernorm_backward_input", "layernorm_backward_fused",
                "attention_softmax_forward", "attention_softmax_backward", "crossentropy_forward",
                "crossentropy_forward_x128", "sum_of_squares_partial", "rmsnorm_forward", "residual_rmsnorm_forward",
                "rmsnorm_backward_input", "rmsnorm_backward_fused"}


def _check_launch(name, grid, block, args, bf16=False):
    assert name in SIGS, f"no extern \"C\" kernel {name} in llmpy/ops/cuda/*.cu"
    sig = SIGS[name]
    assert len(args) == len(sig), f"{name}: {len(args)} arguments for {len(sig)} parameters {sig}"
    for i, (ctype, a) in enumerate(zip(sig, args)):
        if ctype.endswith("*"):
            assert isinstance(a, np.ndarray), f"{name} arg {i} ({ctype}): got {type(a).__name__}"
            want = (BF16 if bf16 else np.float32) if ctype == "floatX*" else POINTER_DTYPES[ctype]
            assert a.dtype == want, f"{name} arg {i} ({ctype}): dtype {a.dtype}"
            assert a.flags.c_contiguous, f"{name} arg {i}: not contiguous"
        else:
            assert type(a) is SCALAR_TYPES[ctype], f"{name} arg {i} ({ctype}): got {type(a).__name__}"
    assert all(int(g) >= 1 for g in grid) and len(grid) <= 3
    (threads,) = block
    assert 1 <= threads <= 1024
    if name in WARP_KERNELS:
        assert threads % 32 == 0, f"{name} needs whole warps, got {threads} threads"


# ---------------------------------------------------------------------------- the backend on NumPy

class _CheckedModule:
    """cupy.RawModule as cudasim runs it, with every launch checked against
    the kernel's C signature first."""

    def __init__(self, code, options=()):
        self.sim = cudasim.RawModule(code, options, order="shuffled")
        self.bf16 = "-DLLMPY_BF16" in options

    def get_function(self, name):
        assert name in SIGS, f'no extern "C" kernel {name} in llmpy/ops/cuda/*.cu'
        kernel = self.sim.get_function(name)

        def launch(grid, block, args, shared_mem=0):
            _check_launch(name, grid, block, args, self.bf16)
            kernel(grid, block, args, shared_mem=shared_mem)
        return launch


def _numpy_as_cupy():
    """A module that answers the CuPy calls the backend makes, with NumPy (and
    cudasim for RawModule); its one stream is the null stream, 0."""
    fake = types.ModuleType("cupy")
    fake.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    stream = types.SimpleNamespace(synchronize=lambda: None, ptr=0)
    fake.cuda = types.SimpleNamespace(get_current_stream=lambda: stream,
                                      runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    fake.RawModule = _CheckedModule
    fake.asnumpy = np.asarray
    return fake


@pytest.fixture(params=["cublaslt"])
def cuda(monkeypatch, request):
    """llmpy.ops.cuda on NumPy + cudasim. Its matmuls go through the
    cuBLASLt path (tests/fake_cublaslt.py standing in for the library), or
    with param "cublas" through the fallback used without nvmath-python."""
    import llmpy.ops
    fake_cupy = _numpy_as_cupy()
    try:
        import cupy  # noqa: F401  (installed: the backend imports as it is, without a GPU)
        cuda_mod, imported_here = importlib.import_module("llmpy.ops.cuda"), False
    except ImportError:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "cupy", fake_cupy)
            cuda_mod, imported_here = importlib.import_module("llmpy.ops.cuda"), True
    monkeypatch.setattr(llmpy.ops, "cuda", cuda_mod, raising=False)   # what get_backend("cuda") returns
    submodules = {n: m for n, m in sys.modules.items() if n.startswith("llmpy.ops.cuda.")}

    def gemm(transa, transb, a, b, out, alpha=1.0, beta=0.0):
        # cuBLAS's contract: float32 products and sums whatever the storage,
        # one rounding into out
        A = (a.T if transa == "T" else a).astype(np.float32)
        B = (b.T if transb == "T" else b).astype(np.float32)
        out[...] = alpha * (A @ B) + (beta * out.astype(np.float32) if beta else 0.0)
        return out

    for mod in (cuda_mod, *submodules.values()):       # every module that calls CuPy
        if hasattr(mod, "cupy"):
            monkeypatch.setattr(mod, "cupy", fake_cupy)
    monkeypatch.setattr(cuda_mod, "xp", np)
    monkeypatch.setattr(cuda_mod.runtime, "_modules", {})
    monkeypatch.setattr(cuda_mod.runtime, "_kernels", {})
    monkeypatch.setattr(cuda_mod.runtime, "_scratch_buf", {})
    monkeypatch.setattr(cuda_mod.matmul, "_gemm", gemm)
    monkeypatch.setattr(cuda_mod.matmul, "lt", fake_cublaslt if request.param == "cublaslt" else None)
    monkeypatch.setattr(cuda_mod.optimizer, "_segment_tables", {})
    monkeypatch.setattr(cuda_mod.attention, "cudnn", fake_cudnn_attention if BF16 is not None else None)
    monkeypatch.setattr(cuda_mod.attention, "_cudnn_verdicts", {})
    yield cuda_mod
    if imported_here:   # imported against the stand-in: forget it, so nothing else sees it
        for n in ("llmpy.ops.cuda", *submodules):
            sys.modules.pop(n, None)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


BOTH_MATMULS = pytest.mark.parametrize("cuda", ["cublaslt", "cublas"], indirect=True)


@BOTH_MATMULS
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
        ("residual_layernorm_forward", lambda o: (o[0], o[1], o[2], o[3], x, x2, lnw, lnb),
         [(N, C), (N, C), (N,), (N,)]),
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

    Vp = V + 6                                     # padded logits: the padding must not count
    logits = r(N, Vp)
    logits[:, V:] = np.nan
    tg = rng.integers(0, V, N)
    l_ref, s_ref, l_got, s_got = np.empty(N, np.float32), np.empty(N, np.float32), nan(N), nan(N)
    cpu.crossentropy_forward(l_ref, s_ref, logits[:, :V].copy(), tg)
    cuda.crossentropy_forward(l_got, s_got, logits, tg, V=V)
    assert rel_err(l_got, l_ref) <= 1e-5 and rel_err(s_got, s_ref) <= 1e-5
    d_ref, d_got = logits[:, :V].copy(), logits.copy()
    cpu.crossentropy_backward(d_ref, s_ref, tg, 0.5)
    cuda.crossentropy_backward(d_got, s_got, tg, 0.5, V=V)
    assert rel_err(d_got[:, :V], d_ref) <= 1e-5 and not np.any(d_got[:, V:])
    # both in one kernel (the graph step's classifier)
    l2, s2, d2 = nan(N), nan(N), logits.copy()
    cuda.crossentropy_forward_backward(l2, s2, d2, tg, 0.5, V=V)
    assert np.array_equal(l2, l_got) and np.array_equal(s2, s_got) and np.array_equal(d2, d_got)
    assert abs(cuda.sum_of_squares(x) - cpu.sum_of_squares(x)) <= 1e-5 * cpu.sum_of_squares(x)


@BOTH_MATMULS
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("acc", [False, True])
def test_matmul_ops_match_cpu(cuda, gelu, acc):
    # N, C, OC all different, so a swapped dimension or leading dimension in
    # the row-major -> column-major mapping cannot pass; the fused GELU
    # epilogues against the two separate CPU ops.
    rng = np.random.default_rng(11)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    N, C, OC = 26, 16, 40
    inp, w, b, dout, pre = r(N, C), r(OC, C), r(OC), r(N, OC), r(N, C)
    ref = [np.empty((N, OC), np.float32), np.empty((N, OC), np.float32)]
    got = [np.full((N, OC), np.nan, np.float32), np.full((N, OC), np.nan, np.float32)]
    cpu.matmul_forward(ref[0], inp, w, b, gelu_out=ref[1] if gelu else None)
    cuda.matmul_forward(got[0], inp, w, b, gelu_out=got[1] if gelu else None)
    for g, c in zip(got[:1 + gelu], ref[:1 + gelu]):
        assert rel_err(g, c) <= 1e-5
    dw0, db0 = r(OC, C), r(OC)                    # what acc=True adds to
    ref = [np.empty((N, C), np.float32), dw0.copy(), db0.copy()]
    got = [np.full((N, C), np.nan, np.float32), dw0.copy() if acc else np.full((OC, C), np.nan, np.float32),
           db0.copy() if acc else np.full(OC, np.nan, np.float32)]
    kw = lambda: dict(acc=acc, gelu_inp=pre if gelu else None, gelu_scratch=np.empty((N, C), np.float32))  # noqa: E731
    cpu.matmul_backward(*ref, dout, inp, w, **kw())
    cuda.matmul_backward(*got, dout, inp, w, **kw())
    for name, g, c in zip(("dinp", "dweight", "dbias"), got, ref):
        assert rel_err(g, c) <= 1e-5, name
    if cuda.matmul.lt is not None:                # the fused epilogues really ran
        kinds = {e for e, *_ in fake_cublaslt.calls[-3:]}
        assert ("gelu_aux_bias" in kinds and "dgelu" in kinds) == gelu


def steps_match_cpu(cuda, make, shard=None):
    """Two AdamW steps of make(device) (a model with vocabulary 200) on each
    backend from the same init and data: losses and norms within 1e-5,
    gradients and parameters within 1e-4; parameters outside the shard
    never move. (Shared with tests/test_cuda_llama.py.)"""
    from llmpy.optim import AdamW, global_norm
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 200, (2, 24)), rng.integers(0, 200, (2, 24))
    results = []
    for device in ("cpu", "cuda"):
        model = make(device)
        assert model.ops is (cuda if device == "cuda" else cpu)
        opt = AdamW(model, weight_decay=0.1, shard=shard)
        out = []
        for t in (1, 2):
            model.zero_grad()
            _, loss = model.forward(ids, targets)
            model.backward()
            norm = global_norm(model)
            opt.step(1e-3, t, grad_scale=0.5)
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


@BOTH_MATMULS
@pytest.mark.parametrize("shard", [None, (1000, 9000)])
def test_training_step_matches_cpu(cuda, shard):
    from llmpy.model import GPT
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=16)
    steps_match_cpu(cuda, lambda device: GPT(cfg, device=device, seed=3), shard)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_forward_cached(cuda, dtype):
    # sampling with the KV cache against the training forward; in bf16 the
    # two round differently (cached attention runs in float32), so 2e-2
    if dtype == "bf16" and BF16 is None:
        pytest.skip("bf16 needs ml_dtypes")
    from llmpy.inference import KVCache, forward_cached
    from llmpy.model import GPT
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, device="cuda", seed=4, dtype=dtype)
    ids = np.random.default_rng(2).integers(0, 200, (1, 10))
    full = model.forward(ids)[0].astype(np.float32)
    cache = KVCache(model, B=1)
    first = forward_cached(model, ids[:, :6], cache, all_logits=True).astype(np.float32)
    nxt = forward_cached(model, ids[:, 6:7], cache).astype(np.float32)
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert rel_err(first, full[:, :6]) <= tol
    assert rel_err(nxt, full[:, 6]) <= tol


# ---------------------------------------------------------------------------- bf16 mixed precision
# The checks are shared with tests/test_cuda_ops.py, which runs them on a GPU.

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="bf16 tests need ml_dtypes")


@needs_bf16
def test_ops_match_cpu_bf16(cuda):
    bf16_checks.ops_match_cpu(cuda, np)


@needs_bf16
def test_bf16_training_step_tracks_fp32(cuda):
    bf16_checks.step_tracks_fp32(np)


@needs_bf16
def test_stochastic_rounding_is_unbiased(cuda):
    bf16_checks.stochastic_rounding_is_unbiased(cuda, np)


@needs_bf16
def test_bf16_training_loss_tracks_fp32(cuda):
    worst = bf16_checks.loss_tracks_fp32(np, steps=100)     # issue 5's 100 steps
    print(f"100 steps: worst |bf16 - fp32| / fp32 loss = {worst:.2e}")


@needs_bf16
def test_train_cli_on_the_cuda_backend(cuda, tmp_path, capsys):
    # `llmpy train --device cuda --dtype bf16` end to end (data, validation,
    # sampling, checkpoints, resume) with the CUDA backend's kernels run by
    # cudasim: the checkpoint on disk is the fp32 master weights in Hugging
    # Face's layout, and a resumed run picks up where the first stopped.
    from safetensors.numpy import load_file

    from llmpy.cli import main
    from llmpy.data.prepare import prepare_pydoc
    info = prepare_pydoc(tmp_path / "pydoc")
    args = ["train", "--device", "cuda", "--dtype", "bf16", "--data", str(info["train"]),
            "--val-data", str(info["val"]), "--model", "d2", "-B", "2", "-T", "16", "--lr", "3e-3",
            "--val-every", "2", "--val-steps", "1", "--sample-every", "0", "--sample-tokens", "4",
            "--checkpoint-every", "2", "--steps", "4", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args + ["--stop-at", "2"]) == 0
    assert main(args + ["--resume"]) == 0
    assert ("classifier.cu", True) in cuda.runtime._modules    # the bf16 kernels did the work
    assert "backward" in fake_cudnn_attention.calls         # and attention took the flash route
    out = capsys.readouterr().out
    assert "sample after 4 steps" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[-1]
    assert all(np.isfinite(r["loss"]) for r in records)
    sd = load_file(str(tmp_path / "run" / "ckpt_00000004" / "model.safetensors"))
    assert all(t.dtype == np.float32 for t in sd.values())
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (128, 384)


# ---------------------------------------------------------------------------- the graph step

@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_device_step_matches_the_plain_step(cuda, clip):
    # step.DeviceStep (no host sync: sort of the ids on the host, norm
    # and clipping on the device, hyperparameters from a device buffer) runs
    # eagerly here; it must do what forward / backward / global_norm /
    # AdamW.step(grad_scale=clip_scale(...)) do.
    from llmpy.step import DeviceStep
    from llmpy.model import GPT
    from llmpy.optim import AdamW, clip_scale, global_norm
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(9)
    batches = [(rng.integers(0, 200, (2, 24)), rng.integers(0, 200, (2, 24))) for _ in range(3)]
    plain, fast = GPT(cfg, device="cuda", seed=3), GPT(cfg, device="cuda", seed=3)
    opt_p, opt_f = AdamW(plain, weight_decay=0.1), AdamW(fast, weight_decay=0.1)
    step = DeviceStep(fast, opt_f, 2, 24, grad_clip=clip)
    for i, (x, y) in enumerate(batches):
        lr = 1e-2 * (i + 1)
        plain.zero_grad()
        _, loss_p = plain.forward(x, y)
        plain.backward()
        norm_p = global_norm(plain)
        opt_p.step(lr, i + 1, grad_scale=clip_scale(norm_p, clip))
        loss_f, norm_f, _ = step((x, y), lr, i + 1)
        assert abs(loss_f - loss_p) <= 1e-6 * loss_p and abs(norm_f - norm_p) <= 1e-6 * norm_p
    # Without clipping the same arithmetic in the same order: the same bits.
    # With it, the factor max_norm / (norm + 1e-6) is float32 on the device
    # and float64 on the host: a few ulp apart, which AdamW carries along.
    tol = 0.0 if clip == 0 else 1e-5
    for a, b in ((fast.params.flat, plain.params.flat), (opt_f.m, opt_p.m), (opt_f.v, opt_p.v)):
        assert rel_err(a, b) <= tol


def test_device_step_accumulates_like_the_plain_loop(cuda):
    # three micro-batches per step: the device-side loss sum and gradient
    # accumulation against train.py's plain loop (forward, backward(1/3) x 3)
    from llmpy.step import DeviceStep
    from llmpy.model import GPT
    from llmpy.optim import AdamW, clip_scale, global_norm
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=16)
    rng = np.random.default_rng(10)
    steps = [[(rng.integers(0, 200, (2, 16)), rng.integers(0, 200, (2, 16))) for _ in range(3)] for _ in range(2)]
    plain, fast = GPT(cfg, device="cuda", seed=3), GPT(cfg, device="cuda", seed=3)
    opt_p, opt_f = AdamW(plain), AdamW(fast)
    step = DeviceStep(fast, opt_f, 2, 16, grad_clip=0.0, accum=3)
    for t, batches in enumerate(steps, start=1):
        plain.zero_grad()
        loss_p = 0.0
        for x, y in batches:
            _, micro = plain.forward(x, y)
            plain.backward(loss_scale=1 / 3)
            loss_p += micro / 3
        norm_p = global_norm(plain)
        opt_p.step(1e-2, t, grad_scale=clip_scale(norm_p, 0.0))
        loss_f, norm_f, _ = step(batches, 1e-2, t)
        assert abs(loss_f - loss_p) <= 1e-6 * loss_p and abs(norm_f - norm_p) <= 1e-6 * norm_p
    assert rel_err(fast.params.flat, plain.params.flat) <= 1e-6
    with pytest.raises(ValueError, match="micro-batches"):
        step(steps[0][:2], 1e-2, 3)


def test_device_step_skips_a_nonfinite_update(cuda):
    from llmpy.step import DeviceStep
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, device="cuda", seed=3)
    opt = AdamW(model)
    model.params.lnfw[0] = np.inf                     # the forward pass turns it into NaNs
    before = model.params.flat.copy()
    x = np.random.default_rng(0).integers(0, 200, (2, 8))
    loss, norm, applied = DeviceStep(model, opt, 2, 8, grad_clip=1.0)((x, x), 1e-3, 1)
    assert not math.isfinite(norm) and not applied
    np.testing.assert_array_equal(model.params.flat, before)        # no update reached the weights
    assert not np.any(opt.m) and not np.any(opt.v)                  # nor m and v


def test_host_sort_orders_by_id_then_position(cuda):
    # both branches (16-bit radix sort, 64-bit unique key) give the order the
    # encoder backward's determinism rests on: by token id, ties by position
    rng = np.random.default_rng(4)
    for high in (50257, 1 << 20):
        ids = rng.integers(0, high, (4, 64))
        ids[0, :5] = ids[1, 7]                      # repeats
        sorted_ids, order = cuda.host_sort(ids)
        flat = ids.reshape(-1)
        want = sorted(range(flat.size), key=lambda i: (flat[i], i))
        assert order.tolist() == want and sorted_ids.tolist() == flat[want].tolist()


def test_hellaswag_scoring_on_the_cuda_backend(cuda):
    # evals.completion_losses indexes the (CuPy, on a GPU) logits: the CUDA
    # backend must score like the CPU one
    from llmpy import evals
    from llmpy.model import GPT
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 200, (4, 12))
    mask = np.zeros((4, 12), bool)
    mask[:, 5:9] = True
    want = evals.completion_losses(GPT(cfg, device="cpu", seed=2), tokens, mask)
    got = evals.completion_losses(GPT(cfg, device="cuda", seed=2), tokens, mask)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@needs_bf16
def test_cast_and_zero(cuda):
    # the bf16 weights from the fp32 master: round to nearest even, as ml_dtypes does
    x = np.random.default_rng(8).standard_normal(3000).astype(np.float32)
    x[:3] = [1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -0.0]
    out = np.zeros(3000, BF16)
    cuda.cast(out, x)
    np.testing.assert_array_equal(out.view(np.uint16), x.astype(BF16).view(np.uint16))
    cuda.zero(out)
    assert not np.any(out.astype(np.float32))


# ---------------------------------------------------------------------------- encoder backward on real text

class _ModuleInOrder(_CheckedModule):
    """_CheckedModule with the threads between barriers run in a given order."""
    order = "forward"

    def __init__(self, code, options=()):
        self.sim = cudasim.RawModule(code, options, order=self.order)
        self.bf16 = "-DLLMPY_BF16" in options


def test_encoder_backward_on_real_text_statistics(cuda, monkeypatch):
    # The ids of `llmpy bench` (windows of the Python docs' tokens): token 220
    # is 15-19% of them, so its run in the sorted order crosses several
    # segments of encoder.cu's pass 1 and goes through pass 2. Against the
    # CPU op (np.add.at: position order, from zero): every run that lies in
    # one segment gets the same additions in the same order, so the same
    # bits; the crossing runs add their pieces in another grouping (1e-6);
    # and the result does not depend on the order the threads run in.
    from llmpy.bench import real_text_batch
    from llmpy.ops.cuda_build import ENCODER_SEGMENT
    B, T, C, Vp = 4, 512, 24, 50304
    ids = real_text_batch(B, T - 1, 50257, seed=3)               # (B, T)
    N = B * T
    counts = np.bincount(ids.reshape(-1), minlength=Vp)
    assert counts[220] >= 0.12 * N and counts.max() > 2 * ENCODER_SEGMENT   # real-text statistics
    rng = np.random.default_rng(5)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    want_wte, want_wpe = np.zeros((Vp, C), np.float32), np.zeros((T, C), np.float32)
    cpu.encoder_backward(want_wte, want_wpe, dout, ids, acc=False)

    # which ids' runs cross a segment boundary of the sorted order
    sorted_ids = np.sort(ids.reshape(-1), kind="stable")
    first, last = np.searchsorted(sorted_ids, np.arange(Vp)), np.searchsorted(sorted_ids, np.arange(Vp), "right") - 1
    present = counts > 0
    crossing = present & (first // ENCODER_SEGMENT != last // ENCODER_SEGMENT)
    inside = present & ~crossing
    assert crossing[220] and crossing.sum() >= 3 and inside.sum() > 100

    def run(sorted_order):
        dwte, dwpe = np.full((Vp, C), np.nan, np.float32), np.full((T, C), np.nan, np.float32)
        cuda.encoder_backward(dwte, dwpe, dout, ids, acc=False, sorted_order=sorted_order)
        return dwte, dwpe

    got_wte, got_wpe = run(cuda.host_sort(ids))
    np.testing.assert_array_equal(got_wte[inside], want_wte[inside])
    np.testing.assert_array_equal(got_wte[~present], 0)
    assert rel_err(got_wte[crossing], want_wte[crossing]) <= 1e-6
    assert rel_err(got_wpe, want_wpe) <= 1e-6
    np.testing.assert_array_equal(run(None)[0], got_wte)          # the sort made on the device: same bits
    for order in ("forward", "reverse"):                          # the threads in other orders: same bits
        monkeypatch.setattr(_ModuleInOrder, "order", order)
        monkeypatch.setattr(cuda.runtime.cupy, "RawModule", _ModuleInOrder)
        monkeypatch.setattr(cuda.runtime, "_modules", {})
        monkeypatch.setattr(cuda.runtime, "_kernels", {})
        np.testing.assert_array_equal(run(cuda.host_sort(ids))[0], got_wte)

    # acc=True adds to what is there (gradient accumulation)
    base = rng.standard_normal((Vp, C)).astype(np.float32)
    dwte, dwpe = base.copy(), np.zeros((T, C), np.float32)
    cuda.encoder_backward(dwte, dwpe, dout, ids, acc=True, sorted_order=cuda.host_sort(ids))
    assert rel_err(dwte - base, want_wte) <= 1e-5

    if BF16 is not None:                                          # bf16 storage, float32 sums
        dwte, dwpe = np.zeros((Vp, C), BF16), np.zeros((T, C), BF16)
        cuda.encoder_backward(dwte, dwpe, dout.astype(BF16), ids, acc=False, sorted_order=cuda.host_sort(ids))
        want16 = np.zeros((Vp, C), np.float32)
        cpu.encoder_backward(want16, np.zeros((T, C), np.float32), dout.astype(BF16).astype(np.float32), ids,
                             acc=False)
        assert rel_err(dwte.astype(np.float32), want16) <= 1e-2


# ---------------------------------------------------------------------------- fallbacks, memory, streams

@pytest.mark.parametrize("refused", [("gelu_aux_bias", "dgelu"), ("gelu_aux_bias", "dgelu", "bias", "bgradb")])
def test_matmul_falls_back_when_cublaslt_has_no_algorithm(cuda, monkeypatch, refused):
    # an fp32 GELU epilogue (or any fused one) that cuBLASLt's heuristic has
    # no algorithm for: the plain GEMM, then our bias / GELU kernels, with the
    # CPU's results
    monkeypatch.setattr(fake_cublaslt, "refuse", {(e, "float32") for e in refused})
    monkeypatch.setattr(fake_cublaslt, "calls", [])
    rng = np.random.default_rng(12)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    N, C, OC = 26, 16, 40
    inp, w, b, dout, pre = r(N, C), r(OC, C), r(OC), r(N, OC), r(N, C)
    ref = [np.empty((N, OC), np.float32) for _ in range(2)]
    got = [np.full((N, OC), np.nan, np.float32) for _ in range(2)]
    cpu.matmul_forward(ref[0], inp, w, b, gelu_out=ref[1])
    cuda.matmul_forward(got[0], inp, w, b, gelu_out=got[1])
    for g, c in zip(got, ref):
        assert rel_err(g, c) <= 1e-5
    dw0, db0 = r(OC, C), r(OC)
    ref = [np.empty((N, C), np.float32), dw0.copy(), db0.copy()]
    got = [np.full((N, C), np.nan, np.float32), dw0.copy(), db0.copy()]
    cpu.matmul_backward(*ref, dout, inp, w, acc=True, gelu_inp=pre, gelu_scratch=np.empty((N, C), np.float32))
    cuda.matmul_backward(*got, dout, inp, w, acc=True, gelu_inp=pre)
    for name, g, c in zip(("dinp", "dweight", "dbias"), got, ref):
        assert rel_err(g, c) <= 1e-5, name
    ran = {e for e, *_ in fake_cublaslt.calls}
    assert not ran & set(refused) and "default" in ran


def test_backward_scratch_is_what_the_cuda_kernels_need(cuda):
    # model.Activations asks the backend: (2, N / LN_ROWS_PER_CHUNK, C) layernorm
    # partial sums and no GELU scratch here, the contract's shapes on the CPU
    from llmpy.model import Activations
    cfg = GPTConfig(block_size=64, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    assert cuda_build.LN_ROWS_PER_CHUNK == 128
    on_gpu, on_cpu = Activations(cfg, 8, 40, np, np.float32, cuda), Activations(cfg, 8, 40, np, np.float32, cpu)
    assert on_gpu.ln_scratch.shape == (2, 3, 16) and on_gpu.scratch4C is None     # ceil(320 / 128) = 3
    assert on_cpu.ln_scratch.shape == (2, 320, 16) and on_cpu.scratch4C.shape == (320, 64)
    with pytest.raises(ValueError, match="scratch"):           # less than the kernels write: refused
        x = np.ones((320, 16), np.float32)
        cuda.layernorm_backward(x.copy(), np.zeros(16, np.float32), np.zeros(16, np.float32), x, x,
                                np.ones(16, np.float32), np.zeros(320, np.float32), np.ones(320, np.float32),
                                np.zeros((2, 2, 16), np.float32))


def test_outgrown_scratch_stays_alive_for_captured_graphs(cuda):
    # a graph recorded with the old buffer's address still writes there on
    # every replay: the buffer a larger one replaces must not be freed
    small = cuda.runtime.scratch(10, slot="test")
    large = cuda.runtime.scratch(100, slot="test")
    assert large.size == 100 and cuda.runtime.scratch(50, slot="test").base is large.base
    assert any(b is small.base for b in cuda.runtime._outgrown)


@needs_bf16
def test_the_cudnn_check_hands_back_its_scratch(cuda):
    # the one-time check runs our batched-GEMM path beside cuDNN; once cuDNN is
    # chosen, that path's head-major scratch (q, k, v, y, dq, dk, dv) is dropped
    before = cuda.runtime.scratch_slots()
    shape, dtype, _ = cuda.attention_saved(2, 2, 8, 8, BF16)
    assert shape == (2, 2, 8) and dtype == np.float32            # flash attention chosen
    assert cuda.runtime.scratch_slots() == before


def test_check_fits_refuses_d12_fp32_b64_on_an_80_gib_gpu():
    # issue 13: memory_estimate says 92 GiB for d12 B=64 T=1024 fp32; on 80 GiB
    # the step fails before allocating, naming a -B whose estimate fits
    from types import SimpleNamespace

    from llmpy.config import preset
    from llmpy.errors import LlmpyError
    from llmpy.model import memory_estimate
    from llmpy.step import check_fits
    cfg, gib = preset("d12"), 2 ** 30
    model = SimpleNamespace(config=cfg, dtype="fp32", memory_estimate=memory_estimate, ops=SimpleNamespace(
        runtime=SimpleNamespace(device_memory=lambda: 80 * gib)))
    with pytest.raises(LlmpyError) as e:
        check_fits(model, 64, 1024)
    msg = str(e.value)
    need = memory_estimate(cfg, 64, 1024, "fp32", flash=False)["total"] / gib     # ~91 GiB
    assert need > 80
    assert "\n" not in msg and f"~{need:.1f} GiB" in msg and "80.0 GiB" in msg and "-B 32 " in msg
    assert memory_estimate(cfg, 32, 1024, "fp32", flash=False)["total"] <= 0.9 * 80 * gib
    check_fits(model, 32, 1024)                                   # fits: no error
    model.ops.runtime.device_memory = lambda: None                 # unknown memory: no check
    check_fits(model, 64, 1024)


def test_check_fits_counts_a_llama_by_its_own_buffers():
    # Llama 3.1 8B in bf16: fp32 master weights, bf16 copy, gradients and
    # AdamW's m, v are ~120 GiB before any activation: no -B fits 80 GiB
    from types import SimpleNamespace

    from llmpy.errors import LlmpyError
    from llmpy.llama import Llama, preset
    from llmpy.step import check_fits
    cfg, gib = preset("llama3.1-8b"), 2 ** 30
    need = Llama.memory_estimate(cfg, 1, 2048, "bf16", flash=True)["total"]
    assert need > 0.9 * 80 * gib
    model = SimpleNamespace(config=cfg, dtype="bf16", memory_estimate=Llama.memory_estimate, ops=SimpleNamespace(
        runtime=SimpleNamespace(device_memory=lambda: 80 * gib)))
    with pytest.raises(LlmpyError, match="even -B 1 does not fit"):
        check_fits(model, 4, 2048)
    model.ops.runtime.device_memory = lambda: 200 * gib
    check_fits(model, 1, 2048)


def test_device_step_waits_for_the_device_once_and_stages_its_uploads(cuda, monkeypatch):
    # item 8: the first step waits for the zero-fills, upload and cast queued
    # on the legacy stream (deviceSynchronize, once); item 10: the micro-batches
    # go through the two staging sets in turn, and what reaches the device
    # buffers is the batch and its sort
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    from llmpy.step import DeviceStep
    syncs = []
    monkeypatch.setattr(cuda.runtime.cupy.cuda.runtime, "deviceSynchronize", lambda: syncs.append(1),
                        raising=False)
    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, device="cuda", seed=3)
    step = DeviceStep(model, AdamW(model), 2, 8, grad_clip=1.0, accum=3)
    rng = np.random.default_rng(13)
    for t in (1, 2):
        batches = [(rng.integers(0, 200, (2, 8)), rng.integers(0, 200, (2, 8))) for _ in range(3)]
        step(batches, 1e-3, t)
    assert len(syncs) == 1
    assert step.staging.i == 6                                      # six micro-batches, alternating sets
    last_x, last_y = batches[-1]
    sets = step.staging.sets
    assert sets[0]["ids"] is not sets[1]["ids"]
    np.testing.assert_array_equal(sets[1]["ids"], last_x)          # micro-batch 6 used set 1
    np.testing.assert_array_equal(step.ids, last_x)
    np.testing.assert_array_equal(step.targets, last_y)
    sorted_ids, order = cuda.host_sort(last_x)
    np.testing.assert_array_equal(step.sorted_ids, sorted_ids)
    np.testing.assert_array_equal(step.order, order)


@needs_bf16
def test_zero1_bf16_gathers_only_the_bf16_copy_each_step(cuda, tmp_path):
    # item 12: ZeRO-1 with bf16 all-gathers the bf16 weights after each update;
    # the fp32 master slices are gathered once, when a checkpoint is written
    from llmpy.checkpoint import save_training_checkpoint
    from llmpy.dist import Communicator
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    from llmpy.step import HostStep

    class TwoRanks(Communicator):
        """Rank 0 of 2 whose collectives record what they move (and move nothing)."""
        rank, world_size = 0, 2

        def __init__(self):
            self.gathered = []

        def all_gather(self, buf):
            self.gathered.append(buf)

        def all_reduce_scalar(self, x):
            return 2 * x

    cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, device="cuda", seed=3, dtype="bf16")
    comm = TwoRanks()
    opt = AdamW(model, shard=comm.bounds(model.params.flat.size))
    step = HostStep(model, opt, comm)
    x = np.random.default_rng(14).integers(0, 200, (2, 8))
    for t in (1, 2):
        _, _, applied = step((x, x), 1e-3, t)
        assert applied
    assert [b is model.compute_params.flat for b in comm.gathered] == [True, True]
    comm.gathered.clear()
    comm.barrier = lambda: None
    save_training_checkpoint(tmp_path, 2, model, opt, {}, comm=comm)
    assert [b is model.params.flat for b in comm.gathered] == [True]


# ---------------------------------------------------------------------------- column sums (parameter gradients)

def _column_sum_in_kernel_order(x, rows_per_chunk, warps):
    """float32 column sums of x (N, C) in exactly the order of matmul.cu's two
    stages, written from the kernels' comments: stage 1 adds each chunk's rows
    top to bottom; stage 2's warp w adds the chunk sums w, w + warps, ... in
    turn, then warp 0 adds the warp totals in warp order."""
    N, C = x.shape
    chunks = []
    for n0 in range(0, N, rows_per_chunk):
        s = np.zeros(C, np.float32)
        for row in x[n0:n0 + rows_per_chunk]:
            s = s + row
        chunks.append(s)
    totals = []
    for w in range(warps):
        s = np.zeros(C, np.float32)
        for k in range(w, len(chunks), warps):
            s = s + chunks[k]
        totals.append(s)
    out = totals[0]
    for t in totals[1:]:
        out = out + t
    return out


@pytest.mark.parametrize("acc", [False, True])
def test_bias_gradient_over_many_chunks_in_a_fixed_order(cuda, monkeypatch, acc):
    # N spans several chunks and ends in a partial one, OC is not a multiple
    # of 32 (a partial column tile): our column sum (the BGRADB epilogue
    # refused) equals, bit for bit, the same additions done in that order by
    # NumPy; the epilogue's float32 gradient goes through the same
    # accumulation rule. Both within float32 rounding of the float64 sum.
    rng = np.random.default_rng(21)
    N, C, OC = 3 * cuda_build.BIAS_ROWS_PER_CHUNK + 37, 8, 40
    inp, w = rng.standard_normal((N, C)).astype(np.float32), rng.standard_normal((OC, C)).astype(np.float32)
    dout = rng.standard_normal((N, OC)).astype(np.float32)
    db0 = rng.standard_normal(OC).astype(np.float32)
    exact = dout.astype(np.float64).sum(0) + (db0 if acc else 0.0)
    for refused in ({("bgradb", "float32")}, set()):
        monkeypatch.setattr(fake_cublaslt, "refuse", refused)
        monkeypatch.setattr(fake_cublaslt, "calls", [])
        dinp, dw, db = np.empty((N, C), np.float32), np.zeros((OC, C), np.float32), db0.copy()
        if not acc:
            db[:] = np.nan
        cuda.matmul_backward(dinp, dw, db, dout, inp, w, acc=acc)
        ran = {e for e, *_ in fake_cublaslt.calls}
        assert ("bgradb" in ran) == (not refused)
        assert np.max(np.abs(db - exact)) <= 1e-5 * np.max(np.abs(exact)) * np.sqrt(N)
        if refused:
            want = _column_sum_in_kernel_order(dout, cuda_build.BIAS_ROWS_PER_CHUNK,
                                               cuda_build.COLSUM_THREADS // 32)
            want = (db0 + want) if acc else want
            assert np.array_equal(db, want)


@pytest.mark.parametrize("path", ["fused", "two kernels"])
@pytest.mark.parametrize("acc", [False, True])
def test_layernorm_backward_over_many_chunks(cuda, monkeypatch, acc, path):
    # several chunks of LN_ROWS_PER_CHUNK rows and a partial one, C not a
    # multiple of 32 (nor of the block: the fused kernel's last register
    # column partly empty); the one-pass kernel, or (rows too wide for it)
    # the warp-per-row input gradient and the column-sum kernel. Against the
    # CPU op for dinp (ADDED to) and the float64 sums for dweight, dbias:
    # float32 arithmetic in another order of additions, so not bitwise; the
    # bounds are a few float32 roundings of sums of ~300 terms.
    if path == "two kernels":
        monkeypatch.setattr(cuda.layernorm, "LN_BWD_COLS_PER_THREAD", 0)
    launched = []
    real_kernel = cuda.layernorm.kernel
    monkeypatch.setattr(cuda.layernorm, "kernel", lambda f, name, bf=False: launched.append(name) or
                        real_kernel(f, name, bf))
    rng = np.random.default_rng(22)
    N, C = 2 * cuda_build.LN_ROWS_PER_CHUNK + 21, 296          # 296 = 256 + 40
    x, dout = rng.standard_normal((N, C)).astype(np.float32), rng.standard_normal((N, C)).astype(np.float32)
    lnw, lnb = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    out, mean, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
    cuda.layernorm_forward(out, mean, rstd, x, lnw, lnb)
    dw0, db0 = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    dw, db = (dw0.copy(), db0.copy()) if acc else (np.full(C, np.nan, np.float32), np.full(C, np.nan, np.float32))
    scratch = np.full((2, -(-N // cuda_build.LN_ROWS_PER_CHUNK), C), np.nan, np.float32)
    dinp0 = rng.standard_normal((N, C)).astype(np.float32)
    dinp = dinp0.copy()
    launched.clear()
    cuda.layernorm_backward(dinp, dw, db, dout, x, lnw, mean, rstd, scratch, acc=acc)
    assert ("layernorm_backward_fused" in launched) == (path == "fused")
    ref = [dinp0.copy(), dw0.copy(), db0.copy()]
    cpu.layernorm_backward(*ref, dout, x, lnw, mean, rstd, np.empty((2, N, C), np.float32), acc=True)
    assert rel_err(dinp, ref[0]) <= 1e-6
    xhat = (x.astype(np.float64) - mean[:, None]) * rstd[:, None]
    want_w = (dout * xhat).sum(0) + (dw0 if acc else 0.0)
    want_b = dout.astype(np.float64).sum(0) + (db0 if acc else 0.0)
    assert rel_err(dw, want_w) <= 1e-6 and rel_err(db, want_b) <= 1e-6


# ---------------------------------------------------------------------------- 128-bit loads

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_elementwise_128_bit_path_equals_the_scalar_kernels(cuda, monkeypatch, dtype):
    # gelu, its derivative, the residual add: with aligned buffers whose size
    # is whole 16-byte packs the x128 kernels run; a size with a tail or a
    # view starting mid-pack falls back to one value per thread. The same
    # arithmetic per value either way: bitwise equal, and equal to the CPU op
    # (fp32: within tanhf's rounding; bf16: within one bf16 rounding).
    if dtype == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    st = np.float32 if dtype == "fp32" else BF16
    launched = []
    real_kernel = cuda.elementwise.kernel
    monkeypatch.setattr(cuda.elementwise, "kernel", lambda f, name, bf=False: launched.append(name) or
                        real_kernel(f, name, bf))
    rng = np.random.default_rng(31)
    big = rng.standard_normal(3 * 8 * 37 + 5).astype(np.float32)
    n_packed = 8 * 37                           # whole packs for fp32 (4) and bf16 (8)
    cases = {"packed": slice(0, n_packed), "tail": slice(0, n_packed + 3), "mid-pack": slice(1, n_packed + 1)}
    results = {}
    for case, sl in cases.items():
        x = np.empty(len(big), st)
        x[...] = big
        x = x[sl]                                   # a view: "mid-pack" starts 2 or 4 bytes in
        y = np.empty(len(big), st)
        y[...] = big[::-1]
        y = y[sl]
        launched.clear()
        out = {k: np.full(x.shape, np.nan, st) for k in ("gelu", "dgelu", "res")}
        cuda.gelu_forward(out["gelu"], x)
        cuda.gelu_backward(out["dgelu"], x, y, None)
        cuda.residual_forward(out["res"], x, y)
        vec = case == "packed"
        assert launched == [n + ("_x128" if vec else "") for n in ("gelu_forward", "gelu_backward",
                                                                   "residual_forward")], case
        results[case] = out
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        ref = {k: np.empty(x.shape, np.float32) for k in out}
        cpu.gelu_forward(ref["gelu"], x32)
        cpu.gelu_backward(ref["dgelu"], x32, y32, np.empty_like(x32))
        cpu.residual_forward(ref["res"], x32, y32)
        for k in out:
            assert rel_err(out[k].astype(np.float32), ref[k]) <= (1e-5 if dtype == "fp32" else 8e-3), (case, k)
    for k in ("gelu", "dgelu", "res"):             # the packed and tail runs share their first n_packed values
        a, b = results["packed"][k], results["tail"][k][:n_packed]
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), k


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layernorm_forwards_128_bit_path(cuda, monkeypatch, dtype):
    # C = 48: whole 16-byte packs in both storage types, the x128 kernels;
    # C = 44 (not whole bf16 packs, nor 32-lane multiples) and a view
    # starting mid-pack: the scalar kernels. Each against the CPU op on the
    # same stored inputs: fp32 within float32 rounding (the lanes sum in
    # another order, so not bitwise); bf16 within a bf16 rounding.
    if dtype == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    st = np.float32 if dtype == "fp32" else BF16
    launched = []
    real_kernel = cuda.layernorm.kernel
    monkeypatch.setattr(cuda.layernorm, "kernel", lambda f, name, bf=False: launched.append(name) or
                        real_kernel(f, name, bf))
    rng = np.random.default_rng(32)
    N = 37
    for C, offset, vec in ((48, 0, True), (44, 0, dtype == "fp32"), (48, 1, False)):
        def arr(*shape):
            flat = np.empty(int(np.prod(shape)) + offset, st)
            flat[...] = rng.standard_normal(flat.size)
            return flat[offset:].reshape(shape)
        a, b, w, bias = arr(N, C), arr(N, C), arr(C), arr(C)
        out, res, out2 = arr(N, C), arr(N, C), arr(N, C)
        mean, rstd, mean2, rstd2 = (np.empty(N, np.float32) for _ in range(4))
        launched.clear()
        cuda.layernorm_forward(out, mean, rstd, a, w, bias)
        cuda.residual_layernorm_forward(res, out2, mean2, rstd2, a, b, w, bias)
        suffix = "_x128" if vec else ""
        assert launched == ["layernorm_forward" + suffix, "residual_layernorm_forward" + suffix], (C, offset)
        f = lambda x: x.astype(np.float32)  # noqa: E731
        ref, m_ref, r_ref = np.empty((N, C), np.float32), np.empty(N, np.float32), np.empty(N, np.float32)
        cpu.layernorm_forward(ref, m_ref, r_ref, f(a), f(w), f(bias))
        tol = 1e-5 if dtype == "fp32" else 8e-3
        assert rel_err(f(out), ref) <= tol and rel_err(mean, m_ref) <= 1e-5 and rel_err(rstd, r_ref) <= 1e-5
        res_ref = (f(a) + f(b)).astype(st)          # the sum as stored: what the statistics are of
        assert np.array_equal(res.view(np.uint8), res_ref.view(np.uint8))
        cpu.layernorm_forward(ref, m_ref, r_ref, f(res_ref), f(w), f(bias))
        assert rel_err(f(out2), ref) <= tol and rel_err(mean2, m_ref) <= 1e-5 and rel_err(rstd2, r_ref) <= 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adamw_128_bit_path(cuda, monkeypatch, dtype):
    # n whole packs and aligned: the x128 kernel, with a segment (decay on /
    # off) ending inside a pack; n with a tail, or a view starting mid-pack:
    # one element per thread. Elementwise, the same arithmetic: the packed
    # and tail runs agree bit for bit on their common elements (weights,
    # moments and the stochastically rounded bf16 copy), and fp32 agrees
    # with the CPU's adamw_update per segment.
    if dtype == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    st = np.float32 if dtype == "fp32" else BF16
    launched = []
    real_kernel = cuda.optimizer.kernel
    monkeypatch.setattr(cuda.optimizer, "kernel", lambda f, name, bf=False: launched.append(name) or
                        real_kernel(f, name, bf))
    rng = np.random.default_rng(33)
    n_packed, cut = 8 * 37, 8 * 11 + 3            # the decayed segment ends mid-pack
    base = {k: rng.standard_normal(n_packed + 8).astype(np.float32) for k in ("p", "g", "m")}
    base["v"] = np.abs(base["m"])
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    runs = {}
    for case, (start, n) in {"packed": (0, n_packed), "tail": (0, n_packed + 3), "mid-pack": (1, n_packed)}.items():
        def arr(key, dt=np.float32):
            a = np.empty(n_packed + 8, dt)
            a[...] = base[key]
            return a[start:start + n]
        p, m, v, g = arr("p"), arr("m"), arr("v"), arr("g", st)
        copy = None if dtype == "fp32" else arr("p", st)
        launched.clear()
        cuda.adamw_step_flat(p, g, m, v, [(0, cut, True), (cut, n, False)], **hyper, param_copy=copy)
        assert launched == ["adamw_update_x128" if case == "packed" else "adamw_update"], case
        runs[case] = (p, m, v, copy)
        if dtype == "fp32":                        # the NumPy reference, segment by segment
            rp, rm, rv, rg = (arr(k).copy() for k in ("p", "m", "v", "g"))
            for lo, hi, wd in ((0, cut, hyper["weight_decay"]), (cut, n, 0.0)):
                cpu.adamw_update(rp[lo:hi], rg[lo:hi], rm[lo:hi], rv[lo:hi], hyper["lr"], hyper["beta1"],
                                 hyper["beta2"], hyper["eps"], wd, hyper["step"], np.empty((2, n), np.float32))
            assert rel_err(p, rp) <= 1e-6 and rel_err(m, rm) <= 1e-6 and rel_err(v, rv) <= 1e-6, case
    for a, b in zip(runs["packed"], runs["tail"]):
        if a is not None:
            assert np.array_equal(a.view(np.uint8), b[:n_packed].view(np.uint8))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_classifier_128_bit_path(cuda, monkeypatch, dtype):
    # padded rows of Vp = 64 (whole packs, aligned; V = 53 leaves a partial
    # pack: the read pass's scalar tail): the x128 kernels; the same logits
    # in a buffer starting mid-pack, or rows of Vp = 61: the scalar ones.
    # Losses and lse against the CPU op (the x128 read pass adds in another
    # order: float32 rounding, not bitwise); the backward sweep given the
    # same lse: the same bits on every layout, 0 in the padding; the fused
    # kernel against the CPU's gradient (fp32 within expf's rounding, bf16
    # within a bf16 rounding).
    if dtype == "bf16" and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    st = np.float32 if dtype == "fp32" else BF16
    launched = []
    real_kernel = cuda.classifier.kernel
    monkeypatch.setattr(cuda.classifier, "kernel", lambda f, name, bf=False: launched.append(name) or
                        real_kernel(f, name, bf))
    rng = np.random.default_rng(34)
    N, V = 7, 53
    x = (3 * rng.standard_normal((N, V))).astype(np.float32)
    tg = rng.integers(0, V, N)
    ref = x.astype(st).astype(np.float32)
    l_ref, s_ref = np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.crossentropy_forward(l_ref, s_ref, ref, tg)
    g_ref = ref.copy()
    cpu.crossentropy_backward(g_ref, s_ref, tg, 0.5)
    tol = 1e-5 if dtype == "fp32" else 8e-3
    swept = {}
    for case, (Vp, offset) in {"packed": (64, 0), "mid-pack": (64, 1), "odd width": (61, 0)}.items():
        suffix = "_x128" if case == "packed" else ""

        def padded():
            flat = np.zeros(N * Vp + offset, st)
            logits = flat[offset:].reshape(N, Vp)
            logits[:, :V] = x
            logits[:, V:] = np.nan
            return logits
        logits, losses, lse = padded(), np.empty(N, np.float32), np.empty(N, np.float32)
        launched.clear()
        cuda.crossentropy_forward(losses, lse, logits, tg, V=V)
        cuda.crossentropy_backward(logits, s_ref, tg, 0.5, V=V)          # the CPU's lse: a common input
        assert launched == ["crossentropy_forward" + suffix, "crossentropy_backward" + suffix], case
        assert rel_err(losses, l_ref) <= 1e-6 and rel_err(lse, s_ref) <= 1e-6, case
        assert not np.any(logits[:, V:].astype(np.float32))
        swept[case] = logits[:, :V].copy()
        logits, losses, lse = padded(), np.empty(N, np.float32), np.empty(N, np.float32)
        launched.clear()
        cuda.crossentropy_forward_backward(losses, lse, logits, tg, 0.5, V=V)
        assert launched == ["crossentropy_forward_backward" + suffix], case
        assert rel_err(losses, l_ref) <= 1e-6 and rel_err(lse, s_ref) <= 1e-6, case
        assert rel_err(logits[:, :V].astype(np.float32), g_ref) <= tol and not np.any(logits[:, V:].astype(np.float32))
    for case, g in swept.items():
        assert np.array_equal(g.view(np.uint8), swept["packed"].view(np.uint8)), case
        assert rel_err(g.astype(np.float32), g_ref) <= tol, case


