"""Llama 3, written once against the op contract (llmpy/ops/contract.py), as model.GPT is.

The same interface as model.GPT (forward, backward, zero_grad, params, grads,
compute_params, params_updated, state_dict, grads_dict, config, ops,
decayed, num_parameters), so step.py, optim.py and the checkpoints take it
unchanged. Parameters live in one flat float32 buffer (llama_layout.py);
activations for a given (B, T) are allocated once and reused.

One block (x is the residual stream, shape (N, C); no biases anywhere):
    h = x + o_proj(attention(rope(q), rope(k), v))     q, k, v = qkv(rmsnorm1(x))
    x = h + down(silu(gate(rmsnorm2(h))) * up(rmsnorm2(h)))
and at the end: logits = rmsnorm_f(x) @ head^T, head = wte (tied) or lm_head.
Attention is grouped-query: NKV key/value heads, each read by NH / NKV query
heads. q_proj, k_proj, v_proj are one matmul (qkvw), gate_proj and up_proj
another (fcw).

Positions enter only through RoPE: the cos/sin of every position's angles
are computed once on the host (rope_table) and sliced per sequence.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from .formats.hf_llama import from_hf, to_hf
from .llama_layout import DECAYED, LlamaConfig, parameter_shapes, preset  # noqa: F401  (the family's names)
from .lm import CausalLM
from .tensors import FlatTensors


# ----------------------------------------------------------------------------
# rotary embedding angles

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """(hs/2,) float64: the angle per position of each channel pair,
    theta^(-2i / hs), with Llama 3.1's rescaling when cfg.rope_scaling is set.

    The llama3 rule (Meta's apply_scaling; HF's _compute_llama3_parameters)
    leaves the short wavelengths alone, divides the long ones by `factor`,
    and blends linearly in between: with wavelength w = 2 pi / f and
    context L0 = original_max_position_embeddings,
        w < L0 / high_freq_factor:   f
        w > L0 / low_freq_factor:    f / factor
        otherwise:                   (1 - s) f / factor + s f,
                                     s = (L0 / w - low_freq_factor) / (high_freq_factor - low_freq_factor)
    """
    hs = cfg.hs
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs)
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    L0 = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (L0 / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen < L0 / hi, inv_freq, np.where(wavelen > L0 / lo, inv_freq / factor, blended))


def rope_table(cfg: LlamaConfig, T: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, hs/2) float32 of the angles t * inv_freq for positions t < T
    (computed in float64, rounded once)."""
    angles = np.outer(np.arange(T, dtype=np.float64), rope_inv_freq(cfg))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ----------------------------------------------------------------------------
# activations

