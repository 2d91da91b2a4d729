"""The compiled AdamW (ops/cpu_kernels.py, numba) against the NumPy
reference (ops/cpu.py): the same float32 operations in the same order, so
the same bits; and its bf16 copy against ml_dtypes' rounding."""
from __future__ import annotations

import numpy as np
import pytest

from llmpy.ops import cpu, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available, reason="needs numba")


@pytest.mark.parametrize("weight_decay, grad_scale", [(0.1, 1.0), (0.0, 0.37), (0.1, 0.37)])
def test_compiled_adamw_is_the_reference_to_the_bit(weight_decay, grad_scale):
    rng = np.random.default_rng(0)
    n = 10_007
    state = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]       # param, m, grad
    v0 = rng.random(n).astype(np.float32) * 1e-3
    ref = [x.copy() for x in (state[0], state[1], v0)]
    got = [x.copy() for x in (state[0], state[1], v0)]
    scratch = np.empty((2, n), np.float32)
    for step in (1, 2, 50):
        cpu.adamw_update(ref[0], state[2], ref[1], ref[2], 3e-4, 0.9, 0.95, 1e-8, weight_decay, step, scratch,
                         grad_scale)
        cpu_kernels.adamw_update(got[0], state[2], got[1], got[2], 3e-4, 0.9, 0.95, 1e-8, weight_decay, step,
                                 scratch, grad_scale)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], state[0])          # it did update


def test_compiled_adamw_writes_the_bf16_copy_rounded_to_nearest_even():
    import ml_dtypes
    rng = np.random.default_rng(1)
    n = 4096
    p = rng.standard_normal(n).astype(np.float32)
    p[:4] = [np.inf, -np.inf, 0.0, -0.0]                 # stay what they are through the update below
    g = np.zeros(n, np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    copy = np.full(n, np.nan, ml_dtypes.bfloat16)
    cpu_kernels.adamw_update(p, g, m, v, 0.0, 0.9, 0.95, 1e-8, 0.0, 1, None, copy=copy)
    np.testing.assert_array_equal(copy.view(np.uint16), p.astype(ml_dtypes.bfloat16).view(np.uint16))
    p[5] = np.nan
    cpu_kernels.adamw_update(p, g, m, v, 0.0, 0.9, 0.95, 1e-8, 0.0, 1, None, copy=copy)
    assert np.isnan(copy[5].astype(np.float32))            # a NaN stays a NaN (the non-finite check sees it)


def test_adamw_uses_the_compiled_update_and_gives_the_same_weights(monkeypatch):
    from llmpy.config import GPTConfig
    from llmpy.model import GPT
    from llmpy.optim import AdamW
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    x = np.random.default_rng(2).integers(0, 100, (2, 16))
    calls = []
    compiled_update = cpu_kernels.adamw_update
    monkeypatch.setattr(cpu_kernels, "adamw_update", lambda *a, **k: calls.append(1) or compiled_update(*a, **k))
    models = []
    for compiled in (True, False):
        model = GPT(cfg, seed=3)
        opt = AdamW(model)
        opt.compiled = compiled
        for t in (1, 2, 3):
            model.zero_grad()
            model.forward(x, x)
            model.backward()
            opt.step(1e-3, t, grad_scale=0.9)
        models.append(model)
    assert len(calls) >= 3                              # the compiled run went through it
    np.testing.assert_array_equal(models[0].params.flat, models[1].params.flat)
