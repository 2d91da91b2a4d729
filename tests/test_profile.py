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
