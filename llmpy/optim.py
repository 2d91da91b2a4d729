"""AdamW over the flat parameter buffer, learning-rate schedules, gradient clipping.

AdamW makes about ten passes over every parameter. Done naively on 124M
floats each pass streams 500 MB through memory; done in chunks that fit in the
cache, all ten passes over a chunk run from cache and memory is touched
once. The chunks are shared between two threads (NumPy releases the GIL).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import LlmpyError

CHUNK = 1 << 17          # 128K floats = 512 KB per array (measured best: fewer Python calls, still cache-resident)


class AdamW:
    """AdamW (decoupled weight decay, as torch.optim.AdamW) on a model's flat buffers.
    Weight decay applies to the tensors the model names in model.decayed
    (GPT-2: the 2-D weight matrices).

    shard=(start, stop) updates only that slice of the flat buffer and keeps m
    and v for it alone (ZeRO stage 1: each rank owns one slice, see dist.py);
    m[i] and v[i] then belong to parameter start + i. The decay segments are
    cut at the slice's ends, so a slice that starts inside a weight matrix
    still decays exactly the values it would decay unsharded."""

    def __init__(self, model, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, threads=None, shard=None):
        self.model = model
        self.ops = model.ops
        self.beta1, self.beta2, self.eps, self.weight_decay = betas[0], betas[1], eps, weight_decay
        n = model.params.flat.size
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        lo, hi = (0, n) if shard is None else self.shard
        if not 0 <= lo <= hi <= n:
            raise LlmpyError(f"AdamW: shard {shard} is not a slice of the {n} parameters")
        self.offset = lo                 # m[i], v[i] belong to parameter offset + i
        xp = model.xp
        self.m = xp.zeros(hi - lo, dtype=np.float32)
        self.v = xp.zeros(hi - lo, dtype=np.float32)
        # contiguous runs of the (owned part of the) flat buffer with the same decay setting
        self.segments = []
        for name, start, stop in model.params.segments():
            start, stop = max(start, lo), min(stop, hi)
            if start >= stop:
                continue
            decay = name in model.decayed
            if self.segments and self.segments[-1][2] == decay and self.segments[-1][1] == start:
                self.segments[-1] = (self.segments[-1][0], stop, decay)
            else:
                self.segments.append((start, stop, decay))
        # work items: (start, stop, decay) chunks, split over the threads
        self.chunks = [(s, min(s + CHUNK, stop), d)
                       for start, stop, d in self.segments for s in range(start, stop, CHUNK)]
        if threads is None:
            from .ops.cpu_parallel import blas_threads      # as many as NumPy's BLAS uses
            threads = blas_threads()
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 and xp is np else None
        self._scratch = [np.empty((2, CHUNK), dtype=np.float32) for _ in range(self.threads)]
        self.compiled = True     # the CPU update through numba where it is installed; False: the NumPy reference

    def step(self, lr: float, t: int, grad_scale: float = 1.0, sumsq=None, max_norm: float = -1.0,
             upload: bool = True):
        """Update number t (1, 2, ...: it sets Adam's bias corrections
        1 - beta^t) of model.params from grad_scale * model.grads, in place,
        with learning rate lr. (Gradient clipping passes its factor here
        instead of rescaling the gradients in a separate pass over memory.)

        GPU only: sumsq, a device array holding the gradients' sum of squares,
        with max_norm >= 0 moves the clipping into the update kernel (and
        skips the update if the norm is not finite), so that the step never
        waits for the norm on the host; upload=False while a CUDA graph is
        being captured (prepare_replay then supplies the values per step;
        see step.DeviceStep)."""
        if self.model.grads is None:
            raise LlmpyError("AdamW.step() needs gradients: call model.backward() first")
        if t < 1:
            raise ValueError(f"AdamW.step: t counts updates from 1, got {t}")
        p, g = self.model.params.flat, self.model.grads.flat
        ops, o = self.ops, self.offset

        if hasattr(ops, "adamw_step_flat"):
            # GPU backend: one fused kernel over the whole owned slice (no
            # cache to chunk for); segments relative to the slice say where to decay.
            hi = o + self.m.shape[0]
            if hi > o:
                segments = [(s - o, e - o, d) for s, e, d in self.segments]
                # bf16 training: the kernel also rewrites the bf16 weights the
                # forward pass reads (model.compute_params) from the new fp32 ones
                copy = self.model.compute_params.flat
                ops.adamw_step_flat(p[o:hi], g[o:hi], self.m, self.v, segments, lr, self.beta1, self.beta2,
                                    self.eps, self.weight_decay, t, grad_scale,
                                    param_copy=None if copy is p else copy[o:hi], sumsq=sumsq, max_norm=max_norm,
                                    upload_hyper=upload)
            return
        if sumsq is not None:
            raise LlmpyError("AdamW.step(sumsq=...) is for the GPU backend")

        # bf16 on the CPU: each updated chunk is rounded into the bf16 copy the
        # ops read while it is still in cache
        copy = None if self.model.compute_params is self.model.params else self.model.compute_params.flat
        from .ops import cpu_kernels     # (numba's import takes ~0.3 s: only when a CPU step runs)
        compiled = cpu_kernels.available and self.compiled

        def work(i):
            scratch = self._scratch[i]
            for s, e, decay in self.chunks[i::self.threads]:
                args = (p[s:e], g[s:e], self.m[s - o:e - o], self.v[s - o:e - o], lr, self.beta1, self.beta2,
                        self.eps, self.weight_decay if decay else 0.0, t, scratch, grad_scale)
                if compiled:        # the same arithmetic in one pass (ops/cpu_kernels.py)
                    cpu_kernels.adamw_update(*args, copy=None if copy is None else copy[s:e])
                    continue
                ops.adamw_update(*args)
                if copy is not None:
                    ops.cast(copy[s:e], p[s:e])

        if self._pool is None:
            work(0)
        else:
            list(self._pool.map(work, range(self.threads)))

    def prepare_replay(self, lr: float, t: int, max_norm: float):
        """Write update t's hyperparameters where a captured AdamW kernel
        reads them (GPU; see step.DeviceStep)."""
        self.ops.adamw_hyper(lr, self.beta1, self.beta2, self.eps, self.weight_decay, t, 1.0, max_norm)

    def state_dict(self):
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, d):
        self.m[:] = d["m"]
        self.v[:] = d["v"]


def global_norm(model) -> float:
    """sqrt(sum of squares of every gradient)."""
    return math.sqrt(model.ops.sum_of_squares(model.grads.flat))


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that brings a gradient of global norm `norm` down to at most
    max_norm (1.0 when it is already within, or when clipping is off)."""
    if max_norm and max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return 1.0