class Activations:
    """Everything the forward pass keeps for the backward pass, for one (B, T)."""

    def __init__(self, cfg: LlamaConfig, B: int, T: int, xp, dtype=np.float32, ops=None):
        L, C, NH, Vp, I = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size, cfg.intermediate_size
        A = NH * cfg.hs                      # width of the attention output (o_proj's input)
        N = B * T
        z = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731  storage type of the activations
        f32 = lambda *shape: xp.empty(shape, dtype=np.float32)  # noqa: E731  statistics stay float32
        self.B, self.T = B, T
        self.encoded = z(N, C)               # the token embeddings: residual stream entering layer 0
        self.ln1, self.ln1_rstd = z(L, N, C), f32(L, N)
        self.qkv = z(L, N, cfg.qkv_size)     # q, k rotated in place after the projection
        att_shape, att_dtype, datt_shape = ops.attention_saved(B, NH, T, cfg.hs, dtype, n_kv_head=cfg.n_kv_head)
        self.att = xp.empty((L, *att_shape), dtype=att_dtype)
        self.atty = z(L, N, A)               # attention output, before o_proj
        self.residual2 = z(L, N, C)          # x + attention branch
        self.ln2, self.ln2_rstd = z(L, N, C), f32(L, N)
        self.fch = z(L, N, 2 * I)            # [gate | up]
        self.fch_swiglu = z(L, N, I)         # silu(gate) * up
        self.residual3 = z(L, N, C)          # x + mlp branch = next layer's input
        self.lnf, self.lnf_rstd = z(N, C), f32(N)
        self.logits = z(N, Vp)               # becomes dlogits in the backward pass
        self.lse = f32(N)
        self.losses = f32(N)
        self.targets = None
        self.ids = None
        self.dlogits_scale = None
        # backward scratch: one layer's worth, reused by every layer
        self.dresidual = z(N, C)
        self.dC = z(N, C)
        self.dA = z(N, A)                    # d atty
        self.dqkv = z(N, cfg.qkv_size)
        self.d2I = z(N, 2 * I)               # d fch
        self.dI = z(N, I)                    # d fch_swiglu
        self.ln_scratch = f32(2, -(-N // ops.ln_scratch_rows_per_chunk), C)
        self.datt = z(*datt_shape)

    LAYER = ("ln1", "qkv", "atty", "residual2", "ln2", "ln2_rstd", "fch", "fch_swiglu", "residual3")

    def layer(self, l: int) -> SimpleNamespace:
        """Layer l's views of the per-layer buffers, by the names block_forward uses."""
        return SimpleNamespace(**{name: getattr(self, name)[l] for name in self.LAYER})


# ----------------------------------------------------------------------------
# the model

class Llama(CausalLM):
    """Llama 3 language model. `Llama(config, device="cpu", seed=0, dtype="fp32")`;
    the buffers and the bookkeeping around forward and backward are lm.CausalLM's."""

    Activations = Activations
    has_kv_cache = True    # inference.forward_cached runs this model's blocks over new tokens (GQA cache)
    decayed = DECAYED      # the tensors AdamW applies weight decay to (the matrices)
    parameter_shapes = staticmethod(parameter_shapes)
    to_hf = staticmethod(to_hf)
    from_hf = staticmethod(from_hf)

    def __init__(self, config: LlamaConfig, device: str = "cpu", seed: int = 0, init: bool = True,
                 dtype: str = "fp32"):
        self._rope = (None, None)            # cos, sin (T, hs/2) on the backend, grown as needed
        super().__init__(config, device, seed, init, dtype)

    def _init_weights(self, seed: int):
        # N(0, 0.02) matrices (HF's initializer_range), unit RMSNorm gains; the
        # projections that write into the residual stream (o_proj, down_proj)
        # get 0.02 / sqrt(2 L), as GPT-2's and llm.c's train_llama3.py do.
        cfg = self.config
        rng = np.random.default_rng(seed)
        std, res_std = 0.02, 0.02 / np.sqrt(2 * cfg.n_layer)
        host = FlatTensors(parameter_shapes(cfg), np)
        heads = ("wte",) if cfg.tie_word_embeddings else ("wte", "lm_head")
        for name in heads:
            host.views[name][:cfg.vocab_size] = rng.standard_normal((cfg.vocab_size, cfg.n_embd),
                                                                    dtype=np.float32) * np.float32(std)
        for name, s in (("qkvw", std), ("fcw", std), ("attprojw", res_std), ("fcprojw", res_std)):
            host.views[name][:] = rng.standard_normal(host.views[name].shape, dtype=np.float32) * np.float32(s)
        for name in ("ln1w", "ln2w", "lnfw"):
            host.views[name][:] = 1.0
        self.set_params(host.flat)

    @property
    def num_parameters(self) -> int:
        """Parameter count as Hugging Face counts it (no padded vocabulary rows)."""
        cfg = self.config
        heads = 1 if cfg.tie_word_embeddings else 2
        return self.params.flat.size - heads * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd

    @property
    def head(self) -> str:
        """The LM head's tensor: wte when tied, else lm_head."""
        return "wte" if self.config.tie_word_embeddings else "lm_head"

    def rope(self, T: int):
        """cos, sin (T, hs/2) for positions 0 .. T-1, on the backend."""
        if self._rope[0] is None or self._rope[0].shape[0] < T:
            self._rope = tuple(self.xp.asarray(t) for t in rope_table(self.config, max(T, 1)))
        return self._rope[0][:T], self._rope[1][:T]

    # ------------------------------------------------------------------ forward

    def forward(self, ids, targets=None, sync=True, loss_scale=None):
        """ids (B, T) ints -> (logits (B, T, V), mean loss or None); as model.GPT.forward
        (the logits a view of the model's buffer; sync and loss_scale the same)."""
        ops, cfg, p = self.ops, self.config, self.compute_params
        ids, a = self._begin_forward(ids, sync)
        B, T = ids.shape
        C = cfg.n_embd
        cos, sin = self.rope(T)

        ops.embedding_forward(a.encoded.reshape(B, T, C), ids, p.wte)
        x = a.encoded
        ops.rmsnorm_forward(*self._next_norm(a, -1)[:2], x, *self._next_norm(a, -1)[2:])
        for l in range(cfg.n_layer):
            def attention(atty, qkv, l=l):
                self._rotate_qk(qkv, B, T, cos, sin)
                ops.gqa_attention_forward(atty.reshape(B, T, -1), a.att[l], qkv.reshape(B, T, -1),
                                          cfg.n_head, cfg.n_kv_head)
            x = self.block_forward(l, x, a.layer(l), self._next_norm(a, l), attention)
        return self._logits_and_loss(a, ids, p.views[self.head], targets, sync, loss_scale)

    def _qk_heads(self, qkv, B, T):
        """The NH + NKV rotated heads of qkv (N, (NH + 2 NKV) hs): a (B, T, NH + NKV, hs) view."""
        cfg = self.config
        return qkv.reshape(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.hs)[:, :, :cfg.n_head + cfg.n_kv_head]

    def _rotate_qk(self, qkv, B, T, cos, sin):
        heads = self._qk_heads(qkv, B, T)
        self.ops.rope_forward(heads, heads, cos, sin)

    def block_forward(self, l: int, x, a, next_norm, attention):
        """Block l on the residual stream x (N, C), with a.ln1 = rmsnorm1(x)
        written; returns a.residual3. As model.GPT.block_forward: each
        residual add is fused with the norm that reads it, so the block ends
        by writing next_norm = (out, rstd, weight, eps), the next block's ln1
        or lnf. attention(atty, qkv) rotates q, k and writes the attention output."""
        ops, cfg, p = self.ops, self.config, self.compute_params
        eps = cfg.rms_norm_eps
        ops.matmul_forward(a.qkv, a.ln1, p.qkvw[l], None)
        attention(a.atty, a.qkv)
        ops.matmul_forward(a.residual2, a.atty, p.attprojw[l], None)
        ops.residual_rmsnorm_forward(a.residual2, a.ln2, a.ln2_rstd, a.residual2, x, p.ln2w[l], eps)
        ops.matmul_forward(a.fch, a.ln2, p.fcw[l], None)
        ops.swiglu_forward(a.fch_swiglu, a.fch)
        ops.matmul_forward(a.residual3, a.fch_swiglu, p.fcprojw[l], None)
        out, rstd, weight, eps = next_norm
        ops.residual_rmsnorm_forward(a.residual3, out, rstd, a.residual3, a.residual2, weight, eps)
        return a.residual3

    def _next_norm(self, a, l: int):
        """(out, rstd, weight, eps) of the norm after block l: the next block's ln1, or lnf."""
        p, eps = self.compute_params, self.config.rms_norm_eps
        if l + 1 < self.config.n_layer:
            return a.ln1[l + 1], a.ln1_rstd[l + 1], p.ln1w[l + 1], eps
        return a.lnf, a.lnf_rstd, p.lnfw, eps

    # ------------------------------------------------------------------ backward

    def backward(self, loss_scale: float = 1.0, sorted_order=None):
        """Gradient of loss_scale * (mean loss of the last forward) wrt every
        parameter, ADDED to self.grads (written after zero_grad()); as model.GPT.backward."""
        a, acc = self._head_backward(loss_scale, self.head)     # dlogits, the head's gradient, dlnf in a.dC
        ops, cfg, p, g = self.ops, self.config, self.compute_params, self.grads
        B, T, C = a.B, a.T, cfg.n_embd
        dres = a.dresidual
        ops.zero(dres)
        x_last = a.residual3[cfg.n_layer - 1] if cfg.n_layer else a.encoded
        ops.rmsnorm_backward(dres, g.lnfw, a.dC, x_last, p.lnfw, a.lnf_rstd, a.ln_scratch, acc=acc)
        cos, sin = self.rope(T)
        for l in reversed(range(cfg.n_layer)):
            x = a.residual3[l - 1] if l > 0 else a.encoded
            self.block_backward(l, x, a, dres, acc, cos, sin)
        # tied: wte already holds the head's gradient, the embedding adds its part
        ops.embedding_backward(g.wte, dres.reshape(B, T, C), a.ids, acc=acc or cfg.tie_word_embeddings,
                               sorted_order=sorted_order)
        self._end_backward()

    def block_backward(self, l: int, x, a, dres, acc: bool, cos, sin):
        """Backward of block l, whose input was x (N, C): dres, the gradient
        wrt the block's output, becomes the gradient wrt x in place (each
        rmsnorm backward ADDS its input's gradient: the residual sum); the
        block's parameter gradients are written (acc=False) or added."""
        ops, cfg, p, g = self.ops, self.config, self.compute_params, self.grads
        B, T = a.B, a.T
        # MLP branch: down_proj's output was added to the stream, so its gradient is dres
        ops.matmul_backward(a.dI, g.fcprojw[l], None, dres, a.fch_swiglu[l], p.fcprojw[l], acc=acc)
        ops.swiglu_backward(a.d2I, a.dI, a.fch[l])
        ops.matmul_backward(a.dC, g.fcw[l], None, a.d2I, a.ln2[l], p.fcw[l], acc=acc)
        ops.rmsnorm_backward(dres, g.ln2w[l], a.dC, a.residual2[l], p.ln2w[l], a.ln2_rstd[l], a.ln_scratch,
                             acc=acc)
        # attention branch: o_proj's gradient is dres again
        ops.matmul_backward(a.dA, g.attprojw[l], None, dres, a.atty[l], p.attprojw[l], acc=acc)
        ops.gqa_attention_backward(a.dqkv.reshape(B, T, -1), a.dA.reshape(B, T, -1), a.qkv[l].reshape(B, T, -1),
                                   a.att[l], a.datt, cfg.n_head, cfg.n_kv_head, out=a.atty[l].reshape(B, T, -1))
        # attention read the rotated q, k: back through the rotation to the projection's output
        dheads = self._qk_heads(a.dqkv, B, T)
        ops.rope_backward(dheads, dheads, cos, sin)
        ops.matmul_backward(a.dC, g.qkvw[l], None, a.dqkv, a.ln1[l], p.qkvw[l], acc=acc)
        ops.rmsnorm_backward(dres, g.ln1w[l], a.dC, x, p.ln1w[l], a.ln1_rstd[l], a.ln_scratch, acc=acc)


# bytes of a training step's buffers for a Llama of config cfg (lm.CausalLM.memory_estimate)
memory_estimate = Llama.memory_estimate
