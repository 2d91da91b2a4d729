"""bf16 mixed-precision checks of the CUDA backend, shared by
tests/test_cuda_host.py (kernels run on the CPU by cudasim, NumPy arrays)
and tests/test_cuda_ops.py (a GPU, CuPy arrays): each takes the array module.

The reference is always the fp32 NumPy backend on the same inputs; bf16
keeps 8 significant bits, so results agree to ~2^-8 relative per rounding.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from llmpy.config import GPTConfig
from llmpy.ops import cpu

BF16 = np.dtype(ml_dtypes.bfloat16)


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def rel_err(a, b):
    a, b = np.asarray(host(a), np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), f"{np.sum(~np.isfinite(a))} non-finite values (unwritten elements?)"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ops_match_cpu(cuda, xp):
    """Every forward op in bf16 against the fp32 op on the same (bf16-exact)
    inputs: the only differences are the roundings of results to bf16,
    <= 1e-2 relative. Outputs are NaN-poisoned first."""
    rng = np.random.default_rng(5)
    B, T, NH, hs = 2, 13, 2, 8
    C, N, V = NH * hs, B * T, 50
    ids = rng.integers(0, 10, (B, T))

    def r(*shape):
        b = rng.standard_normal(shape).astype(np.float32).astype(BF16)
        return xp.asarray(b), b.astype(np.float32)

    (wte, wte32), (wpe, wpe32), (x, x32), (x2, x2_32) = r(64, C), r(T, C), r(N, C), r(N, C)
    (lnw, lnw32), (lnb, lnb32), (w, w32), (b, b32), (qkv, qkv32) = r(C), r(C), r(3 * C, C), r(3 * C), r(B, T, 3 * C)
    d_ids = xp.asarray(ids)
    cases = [  # (op, bf16 arguments, fp32 arguments, outputs' shapes)
        ("encoder_forward", lambda o: (o[0], d_ids, wte, wpe), lambda o: (o[0], ids, wte32, wpe32), [(B, T, C)]),
        ("layernorm_forward", lambda o: (o[0], o[1], o[2], x, lnw, lnb),
         lambda o: (o[0], o[1], o[2], x32, lnw32, lnb32), [(N, C), (N,), (N,)]),
        ("gelu_forward", lambda o: (o[0], x), lambda o: (o[0], x32), [(N, C)]),
        ("residual_forward", lambda o: (o[0], x, x2), lambda o: (o[0], x32, x2_32), [(N, C)]),
        ("residual_layernorm_forward", lambda o: (o[0], o[1], o[2], o[3], x, x2, lnw, lnb),
         lambda o: (o[0], o[1], o[2], o[3], x32, x2_32, lnw32, lnb32), [(N, C), (N, C), (N,), (N,)]),
        ("matmul_forward", lambda o: (o[0], x, w, b), lambda o: (o[0], x32, w32, b32), [(N, 3 * C)]),
        ("attention_forward", lambda o: (o[0], o[1], qkv, NH), lambda o: (o[0], o[1], qkv32, NH),
         [(B, T, C), (B, NH, T, T)]),
    ]
    for name, args16, args32, shapes in cases:
        ref = [np.empty(s, np.float32) for s in shapes]
        # layernorm's mean and rstd (the 1-D outputs) are float32 in both precisions
        got = [xp.full(s, np.nan, np.float32 if len(s) == 1 else BF16) for s in shapes]
        getattr(cpu, name)(*args32(ref))
        getattr(cuda, name)(*args16(got))
        for g, c in zip(got, ref):
            assert rel_err(host(g).astype(np.float32), c) <= 1e-2, name

    (logits, logits32), tg = r(N, V), rng.integers(0, V, N)
    l_ref, s_ref = np.empty(N, np.float32), np.empty(N, np.float32)
    l_got, s_got = xp.full(N, np.nan, np.float32), xp.full(N, np.nan, np.float32)
    cpu.crossentropy_forward(l_ref, s_ref, logits32, tg)
    cuda.crossentropy_forward(l_got, s_got, logits, xp.asarray(tg))
    assert rel_err(l_got, l_ref) <= 1e-5 and rel_err(s_got, s_ref) <= 1e-5   # float32 sums of exact inputs
    assert abs(cuda.sum_of_squares(x) - cpu.sum_of_squares(x32)) <= 1e-5 * cpu.sum_of_squares(x32)


def step_tracks_fp32(xp, make=None):
    """One mixed-precision step against the fp32 reference on the CPU: loss,
    gradients, the fp32 master weights after AdamW, and the bf16 copy the
    forward pass reads must be one of the master value's two bf16 neighbours
    (stochastic rounding). make(device, dtype): the model (vocabulary 200;
    default a 2-layer GPT-2), the same initial weights for every call."""
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    if make is None:
        cfg = GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=16)
        make = lambda device, dtype: GPT(cfg, device=device, seed=3, dtype=dtype)  # noqa: E731
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, 200, (2, 24)), rng.integers(0, 200, (2, 24))
    ref = make("cpu", "fp32")
    mixed = make("cuda", "bf16")
    assert mixed.params.flat.dtype == np.float32 and mixed.compute_params.flat.dtype == BF16
    np.testing.assert_array_equal(host(mixed.params.flat), ref.params.flat)    # the same fp32 init
    ref.params.flat[:] = host(mixed.compute_params.flat).astype(np.float32)    # the reference sees bf16 weights
    out = []
    for model, x, y in ((ref, ids, targets), (mixed, xp.asarray(ids), xp.asarray(targets))):
        opt = AdamW(model, weight_decay=0.1)
        model.zero_grad()
        _, loss = model.forward(x, y)
        model.backward()
        grads = model.grads_dict()
        opt.step(1e-2, 1)
        out.append((loss, grads))
    (l32, g32), (l16, g16) = out
    assert abs(l16 - l32) <= 1e-2 * l32
    for name in g32:
        if np.any(g32[name]):
            assert rel_err(g16[name], g32[name]) <= 5e-2, name
    master = host(mixed.params.flat)
    assert rel_err(master, ref.params.flat) <= 1e-2
    copy = host(mixed.compute_params.flat).astype(np.float32)
    nearest = master.astype(BF16)
    up = np.nextafter(nearest, BF16.type(np.inf)).astype(np.float32)
    down = np.nextafter(nearest, BF16.type(-np.inf)).astype(np.float32)
    nearest = nearest.astype(np.float32)
    lo = np.where(nearest > master, down, nearest)        # the bf16 values just below and above master
    hi = np.where(nearest < master, up, nearest)
    assert np.all((copy == lo) | (copy == hi))


def stochastic_rounding_is_unbiased(cuda, xp):
    """AdamW with lr = 0 leaves the master weights as they are; the bf16 copy
    of x = 1 + f * ulp (ulp = 2^-7 at 1.0) must round up a fraction f of the
    time, not always down as round-to-nearest does for f < 1/2, with new
    random bits every step."""
    n, f = 1 << 14, 0.25
    param = xp.full(n, 1.0 + f * 2.0 ** -7, np.float32)
    grad = xp.zeros(n, BF16)
    m, v = xp.zeros(n, np.float32), xp.zeros(n, np.float32)
    copies = []
    for step in (1, 2):
        copy = xp.zeros(n, BF16)
        cuda.adamw_step_flat(param, grad, m, v, [(0, n, False)], 0.0, 0.9, 0.95, 1e-8, 0.0, step=step,
                             param_copy=copy)
        copies.append(host(copy).astype(np.float32))
    for c in copies:
        assert set(np.unique(c)) <= {1.0, 1.0 + 2.0 ** -7}
        assert abs(np.mean(c > 1.0) - f) < 0.02, np.mean(c > 1.0)
    assert not np.array_equal(copies[0], copies[1])


def loss_tracks_fp32(xp, steps, device="cuda"):
    """The same data for `steps` steps in fp32 and in bf16 mixed precision,
    both on `device` (the CUDA backend, or the CPU's bf16 matmuls): the model
    learns, and every step's bf16 loss is within 1% of the fp32 one."""
    from llmpy.model import GPT
    from llmpy.optim import AdamW, clip_scale, global_norm
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    rng = np.random.default_rng(7)
    # a learnable stream: token t+1 = (3 * token t + 1) mod 64, with 10% noise;
    # a new batch every step, so the loss falls to the noise's entropy (~0.75)
    # instead of to ~0 on one memorized batch (where relative errors mean little)
    seq = np.zeros((steps, 4, 17), np.int64)
    seq[:, :, 0] = rng.integers(0, 64, (steps, 4))
    for t in range(16):
        noise = rng.random((steps, 4)) >= 0.9
        seq[:, :, t + 1] = np.where(noise, rng.integers(0, 64, (steps, 4)), (3 * seq[:, :, t] + 1) % 64)
    batches = [(xp.asarray(b[:, :-1]), xp.asarray(b[:, 1:])) for b in seq]
    losses = {}
    for dtype in ("fp32", "bf16"):
        model = GPT(cfg, device=device, seed=0, dtype=dtype)
        opt = AdamW(model, weight_decay=0.1)
        losses[dtype] = []
        for t, (x, y) in enumerate(batches, start=1):
            model.zero_grad()
            _, loss = model.forward(x, y)
            model.backward()
            opt.step(3e-3, t, grad_scale=clip_scale(global_norm(model), 1.0))
            losses[dtype].append(loss)
    l32, l16 = np.array(losses["fp32"]), np.array(losses["bf16"])
    assert l32[-1] < 0.5 * l32[0]                          # it learned the rule
    rel = np.abs(l16 - l32) / l32
    worst = np.max(rel)
    assert worst <= 0.01, (worst, int(np.argmax(rel)), l32[::10].round(3).tolist(), rel[::10].round(4).tolist())
    return worst
