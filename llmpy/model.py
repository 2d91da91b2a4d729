"""GPT-2, written once against the op contract (llmpy/ops/contract.py).

The model knows no backend: it calls `self.ops.<layer>_forward/_backward` on
arrays of the backend's kind. Parameters live in ONE flat float32 buffer with a
named view per tensor (llm.c's order and layouts, so an llm.c file is this
buffer plus a header); gradients, and AdamW's m and v, use the same layout.
Activations for a given (B, T) are allocated once and reused every step
(lm.CausalLM: what GPT-2 shares with the other families).

Precision: `dtype="fp32"` keeps everything in float32 (the CPU reference and
the CUDA path checked against it). `dtype="bf16"` (CUDA) is mixed precision:
`params` stays the float32 master copy that AdamW updates and checkpoints
save, the ops read `compute_params`, a bfloat16 copy of it, and activations
and gradients are bfloat16 too; only the statistics that feed divisions and
logs (layernorm mean/rstd, logsumexp, losses) stay float32.

One transformer block (x is the residual stream, shape (B, T, C)):
    x = x + attproj(attention(qkv(layernorm1(x))))
    x = x + fcproj(gelu(fc(layernorm2(x))))
and at the end: logits = layernorm_f(x) @ wte^T (the LM head is tied to wte).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import formats
from .config import GPTConfig
from .formats.hf import from_hf, to_hf
from .gpt2_layout import DECAYED, parameter_shapes
from .lm import CausalLM
from .tensors import FlatTensors


class Activations:
    """Everything the forward pass keeps for the backward pass, for one (B, T)."""

    def __init__(self, cfg: GPTConfig, B: int, T: int, xp, dtype=np.float32, ops=None):
        L, C, NH, Vp = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.padded_vocab_size
        N = B * T
        z = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731  storage type of the activations
        f32 = lambda *shape: xp.empty(shape, dtype=np.float32)  # noqa: E731  statistics stay float32
        self.B, self.T = B, T
        self.encoded = z(N, C)               # residual stream entering layer 0
        self.ln1, self.ln1_mean, self.ln1_rstd = z(L, N, C), f32(L, N), f32(L, N)
        self.qkv = z(L, N, 3 * C)
        # what attention keeps for its backward: the softmax probabilities
        # (B, NH, T, T), or less (flash attention keeps a logsumexp per row)
        att_shape, att_dtype, datt_shape = ops.attention_saved(B, NH, T, C // NH, dtype)
        self.att = xp.empty((L, *att_shape), dtype=att_dtype)
        self.atty = z(L, N, C)               # attention output, before attproj
        self.residual2 = z(L, N, C)          # x + attention branch
        self.ln2, self.ln2_mean, self.ln2_rstd = z(L, N, C), f32(L, N), f32(L, N)
        self.fch = z(L, N, 4 * C)            # fc output, before gelu
        self.fch_gelu = z(L, N, 4 * C)
        self.residual3 = z(L, N, C)          # x + mlp branch = next layer's input
        self.lnf, self.lnf_mean, self.lnf_rstd = z(N, C), f32(N), f32(N)
        # logits over the padded vocabulary (Vp = 50304 = 393 x 128: rows of a
        # size the GPU's matmuls like); only the first V columns are real, the
        # classifier ignores the rest and its backward zeroes them
        self.logits = z(N, Vp)               # becomes dlogits in the backward pass
        self.lse = f32(N)                    # logsumexp of each row of logits
        self.losses = f32(N)
        self.targets = None
        self.ids = None
        self.dlogits_scale = None            # set when forward() already turned logits into dlogits
        # backward scratch: one layer's worth, reused by every layer
        self.dresidual = z(N, C)
        self.dC = z(N, C)                    # dln1 / dln2 / datty / dlnf
        self.dqkv = z(N, 3 * C)
        self.d4C = z(N, 4 * C)               # dfch_gelu, then dfch in place
        # the ops' own scratch, as large as this backend says it needs (the
        # contract's shapes unless it says less: the CUDA kernels keep only
        # per-chunk partial sums for layernorm and need none for the GELU)
        self.scratch4C = z(N, 4 * C) if ops.needs_gelu_scratch else None
        self.ln_scratch = f32(2, -(-N // ops.ln_scratch_rows_per_chunk), C)   # float32 partial sums of dweight, dbias
        self.datt = z(*datt_shape)

    # what one block's forward reads and writes (GPT.block_forward)
    LAYER = ("ln1", "qkv", "atty", "residual2", "ln2", "ln2_mean", "ln2_rstd", "fch", "fch_gelu", "residual3")

    def layer(self, l: int) -> SimpleNamespace:
        """Layer l's views of the per-layer buffers, by the names block_forward uses."""
        return SimpleNamespace(**{name: getattr(self, name)[l] for name in self.LAYER})


