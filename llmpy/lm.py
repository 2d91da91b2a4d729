"""What every model family shares: the buffers, the bookkeeping around
forward and backward, the classifier at the end, and the HF-named views.

A family (model.GPT, llama.Llama) subclasses CausalLM and brings its own
layout (`parameter_shapes`, `decayed`), its Activations class, its init, the
body of forward (embedding and blocks, up to the final norm `a.lnf`) and of
backward (from `a.dC`, the final norm's input gradient, down), and its
Hugging Face name mapping (`to_hf`, `from_hf`). Everything here is the same
for all of them:

- parameters in ONE flat float32 buffer with a named view per tensor (the
  master weights, `params`); the ops read `compute_params`, the same buffer
  in fp32 or a bfloat16 copy of it in bf16 (`params_updated` refreshes it);
  gradients (`grads`) in the same layout, in the storage type;
- activations per (B, T), allocated once, the two most recently used kept
  (training and sampling shapes);
- the LM head and the loss: logits over the padded vocabulary, of which the
  classifier reads the first V columns (`_logits_and_loss`), and the start
  of the backward through them (`_head_backward`).
"""
from __future__ import annotations

import numpy as np

from types import SimpleNamespace

from .errors import LlmpyError
from .ops import contract, cuda_build, get_backend
from .tensors import FlatTensors


class _ShapesOnly:
    """An array module whose arrays have shapes and sizes but no memory (for memory_estimate)."""
    @staticmethod
    def empty(shape, dtype):
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)