def lr_at(step: int, max_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr_frac: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for the 0-based optimizer step (schedules: config.LR_SCHEDULES).

    All start with a linear warmup over warmup_steps, then:
      cosine    min_lr + (max_lr - min_lr) (1 + cos(pi f)) / 2, f = 0 -> 1 over the remaining steps
      linear    max_lr - (max_lr - min_lr) f
      constant  max_lr
      wsd       warmup-stable-decay: max_lr until the last decay_frac of the steps, then
                min_lr + (max_lr - min_lr) (1 - sqrt(g)), g = 0 -> 1 over those steps
                (the 1 - sqrt cooldown of Haegele et al. 2024, as llm.c's wsd scheduler)
    with min_lr = min_lr_frac * max_lr reached at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    min_lr = max_lr * min_lr_frac
    if schedule == "wsd":
        decay_start = max(warmup_steps, total_steps - max(1, round(decay_frac * total_steps)))
        if step < decay_start:
            return max_lr
        g = min(1.0, (step - decay_start) / max(1, total_steps - 1 - decay_start))
        return min_lr + (max_lr - min_lr) * (1.0 - math.sqrt(g))
    span = max(1, total_steps - warmup_steps - 1)
    frac = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return max_lr - (max_lr - min_lr) * frac
    raise ValueError(f"unknown lr schedule {schedule!r}")      # TrainConfig.check() names the choices