class GPT(CausalLM):
    """GPT-2 language model. `GPT(config, device="cpu", seed=0, dtype="fp32")`;
    the buffers and the bookkeeping around forward and backward are lm.CausalLM's."""

    Activations = Activations
    has_kv_cache = True    # inference.forward_cached runs this model's blocks over new tokens
    decayed = DECAYED      # the tensors AdamW applies weight decay to (the 2-D weight matrices)
    parameter_shapes = staticmethod(parameter_shapes)
    to_hf = staticmethod(to_hf)
    from_hf = staticmethod(from_hf)

    # ------------------------------------------------------------------ init

    def _init_weights(self, seed: int):
        # GPT-2's init: N(0, 0.02) weights, zero biases, unit layernorm gains;
        # the projections that write into the residual stream (attproj, fcproj)
        # get 0.02 / sqrt(2 L) so the stream's variance does not grow with depth.
        cfg = self.config
        rng = np.random.default_rng(seed)
        std, res_std = 0.02, 0.02 / np.sqrt(2 * cfg.n_layer)

        def normal(shape, s):
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

        host = FlatTensors(parameter_shapes(cfg), np)
        host.wte[:cfg.vocab_size] = normal((cfg.vocab_size, cfg.n_embd), std)  # padded rows stay 0
        host.wpe[:] = normal(host.wpe.shape, std)
        for name in ("qkvw", "fcw"):
            host.views[name][:] = normal(host.views[name].shape, std)
        for name in ("attprojw", "fcprojw"):
            host.views[name][:] = normal(host.views[name].shape, res_std)
        for name in ("ln1w", "ln2w", "lnfw"):
            host.views[name][:] = 1.0
        self.set_params(host.flat)

    @property
    def num_parameters(self) -> int:
        """Parameter count as Hugging Face counts it (no padded vocabulary rows)."""
        cfg = self.config
        return self.params.flat.size - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd

    # ------------------------------------------------------------------ forward

    def forward(self, ids, targets=None, sync=True, loss_scale=None):
        """ids (B, T) ints -> (logits (B, T, V), mean loss or None).

        The logits are a view of the model's own buffer: valid until the next
        forward() or backward() (which turns them into their gradient).

        sync=False is for a step that must not wait for the GPU (a CUDA
        graph, see step.DeviceStep): the ids are not checked (the caller has)
        and the loss is not computed (the per-token losses are left in
        self.acts.losses); the loss returned is None.

        loss_scale (with targets): the backward(loss_scale) that will follow
        is started now, the classifier writing the logits' gradient in the
        same pass over the logits that computes the loss (the returned
        logits are then that gradient)."""
        ops, cfg, p = self.ops, self.config, self.compute_params
        ids, a = self._begin_forward(ids, sync)
        B, T = ids.shape
        C, NH = cfg.n_embd, cfg.n_head

        ops.encoder_forward(a.encoded.reshape(B, T, C), ids, p.wte, p.wpe)
        x = a.encoded
        # Each block writes the layernorm after it (block_forward), so the
        # first block's ln1 is the only standalone one (lnf without blocks).
        ops.layernorm_forward(*self._next_layernorm(a, -1)[:3], x, *self._next_layernorm(a, -1)[3:])
        for l in range(cfg.n_layer):
            def attention(atty, qkv, l=l):
                ops.attention_forward(atty.reshape(B, T, C), a.att[l], qkv.reshape(B, T, 3 * C), NH)
            x = self.block_forward(l, x, a.layer(l), self._next_layernorm(a, l), attention)
        return self._logits_and_loss(a, ids, p.wte, targets, sync, loss_scale)     # the head is tied to wte

    def block_forward(self, l: int, x, a, next_ln, attention):
        """Transformer block l on the residual stream x (N, C); returns its
        output, a.residual3. a holds the block's buffers (one layer of
        Activations, or the KV-cache forward's own, see inference.py) with
        a.ln1 = layernorm1(x) already written: each residual add is fused with
        the layernorm that reads its result (residual_layernorm_forward: res =
        a + b, out = layernorm(res)), so the block ends by writing the NEXT
        layernorm, next_ln = (out, mean, rstd, weight, bias): the next block's
        ln1, or lnf after the last. attention(atty, qkv) writes the attention
        output (N, C) from qkv (N, 3C): causal self-attention over this batch,
        or over the cache's keys and values."""
        ops, p = self.ops, self.compute_params
        ops.matmul_forward(a.qkv, a.ln1, p.qkvw[l], p.qkvb[l])
        attention(a.atty, a.qkv)
        ops.matmul_forward(a.residual2, a.atty, p.attprojw[l], p.attprojb[l])
        # residual2 = x + attention branch; ln2 = layernorm(residual2)
        ops.residual_layernorm_forward(a.residual2, a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, x,
                                       p.ln2w[l], p.ln2b[l])
        # fc and its GELU: fch = ln2 @ fcw^T + fcb, fch_gelu = gelu(fch) (one fused op)
        ops.matmul_forward(a.fch, a.ln2, p.fcw[l], p.fcb[l], gelu_out=a.fch_gelu)
        ops.matmul_forward(a.residual3, a.fch_gelu, p.fcprojw[l], p.fcprojb[l])
        # residual3 = residual2 + mlp branch; then the layernorm that reads it
        out, mean, rstd, weight, bias = next_ln
        ops.residual_layernorm_forward(a.residual3, out, mean, rstd, a.residual3, a.residual2, weight, bias)
        return a.residual3

    def _next_layernorm(self, a, l: int):
        """(out, mean, rstd, weight, bias) of the layernorm after block l: the
        next block's ln1, or lnf after the last block."""
        p = self.compute_params
        if l + 1 < self.config.n_layer:
            return a.ln1[l + 1], a.ln1_mean[l + 1], a.ln1_rstd[l + 1], p.ln1w[l + 1], p.ln1b[l + 1]
        return a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb

    # ------------------------------------------------------------------ backward

    def backward(self, loss_scale: float = 1.0, sorted_order=None):
        """Gradient of loss_scale * (mean loss of the last forward) wrt every
        parameter, ADDED to self.grads (unless zero_grad() was called last, then
        written). Call after forward(ids, targets). sorted_order: the token
        ids' sort for the GPU encoder backward, made ahead (step.DeviceStep)."""
        a, acc = self._head_backward(loss_scale, "wte")     # dlogits, dwte (the head), dlnf in a.dC
        ops, cfg, p, g = self.ops, self.config, self.compute_params, self.grads
        B, T, C = a.B, a.T, cfg.n_embd
        dres = a.dresidual
        ops.zero(dres)
        x_last = a.residual3[cfg.n_layer - 1] if cfg.n_layer else a.encoded
        ops.layernorm_backward(dres, g.lnfw, g.lnfb, a.dC, x_last, p.lnfw, a.lnf_mean, a.lnf_rstd,
                               a.ln_scratch, acc=acc)
        for l in reversed(range(cfg.n_layer)):
            x = a.residual3[l - 1] if l > 0 else a.encoded
            self.block_backward(l, x, a, dres, acc)
        # dwte already holds the LM head's gradient (tied weights): the encoder
        # adds its part to it, so wpe's gradient is cleared here instead.
        if not acc:
            ops.zero(g.wpe)
        ops.encoder_backward(g.wte, g.wpe, dres.reshape(B, T, C), a.ids, acc=True, sorted_order=sorted_order)
        self._end_backward()

    def block_backward(self, l: int, x, a, dres, acc: bool):
        """Backward of block l, whose input was x (N, C): dres, the gradient of
        the loss wrt the block's output, becomes the gradient wrt x (in place:
        each layernorm backward ADDS its input's gradient to it, which is the
        residual connection's sum of the two paths); the block's parameter
        gradients are written (acc=False) or added (acc=True)."""
        ops, cfg, p, g = self.ops, self.config, self.compute_params, self.grads
        B, T = a.B, a.T
        C, NH = cfg.n_embd, cfg.n_head
        # MLP branch: its output was added to the stream, so d(fcproj) = dres
        # ... and through the GELU in the same op: d4C = (dres @ fcprojw) * gelu'(fch)
        ops.matmul_backward(a.d4C, g.fcprojw[l], g.fcprojb[l], dres, a.fch_gelu[l], p.fcprojw[l], acc=acc,
                            gelu_inp=a.fch[l], gelu_scratch=a.scratch4C)
        ops.matmul_backward(a.dC, g.fcw[l], g.fcb[l], a.d4C, a.ln2[l], p.fcw[l], acc=acc)
        ops.layernorm_backward(dres, g.ln2w[l], g.ln2b[l], a.dC, a.residual2[l], p.ln2w[l],
                               a.ln2_mean[l], a.ln2_rstd[l], a.ln_scratch, acc=acc)
        # attention branch: d(attproj) = dres again
        ops.matmul_backward(a.dC, g.attprojw[l], g.attprojb[l], dres, a.atty[l], p.attprojw[l], acc=acc)
        ops.attention_backward(a.dqkv.reshape(B, T, 3 * C), a.dC.reshape(B, T, C),
                               a.qkv[l].reshape(B, T, 3 * C), a.att[l], a.datt, NH,
                               out=a.atty[l].reshape(B, T, C))
        ops.matmul_backward(a.dC, g.qkvw[l], g.qkvb[l], a.dqkv, a.ln1[l], p.qkvw[l], acc=acc)
        ops.layernorm_backward(dres, g.ln1w[l], g.ln1b[l], a.dC, x, p.ln1w[l],
                               a.ln1_mean[l], a.ln1_rstd[l], a.ln_scratch, acc=acc)

    def save(self, path, format: str = "hf"):
        """Write the model: a Hugging Face directory, or an llm.c file (format="llmc")."""
        formats.save_model(self, path, format=format)


# bytes of a training step's buffers for a GPT-2 of config cfg (lm.CausalLM.memory_estimate)
memory_estimate = GPT.memory_estimate
