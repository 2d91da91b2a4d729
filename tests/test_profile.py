"""llmpy.profile.OpTimer: per-op times of a real CPU step; its accounting
must add up (every call of the model's ops seen once, nested calls not twice)."""
import numpy as np

from llmpy.config import GPTConfig
from llmpy.model import GPT
from llmpy.ops import cpu
from llmpy.optim import AdamW
from llmpy.profile import OpTimer


def test_op_timer_counts_every_op_of_a_step():
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, threads=1)
    x = np.random.default_rng(0).integers(0, 100, (2, 16))
    with OpTimer(model.ops) as timer:
        for t in (1, 2):
            model.zero_grad()
            model.forward(x, x)
            model.backward()
            opt.step(6e-4, t)
    assert cpu.matmul_forward.__name__ == "matmul_forward"          # unwrapped again
    totals = timer.totals()
    L = cfg.n_layer
    # per step: 4 matmuls a layer + the LM head; 2 layernorms a layer + the
    # final one, of which all but layer 0's ln1 are fused with the residual
    # add before them (the fused op is timed, and the layernorm inside it not again)
    assert totals["matmul_forward"][0] == 2 * (4 * L + 1)
    assert totals["matmul_backward"][0] == 2 * (4 * L + 1)
    assert totals["layernorm_forward"][0] == 2 * 1
    assert totals["residual_layernorm_forward"][0] == 2 * 2 * L
    assert totals["crossentropy_forward"][0] == 2 and totals["adamw_update"][0] >= 2
    assert totals["attention_backward"][0] == 2 * L
    assert "gelu_forward" not in totals          # called inside the fc matmul only: counted there
    assert all(ms >= 0 for _, ms in totals.values())
    table = timer.table(steps=2)
    assert "matmul_forward" in table and "total in ops" in table


def test_memory_estimate_counts_what_the_model_allocates():
    # fp32 on the CPU: the estimate must equal the bytes of the buffers a
    # real step allocates (parameters, gradients, AdamW's m and v, activations)
    from llmpy.model import memory_estimate
    cfg = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, threads=1)
    x = np.random.default_rng(0).integers(0, 100, (3, 32))
    model.forward(x, x)
    model.backward()
    acts = sum(v.nbytes for k, v in vars(model.acts).items()
               if isinstance(v, np.ndarray) and k not in ("ids", "targets"))    # (those are the caller's)
    est = memory_estimate(cfg, 3, 32, dtype="fp32", flash=False, device="cpu")
    assert est["activations"] == acts
    assert est["params_fp32"] == model.params.flat.nbytes and est["grads"] == model.grads.flat.nbytes
    assert est["adamw_m_v"] == opt.m.nbytes + opt.v.nbytes and est["compute_copy"] == 0
    bf16 = memory_estimate(cfg, 3, 32, dtype="bf16", flash=True)
    assert bf16["compute_copy"] == bf16["grads"] == model.params.flat.nbytes // 2
    assert bf16["activations"] < est["activations"] // 2        # bf16 and no (T, T) probabilities


def test_row_blocks_on_threads_compute_what_one_block_computes(monkeypatch):
    """The NumPy ops whose rows run in blocks on the thread pool
    (llmpy/ops/cpu_parallel.py: attention, GELU backward, the classifier)
    give bitwise the results of one block on one thread (the plain NumPy
    code): every row done once, the same arithmetic.
    Forced here onto 2 threads and blocks of a few rows each, shapes odd
    enough that the last block is short."""
    from llmpy.ops import cpu_parallel

    rng = np.random.default_rng(0)
    B, T, NH, C, V = 3, 17, 2, 24, 300
    N = B * T
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)   # noqa: E731
    qkv, dy = f(B, T, 3 * C), f(B, T, C)
    fcw, fcb, h, dh = f(4 * C, C), f(4 * C), f(N, C), f(N, 4 * C)
    logits0, targets = f(N, V), rng.integers(0, V - 10, N)

    def run_all():
        o = {}
        o["att"], o["y"] = np.empty((B, NH, T, T), np.float32), np.empty((B, T, C), np.float32)
        cpu.attention_forward(o["y"], o["att"], qkv, NH)
        o["dqkv"] = np.empty_like(qkv)
        cpu.attention_backward(o["dqkv"], dy, qkv, o["att"], np.empty_like(o["att"]), NH)
        o["fch"] = h @ fcw.T + fcb
        o["dh"] = np.empty((N, 4 * C), np.float32)
        cpu.gelu_backward(o["dh"], o["fch"], dh, np.empty_like(dh))
        o["loss"], o["lse"], o["dlogits"] = np.empty(N, np.float32), np.empty(N, np.float32), logits0.copy()
        cpu.crossentropy_forward_backward(o["loss"], o["lse"], o["dlogits"], targets, 1.0 / N, V=V - 5)
        return o

    monkeypatch.setattr(cpu_parallel, "_threads", 1)
    monkeypatch.setattr(cpu_parallel, "BLOCK", 1 << 30)
    one = run_all()
    monkeypatch.setattr(cpu_parallel, "_threads", 2)
    monkeypatch.setattr(cpu_parallel, "_pool", None)
    monkeypatch.setattr(cpu_parallel, "MIN_PARALLEL", 0)
    monkeypatch.setattr(cpu_parallel, "BLOCK", 5 * 4 * C)       # 5 rows of the (N, 4C) arrays a block
    calls = []
    real = cpu_parallel.for_row_blocks

    def counted(fn, n, size, block=None, **kw):
        calls.append(len(cpu_parallel.blocks(n, size, block or cpu_parallel.BLOCK)))
        return real(fn, n, size, block or cpu_parallel.BLOCK, **kw)

    monkeypatch.setattr(cpu, "_for_row_blocks", counted)
    many = run_all()
    assert min(calls) > 1                                      # every op really was cut into blocks
    for k in one:
        assert np.array_equal(one[k], many[k]), k


def test_row_blocks_work_in_a_forked_child():
    # the pool's threads do not survive fork (test_crash forks training runs):
    # a child must make its own pool instead of waiting for ever on the parent's
    import os

    from llmpy.ops import cpu_parallel
    out = np.zeros(1 << 18, dtype=np.float32)
    cpu_parallel.for_row_blocks(lambda lo, hi: out.__setitem__(slice(lo, hi), 1.0), out.size, 1, block=1 << 15,
                                blas_inside=False)                         # the parent's pool now exists
    pid = os.fork()
    if pid == 0:
        try:
            cpu_parallel.for_row_blocks(lambda lo, hi: out.__setitem__(slice(lo, hi), 2.0), out.size, 1,
                                        block=1 << 15, blas_inside=False)
            os._exit(0 if (out == 2.0).all() else 1)
        finally:
            os._exit(1)
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    raise AssertionError("the forked child hung on the parent's thread pool")
