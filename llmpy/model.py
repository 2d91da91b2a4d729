"""GPT-2, written once against the op contract (DESIGN.md section 2).

The model knows no backend: it calls `self.ops.<layer>_forward/_backward` on
arrays of the backend's kind. Parameters live in ONE flat float32 buffer with a
named view per tensor (llm.c's order and layouts, so an llm.c file is this
buffer plus a header); gradients, and AdamW's m and v, use the same layout.
Activations for a given (B, T) are allocated once and reused every step.

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

import numpy as np

from .config import GPTConfig
from .errors import LlmpyError
from .ops import get_backend
from .tensors import FlatTensors


def parameter_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every parameter tensor, in llm.c's order."""
    Vp, C, L, maxT = cfg.padded_vocab_size, cfg.n_embd, cfg.n_layer, cfg.block_size
    return [
        ("wte", (Vp, C)),            # token embedding; also the LM head (tied)
        ("wpe", (maxT, C)),          # position embedding
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


# 2-D weight matrices get weight decay; biases and layernorm parameters do not.
DECAYED = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}


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
        self.scratch4C = z(N, 4 * C)
        self.ln_scratch = f32(2, N, C)       # float32 partial sums of dweight, dbias
        self.datt = z(*datt_shape)


class _ShapesOnly:
    """An array module whose arrays have shapes and sizes but no memory (for memory_estimate)."""
    @staticmethod
    def empty(shape, dtype):
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)


class _AttentionAs:
    """attention_saved as the CUDA backend answers it, flash attention or not."""
    def __init__(self, flash):
        self.flash = flash

    def attention_saved(self, B, NH, T, hs, dtype):
        if self.flash and np.dtype(dtype) != np.float32:
            return (B, NH, T), np.float32, (1,)
        return (B, NH, T, T), dtype, (B, NH, T, T)


def memory_estimate(cfg: GPTConfig, B: int, T: int, dtype: str = "bf16", flash: bool = True) -> dict:
    """Bytes a training step's buffers take, by kind, counted from the same
    shapes the model allocates (Activations and the flat buffers): fp32
    master weights, the bf16 compute copy (bf16 only), gradients, AdamW's m
    and v, and the activations for one (B, T). flash: cuDNN attention keeps
    a logsumexp per row instead of the (T, T) probabilities. Not counted:
    per-op scratch (attention's head-major q/k/v copies, ~7 B T C elements
    without flash), the cuBLASLt / cuDNN workspaces and allocator slack."""
    if dtype == "fp32":
        act = np.dtype(np.float32)
    else:
        from ml_dtypes import bfloat16
        act = np.dtype(bfloat16)
    n = sum(int(np.prod(shape)) for _, shape in parameter_shapes(cfg))
    acts = Activations(cfg, B, T, _ShapesOnly, act, _AttentionAs(flash))
    act_bytes = sum(v.nbytes for v in vars(acts).values() if isinstance(v, np.ndarray))
    out = {"params_fp32": 4 * n, "compute_copy": 0 if dtype == "fp32" else act.itemsize * n,
           "grads": act.itemsize * n, "adamw_m_v": 8 * n, "activations": act_bytes}
    out["total"] = sum(out.values())
    return out