class CausalLM:
    Activations = None          # the family's activations class: Activations(cfg, B, T, xp, dtype, ops)
    has_kv_cache = False        # inference.forward_cached can run it (both families set True)
    decayed = frozenset()       # the tensors AdamW applies weight decay to

    @staticmethod
    def parameter_shapes(cfg):  # the family's layout: [(name, shape), ...]
        raise NotImplementedError

    @staticmethod
    def to_hf(host_flat, cfg) -> dict:
        raise NotImplementedError

    @staticmethod
    def from_hf(sd, cfg, source):
        raise NotImplementedError

    def __init__(self, config, device: str = "cpu", seed: int = 0, init: bool = True, dtype: str = "fp32"):
        self.config = config
        self.device = device
        self.ops = get_backend(device, dtype)
        self.xp = self.ops.xp
        self.dtype = dtype
        self.storage = self.ops.storage_dtype(dtype)   # activations, gradients: float32, or bf16 on a GPU
        compute = self.ops.params_dtype(dtype)         # the weights the ops read (bf16 on the CPU too)
        shapes = self.parameter_shapes(config)
        self.params = FlatTensors(shapes, self.xp)      # float32: the master weights
        if compute == np.float32:
            self.compute_params = self.params            # what the ops read: the same buffer
        else:
            self.compute_params = FlatTensors(shapes, self.xp, dtype=compute)
        self.grads = None          # allocated by the first backward()
        self._grads_fresh = True   # True: the next backward overwrites instead of adding
        self.acts = None           # activations of the last forward()
        self._acts_by_shape = {}   # (B, T) -> Activations; at most two kept (train + sample)
        self._have_forward = False
        if init:
            self._init_weights(seed)

    def _init_weights(self, seed: int):
        raise NotImplementedError

    @classmethod
    def memory_estimate(cls, cfg, B: int, T: int, dtype: str = "bf16", flash: bool = True,
                        device: str = "cuda") -> dict:
        """Bytes a training step's buffers take on `device`, by kind, counted
        from the same shapes the model allocates (its Activations and flat
        buffers): fp32 master weights, the bf16 compute copy (bf16 only),
        gradients, AdamW's m and v, and the activations for one (B, T), with
        the scratch that device's ops ask for. flash (cuda): cuDNN attention
        keeps a logsumexp per row instead of the (T, T) probabilities. Not
        counted: per-op scratch (attention's head-major q/k/v copies, ~7 B T C
        elements without flash), the cuBLASLt / cuDNN workspaces and allocator slack."""
        if dtype == "fp32":
            act = np.dtype(np.float32)
        else:
            from ml_dtypes import bfloat16
            act = np.dtype(bfloat16)
        n = sum(int(np.prod(shape)) for _, shape in cls.parameter_shapes(cfg))
        if device == "cpu":
            rule = get_backend("cpu")
        else:   # the CUDA backend's scratch and what its attention keeps, flash attention on or off (CuPy-free)
            rule = SimpleNamespace(attention_saved=lambda B, NH, T, hs, dtype, n_kv_head=None:
                                   contract.attention_saved(B, NH, T, hs, dtype, flash),
                                   ln_scratch_rows_per_chunk=cuda_build.LN_ROWS_PER_CHUNK, needs_gelu_scratch=False)
        acts = cls.Activations(cfg, B, T, _ShapesOnly, act, rule)
        act_bytes = sum(v.nbytes for v in vars(acts).values() if isinstance(v, np.ndarray))
        out = {"params_fp32": 4 * n, "compute_copy": 0 if dtype == "fp32" else act.itemsize * n,
               "grads": act.itemsize * n, "adamw_m_v": 8 * n, "activations": act_bytes}
        out["total"] = sum(out.values())
        return out

    def set_params(self, host_flat):
        """params = host_flat (a NumPy array of the flat layout), and the bf16 copy with it."""
        self.params.flat[:] = self.xp.asarray(host_flat)
        self.params_updated()

    def params_updated(self):
        """Call after writing self.params (loading, broadcasting, gathering):
        refreshes the bf16 copy the ops read. Nothing to do in fp32."""
        if self.compute_params is not self.params:
            self.ops.cast(self.compute_params.flat, self.params.flat)

    # ------------------------------------------------------------------ forward

    def _activations(self, B, T):
        if (B, T) not in self._acts_by_shape:
            if len(self._acts_by_shape) >= 2:
                # free the least recently used set before allocating the new one
                self._acts_by_shape.pop(next(iter(self._acts_by_shape)))
            self._acts_by_shape[(B, T)] = self.Activations(self.config, B, T, self.xp, self.storage, self.ops)
        self.acts = self._acts_by_shape.pop((B, T))
        self._acts_by_shape[(B, T)] = self.acts   # most recently used goes last
        return self.acts

    def _begin_forward(self, ids, sync: bool):
        """(checked ids, this (B, T)'s activations)."""
        if sync:
            ids = self._check_ids(ids, "ids")
        B, T = ids.shape
        if T > self.config.block_size:
            raise LlmpyError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        return ids, self._activations(B, T)

    def _logits_and_loss(self, a, ids, head, targets, sync: bool, loss_scale):
        """The end of forward(): logits = lnf @ head^T over all Vp rows of the
        head (the classifier reads the first V columns only, so padded rows
        cannot enter the softmax or the loss), then the loss if targets are
        given. With loss_scale the classifier also writes the logits' gradient
        for the backward(loss_scale) that follows, in the same pass."""
        ops, cfg = self.ops, self.config
        B, T = ids.shape
        N = B * T
        ops.matmul_forward(a.logits, a.lnf, head, None)
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

    def _head_backward(self, loss_scale: float, head: str):
        """The start of backward(): (activations, acc). d(mean loss)/d(loss_n)
        = 1/N; the classifier turns the logits into dlogits (its padded columns
        zero, so the padded rows of the head get no gradient) unless
        forward(loss_scale=...) did already; then dlnf = dlogits @ head into
        a.dC and the head's gradient."""
        a = self.acts
        if not self._have_forward or a is None or a.targets is None:
            raise LlmpyError("backward() needs a forward(ids, targets) with targets first")
        ops, cfg = self.ops, self.config
        if self.grads is None:
            self.grads = FlatTensors(self.parameter_shapes(cfg), self.xp, dtype=self.storage)
        acc = not self._grads_fresh
        N = a.B * a.T
        if a.dlogits_scale is None:
            ops.crossentropy_backward(a.logits, a.lse, a.targets, loss_scale / N, V=cfg.vocab_size)
        elif a.dlogits_scale != loss_scale:
            raise LlmpyError(f"backward(loss_scale={loss_scale}) after forward(loss_scale={a.dlogits_scale})")
        ops.matmul_backward(a.dC, self.grads.views[head], None, a.logits, a.lnf, self.compute_params.views[head],
                            acc=acc)
        return a, acc

    def _end_backward(self):
        self._grads_fresh = False
        self._have_forward = False   # the logits are now dlogits

    # ------------------------------------------------------------------ HF names

    def state_dict(self) -> dict:
        """Parameters as NumPy arrays under the family's Hugging Face names and layouts."""
        return self.to_hf(self.ops.to_host(self.params.flat), self.config)

    def grads_dict(self) -> dict:
        """Gradients as NumPy arrays, same names and layouts as state_dict()."""
        if self.grads is None:
            raise LlmpyError("grads_dict() needs a backward() first")
        return self.to_hf(self.ops.to_host(self.grads.flat), self.config)

    def load_state_dict(self, sd: dict, source: str = "state dict"):
        """Copy Hugging Face-named tensors in (see the family's from_hf)."""
        self.set_params(self.from_hf(sd, self.config, source).flat)