class GPT:
    """GPT-2 language model. `GPT(config, device="cpu", seed=0, dtype="fp32")`."""

    def __init__(self, config: GPTConfig, device: str = "cpu", seed: int = 0, init: bool = True,
                 dtype: str = "fp32"):
        self.config = config
        self.device = device
        self.ops = get_backend(device)
        self.xp = self.ops.xp
        self.dtype = dtype
        self.storage = self.ops.storage_dtype(dtype)   # np.float32, or bfloat16 for "bf16"
        self.params = FlatTensors(parameter_shapes(config), self.xp)   # float32: the master weights
        if self.storage == np.float32:
            self.compute_params = self.params            # what the ops read: the same buffer
        else:
            self.compute_params = FlatTensors(parameter_shapes(config), self.xp, dtype=self.storage)
        self.grads = None          # allocated by the first backward()
        self._grads_fresh = True   # True: the next backward overwrites instead of adding
        self.acts = None           # activations of the last forward()
        self._acts_by_shape = {}   # (B, T) -> Activations; at most two kept (train + sample)
        self._have_forward = False
        if init:
            self._init_weights(seed)

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
        self.params.flat[:] = self.xp.asarray(host.flat)
        self.params_updated()

    def params_updated(self):
        """Call after writing self.params (loading, broadcasting, gathering):
        refreshes the bf16 copy the ops read. Nothing to do in fp32."""
        if self.compute_params is not self.params:
            self.ops.cast(self.compute_params.flat, self.params.flat)

    @property
    def num_parameters(self) -> int:
        """Parameter count as Hugging Face counts it (no padded vocabulary rows)."""
        cfg = self.config
        return self.params.flat.size - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd

    # ------------------------------------------------------------------ forward

    def _activations(self, B, T):
        if (B, T) not in self._acts_by_shape:
            if len(self._acts_by_shape) >= 2:
                # free the least recently used set before allocating the new one
                self._acts_by_shape.pop(next(iter(self._acts_by_shape)))
            self._acts_by_shape[(B, T)] = Activations(self.config, B, T, self.xp, self.storage, self.ops)
        self.acts = self._acts_by_shape.pop((B, T))
        self._acts_by_shape[(B, T)] = self.acts   # most recently used goes last
        return self.acts

    def forward(self, ids, targets=None, sync=True, loss_scale=None):
        """ids (B, T) ints -> (logits (B, T, V), mean loss or None).

        The logits are a view of the model's own buffer: valid until the next
        forward() or backward() (which turns them into their gradient).

        sync=False is for a step that must not wait for the GPU (a CUDA
        graph, see graph_step.py): the ids are not checked (the caller has)
        and the loss is not computed (the per-token losses are left in
        self.acts.losses); the loss returned is None.

        loss_scale (with targets): the backward(loss_scale) that will follow
        is started now, the classifier writing the logits' gradient in the
        same pass over the logits that computes the loss (the returned
        logits are then that gradient)."""
        ops, cfg, p = self.ops, self.config, self.compute_params
        if sync:
            ids = self._check_ids(ids, "ids")
        B, T = ids.shape
        if T > cfg.block_size:
            raise LlmpyError(f"sequence length {T} exceeds the model's block_size {cfg.block_size}")
        a = self._activations(B, T)
        N, C, NH = B * T, cfg.n_embd, cfg.n_head

        ops.encoder_forward(a.encoded.reshape(B, T, C), ids, p.wte, p.wpe)
        x = a.encoded
        # Each residual add is fused with the layernorm that reads its result
        # (residual_layernorm_forward: res = a + b, out = layernorm(res)), so
        # the first layer's ln1 is the only standalone one (and lnf without layers).
        if cfg.n_layer:
            ops.layernorm_forward(a.ln1[0], a.ln1_mean[0], a.ln1_rstd[0], x, p.ln1w[0], p.ln1b[0])
        else:
            ops.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, x, p.lnfw, p.lnfb)
        for l in range(cfg.n_layer):
            ops.matmul_forward(a.qkv[l], a.ln1[l], p.qkvw[l], p.qkvb[l])
            ops.attention_forward(a.atty[l].reshape(B, T, C), a.att[l], a.qkv[l].reshape(B, T, 3 * C), NH)
            ops.matmul_forward(a.residual2[l], a.atty[l], p.attprojw[l], p.attprojb[l])
            # residual2 = x + attention branch; ln2 = layernorm(residual2)
            ops.residual_layernorm_forward(a.residual2[l], a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l],
                                           a.residual2[l], x, p.ln2w[l], p.ln2b[l])
            # fc and its GELU: fch = ln2 @ fcw^T + fcb, fch_gelu = gelu(fch) (one fused op)
            ops.matmul_forward(a.fch[l], a.ln2[l], p.fcw[l], p.fcb[l], gelu_out=a.fch_gelu[l])
            ops.matmul_forward(a.residual3[l], a.fch_gelu[l], p.fcprojw[l], p.fcprojb[l])
            # residual3 = residual2 + mlp branch; then the next layer's ln1, or lnf after the last
            if l + 1 < cfg.n_layer:
                ln, mean, rstd, w, b = a.ln1[l + 1], a.ln1_mean[l + 1], a.ln1_rstd[l + 1], p.ln1w[l + 1], p.ln1b[l + 1]
            else:
                ln, mean, rstd, w, b = a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb
            ops.residual_layernorm_forward(a.residual3[l], ln, mean, rstd, a.residual3[l], a.residual2[l], w, b)
            x = a.residual3[l]
        # LM head over all Vp rows of wte; the classifier reads the first V
        # columns only, so the padded rows cannot enter the softmax or the loss.
        ops.matmul_forward(a.logits, a.lnf, p.wte, None)

        a.ids = ids
        self._have_forward = True
        loss = None
        if targets is not None:
            a.targets = (self._check_ids(targets, "targets") if sync else targets).reshape(N)
            if a.targets.shape[0] != N:
                raise LlmpyError(f"targets shape {targets.shape} does not match ids shape {ids.shape}")
            if loss_scale is None:
                ops.crossentropy_forward(a.losses, a.lse, a.logits, a.targets, V=cfg.vocab_size)
            else:   # d(mean loss)/d(loss_n) = loss_scale / N, as in backward()
                ops.crossentropy_forward_backward(a.losses, a.lse, a.logits, a.targets, loss_scale / N,
                                                  V=cfg.vocab_size)
            a.dlogits_scale = loss_scale
            loss = float(a.losses.mean()) if sync else None
        else:
            a.targets = None
            a.dlogits_scale = None
        return a.logits[:, :cfg.vocab_size].reshape(B, T, cfg.vocab_size), loss

    def _check_ids(self, ids, what):
        ids = self.xp.asarray(ids)
        if ids.ndim != 2:
            raise LlmpyError(f"{what} must have shape (B, T), got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise LlmpyError(f"{what} must be integer token ids, got dtype {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise LlmpyError(f"{what} hold token ids outside [0, {self.config.vocab_size})")
        return ids

    # ------------------------------------------------------------------ backward

    def zero_grad(self):
        """Start a new gradient: the next backward() overwrites instead of adding."""
        self._grads_fresh = True

    def backward(self, loss_scale: float = 1.0, sorted_order=None):
        """Gradient of loss_scale * (mean loss of the last forward) wrt every
        parameter, ADDED to self.grads (unless zero_grad() was called last, then
        written). Call after forward(ids, targets). sorted_order: the token
        ids' sort for the GPU encoder backward, made ahead (graph_step.py)."""
        a = self.acts
        if not self._have_forward or a is None or a.targets is None:
            raise LlmpyError("backward() needs a forward(ids, targets) with targets first")
        ops, cfg, p = self.ops, self.config, self.compute_params
        if self.grads is None:
            self.grads = FlatTensors(parameter_shapes(cfg), self.xp, dtype=self.storage)
        g = self.grads
        acc = not self._grads_fresh
        B, T = a.B, a.T
        N, C, NH = B * T, cfg.n_embd, cfg.n_head

        # d(mean loss)/d(loss_n) = 1/N; the classifier turns logits into dlogits
        # (the padded columns of dlogits are zero, so the padded rows of wte get no gradient),
        # unless forward(loss_scale=...) did it already
        if a.dlogits_scale is None:
            ops.crossentropy_backward(a.logits, a.lse, a.targets, loss_scale / N, V=cfg.vocab_size)
        elif a.dlogits_scale != loss_scale:
            raise LlmpyError(f"backward(loss_scale={loss_scale}) after forward(loss_scale={a.dlogits_scale})")
        dlogits = a.logits
        ops.matmul_backward(a.dC, g.wte, None, dlogits, a.lnf, p.wte, acc=acc)
        dres = a.dresidual
        ops.zero(dres)
        x_last = a.residual3[cfg.n_layer - 1] if cfg.n_layer else a.encoded
        ops.layernorm_backward(dres, g.lnfw, g.lnfb, a.dC, x_last, p.lnfw, a.lnf_mean, a.lnf_rstd,
                               a.ln_scratch, acc=acc)
        for l in reversed(range(cfg.n_layer)):
            x = a.residual3[l - 1] if l > 0 else a.encoded
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
        # dwte already holds the LM head's gradient (tied weights): the encoder
        # adds its part to it, so wpe's gradient is cleared here instead.
        if not acc:
            ops.zero(g.wpe)
        ops.encoder_backward(g.wte, g.wpe, dres.reshape(B, T, C), a.ids, acc=True, sorted_order=sorted_order)
        self._grads_fresh = False
        self._have_forward = False   # the logits are now dlogits

    # ------------------------------------------------------------------ KV cache
    # Incremental decoding (inference only; see KVCache below). Nothing here
    # touches the training activations: forward() and backward() are unchanged.

    def new_kv_cache(self, B: int = 1, max_T: int | None = None) -> "KVCache":
        """An empty KV cache for B sequences of up to max_T (<= block_size) positions."""
        max_T = self.config.block_size if max_T is None else max_T
        if not 0 < max_T <= self.config.block_size:
            raise LlmpyError(f"KV cache length {max_T} must be in [1, block_size={self.config.block_size}]")
        return KVCache(self.config, B, max_T, self.xp, self.storage)

    def forward_cached(self, ids, cache: "KVCache", all_logits: bool = False):
        """Logits of t new tokens at positions [cache.pos, cache.pos + t).

        ids (B, t) ints. Their keys and values are appended to `cache`, and
        attention looks at every cached position before them, so a prompt fed
        in one call (the "prefill") and then one token per call gives the same
        logits as forward() on the whole sequence. Returns a new array: the
        logits of the last new position (B, V), or of all of them (B, t, V).
        """
        ops, cfg, p, xp = self.ops, self.config, self.compute_params, self.xp
        if not hasattr(ops, "attention_forward_cached"):
            raise LlmpyError(f"the {ops.name} backend has no cached attention; use generate(..., use_cache=False)")
        ids = self._check_ids(ids, "ids")
        B, t = ids.shape
        pos = cache.pos
        if B != cache.B:
            raise LlmpyError(f"ids have batch {B} but the KV cache was made for batch {cache.B}")
        if pos + t > cache.max_T:
            raise LlmpyError(f"KV cache holds {cache.max_T} positions, {pos} used: no room for {t} more; "
                             "start a new cache with the last block_size tokens")
        C, NH = cfg.n_embd, cfg.n_head
        hs, N = C // NH, B * t
        f32, act = np.float32, self.storage

        x = xp.empty((B, t, C), dtype=act)
        ops.encoder_forward(x, ids, p.wte, p.wpe[pos:pos + t])   # absolute positions of the new tokens
        x = x.reshape(N, C)
        ln = xp.empty((N, C), dtype=act)
        mean, rstd = xp.empty(N, dtype=f32), xp.empty(N, dtype=f32)
        qkv = xp.empty((N, 3 * C), dtype=act)
        y = xp.empty((B, NH, t, hs), dtype=act)
        branch = xp.empty((N, C), dtype=act)
        h = xp.empty((N, 4 * C), dtype=act)
        hg = xp.empty((N, 4 * C), dtype=act)
        for l in range(cfg.n_layer):
            ops.layernorm_forward(ln, mean, rstd, x, p.ln1w[l], p.ln1b[l])
            ops.matmul_forward(qkv, ln, p.qkvw[l], p.qkvb[l])
            # (N, 3C) -> q, k, v each (B, NH, t, hs); k and v go into the cache
            q, k, v = qkv.reshape(B, t, 3, NH, hs).transpose(2, 0, 3, 1, 4)
            cache.k[l, :, :, pos:pos + t] = k
            cache.v[l, :, :, pos:pos + t] = v
            ops.attention_forward_cached(y, q, cache.k[l, :, :, :pos + t], cache.v[l, :, :, :pos + t], pos)
            atty = xp.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(N, C)
            ops.matmul_forward(branch, atty, p.attprojw[l], p.attprojb[l])
            ops.residual_forward(x, x, branch)           # residual, in place
            ops.layernorm_forward(ln, mean, rstd, x, p.ln2w[l], p.ln2b[l])
            ops.matmul_forward(h, ln, p.fcw[l], p.fcb[l])
            ops.gelu_forward(hg, h)
            ops.matmul_forward(branch, hg, p.fcprojw[l], p.fcprojb[l])
            ops.residual_forward(x, x, branch)           # residual
        cache.pos = pos + t

        # Only the rows we return go through the final layernorm and the LM head
        # (the head is the largest matmul: V x C per row).
        rows = x if all_logits else xp.ascontiguousarray(x.reshape(B, t, C)[:, -1])
        n = rows.shape[0]
        lnf = xp.empty((n, C), dtype=act)
        ops.layernorm_forward(lnf, xp.empty(n, dtype=f32), xp.empty(n, dtype=f32), rows, p.lnfw, p.lnfb)
        logits = xp.empty((n, cfg.vocab_size), dtype=act)
        ops.matmul_forward(logits, lnf, p.wte[:cfg.vocab_size], None)
        return logits.reshape(B, t, cfg.vocab_size) if all_logits else logits

    # ------------------------------------------------------------------ HF names

    def state_dict(self) -> dict:
        """Parameters as NumPy arrays, Hugging Face GPT-2 names and layouts."""
        return to_hf(self.params, self.config, self.ops)

    def grads_dict(self) -> dict:
        """Gradients as NumPy arrays, same names and layouts as state_dict()."""
        if self.grads is None:
            raise LlmpyError("grads_dict() needs a backward() first")
        return to_hf(self.grads, self.config, self.ops)

    def load_state_dict(self, sd: dict, source: str = "state dict"):
        """Copy Hugging Face-named tensors in (see from_hf)."""
        host = from_hf(sd, self.config, source)
        self.params.flat[:] = self.xp.asarray(host.flat)
        self.params_updated()

    def save(self, path, format: str = "hf"):
        from . import checkpoint
        checkpoint.save_model(self, path, format=format)


# ---------------------------------------------------------------------- KV cache
# Why a cache: to sample token n+1, forward() recomputes all n positions, but
# with causal attention the keys and values of positions < n never change once
# computed (position s only sees positions <= s). Keeping them per layer turns
# each new token into O(n) attention work plus one row of every matmul, instead
# of n rows. Memory: 2 x L x B x NH x max_T x hs floats = 2 L B max_T C.
#
# The cache cannot slide. GPT-2's positions are absolute (wpe), so when the
# context outgrows block_size and the window moves by one, every position in
# it changes and so does every key and value: the cache must be refilled from
# the window (sample.py does this).

class KVCache:
    """Keys and values of the positions seen so far: k, v (L, B, NH, max_T, hs)."""

    def __init__(self, cfg: GPTConfig, B: int, max_T: int, xp, dtype=np.float32):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, B, cfg.n_head, max_T, hs)
        self.k = xp.zeros(shape, dtype=dtype)
        self.v = xp.zeros(shape, dtype=dtype)
        self.B, self.max_T = B, max_T
        self.pos = 0                 # positions filled: the next token's position

    def reset(self):
        """Forget everything (the arrays are reused)."""
        self.pos = 0


# ---------------------------------------------------------------------- HF layout
# HF's GPT-2 uses Conv1D layers that store W^T (in, out); we store W (out, in).

def _hf_names(cfg: GPTConfig):
    """(hf name, our tensor, layer or None, transposed?) for every tensor."""
    out = [("transformer.wte.weight", "wte", None, False),
           ("transformer.wpe.weight", "wpe", None, False)]
    for l in range(cfg.n_layer):
        h = f"transformer.h.{l}."
        out += [(h + "ln_1.weight", "ln1w", l, False), (h + "ln_1.bias", "ln1b", l, False),
                (h + "attn.c_attn.weight", "qkvw", l, True), (h + "attn.c_attn.bias", "qkvb", l, False),
                (h + "attn.c_proj.weight", "attprojw", l, True), (h + "attn.c_proj.bias", "attprojb", l, False),
                (h + "ln_2.weight", "ln2w", l, False), (h + "ln_2.bias", "ln2b", l, False),
                (h + "mlp.c_fc.weight", "fcw", l, True), (h + "mlp.c_fc.bias", "fcb", l, False),
                (h + "mlp.c_proj.weight", "fcprojw", l, True), (h + "mlp.c_proj.bias", "fcprojb", l, False)]
    out += [("transformer.ln_f.weight", "lnfw", None, False), ("transformer.ln_f.bias", "lnfb", None, False)]
    return out


def to_hf(tensors: FlatTensors, cfg: GPTConfig, ops) -> dict:
    flat = tensors.flat if ops.xp is np else ops.xp.asnumpy(tensors.flat)
    host = FlatTensors(list(tensors.shapes.items()), np, flat=np.asarray(flat, dtype=np.float32))
    sd = {}
    for hf, ours, layer, transposed in _hf_names(cfg):
        t = host.views[ours] if layer is None else host.views[ours][layer]
        if ours == "wte":
            t = t[:cfg.vocab_size]
        sd[hf] = np.ascontiguousarray(t.T if transposed else t)
    return sd


def from_hf(sd: dict, cfg: GPTConfig, source: str = "state dict") -> FlatTensors:
    """Hugging Face-named tensors -> a host FlatTensors. Accepts names with or
    without the `transformer.` prefix; ignores HF's non-parameter buffers
    (attn.bias, attn.masked_bias) and the tied lm_head.weight."""
    sd = {(k if k.startswith("transformer.") or k.startswith("lm_head") else "transformer." + k): v
          for k, v in sd.items()}
    host = FlatTensors(parameter_shapes(cfg), np)
    for hf, ours, layer, transposed in _hf_names(cfg):
        if hf not in sd:
            raise LlmpyError(f"{source}: missing tensor {hf!r}; is this a GPT-2 checkpoint of this shape?")
        t = np.asarray(sd[hf])
        dst = host.views[ours] if layer is None else host.views[ours][layer]
        if ours == "wte":
            dst = dst[:cfg.vocab_size]
        want = dst.T.shape if transposed else dst.shape
        if tuple(t.shape) != tuple(want):
            raise LlmpyError(f"{source}: tensor {hf!r} has shape {tuple(t.shape)}, expected {tuple(want)} "
                             "for this config")
        dst[...] = t.T if transposed else t
    return host
