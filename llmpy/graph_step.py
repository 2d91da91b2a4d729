"""One training step on the GPU that never waits for the host, replayed as a CUDA graph.

A step is ~15 kernel launches per layer plus the optimizer: at d12 that is a
few hundred launches, each costing the CPU several microseconds of Python
and driver work. If the GPU finishes a kernel before the next one is
queued, it idles. A CUDA graph records the whole sequence once and then
replays it with one launch.

Recording ("capture") imposes rules, and this module is where they are met:
- nothing waits for the GPU inside the step: the loss is read after the
  replay, the gradient norm stays on the device and the clipping happens in
  the AdamW kernel (which also skips the update if the norm is not finite);
- kernel arguments are frozen at capture, so everything that changes from
  step to step lives in device buffers the host rewrites before each replay:
  the batch (ids, targets), the encoder backward's sort of the ids (done on
  the CPU here, where the batch comes from), AdamW's learning rate and
  bias corrections;
- nothing is allocated inside the step: the first call runs it eagerly
  (cuBLASLt plans, cuDNN graphs and every scratch buffer are made then),
  the second captures it.

Capture needs cuBLASLt (CuPy's cuBLAS calls cannot be captured); without it,
or if capture fails, every step runs eagerly, the same work in the same
order. Gradient accumulation and several ranks take the plain loop in train.py.
"""
from __future__ import annotations

import math
import sys

import numpy as np


class DeviceStep:
    """step(x, y, lr) -> (loss, grad_norm): zero_grad, forward, backward,
    global norm, clipped AdamW update, on fixed device buffers."""

    def __init__(self, model, optimizer, B: int, T: int, grad_clip: float, capture: bool = True):
        ops, xp = model.ops, model.xp
        self.model, self.optimizer, self.ops = model, optimizer, ops
        self.grad_clip = float(grad_clip) if grad_clip and grad_clip > 0 else 0.0
        self.ids = xp.zeros((B, T), dtype=np.int64)
        self.targets = xp.zeros((B, T), dtype=np.int64)
        self.sorted_ids = xp.zeros(B * T, dtype=np.int64)
        self.order = xp.zeros(B * T, dtype=np.int64)
        self.sumsq = xp.zeros(1, dtype=np.float64)
        cupy = getattr(ops, "cupy", None)       # the CUDA backend's array library
        self.capture = (capture and getattr(ops, "_lt", None) is not None and cupy is not None
                        and hasattr(cupy.cuda, "Graph"))
        self.graph = None
        self.eager_steps = 0
        self.stream = cupy.cuda.Stream(non_blocking=True) if self.capture else None

    def _body(self, capturing=False):
        m = self.model
        m.zero_grad()
        m.forward(self.ids, self.targets, sync=False, loss_scale=1.0)   # the loss and dlogits in one pass
        m.backward(sorted_order=(self.sorted_ids, self.order))
        self.ops.sum_of_squares_into(m.grads.flat, self.sumsq)
        self.optimizer.step(self._lr, sumsq=self.sumsq, max_norm=self.grad_clip, upload=not capturing)

    def _upload(self, x, y):
        vocab = self.model.config.vocab_size
        for what, a in (("ids", x), ("targets", y)):
            if a.shape != self.ids.shape or a.min() < 0 or a.max() >= vocab:
                raise ValueError(f"{what} must be {self.ids.shape} token ids in [0, {vocab})")
        sorted_ids, order = self.ops.host_sort(x)
        for dst, src in ((self.ids, x), (self.targets, y), (self.sorted_ids, sorted_ids), (self.order, order)):
            self.ops._upload(dst, src)

    def __call__(self, x, y, lr):
        """x, y: (B, T) host int arrays (inputs, next tokens); lr: this step's learning rate."""
        import contextlib
        self._lr = lr
        with (self.stream if self.stream is not None else contextlib.nullcontext()):
            self._upload(np.asarray(x), np.asarray(y))
            if self.graph is not None:
                # AdamW's hyperparameters for this step go to its device buffer
                # (what a replay reads); then the recorded step runs.
                self.optimizer.prepare_replay(lr, self.grad_clip)
                self.graph.launch(self.stream)
            elif self.capture and self.eager_steps >= 1:
                self._capture_and_run()
            else:
                self._body()
                self.eager_steps += 1
            # The activations this step wrote (a captured graph writes these same
            # buffers on every replay). Holding them here keeps their memory
            # alive even if the model's cache of activations drops them.
            self.acts = self.model.acts if self.graph is None else self.acts
            losses = self.acts.losses
            loss = float(losses.mean())                # waits for the step
            norm = math.sqrt(float(self.sumsq[0])) if float(self.sumsq[0]) >= 0 else float("nan")
        return loss, norm

    def _capture_and_run(self):
        s = self.stream
        steps_before = self.optimizer.step_count
        try:
            s.begin_capture()
            try:
                self._body(capturing=True)
            finally:
                graph = s.end_capture()
            graph.upload(s) if hasattr(graph, "upload") else None
        except Exception as e:
            # the optimizer's step count may have moved during the attempt: undo, run eagerly from now on
            self.optimizer.step_count = steps_before
            print(f"llmpy: CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                  "running the step without a graph", file=sys.stderr)
            self.capture = False
            self._body()
            return
        # the capture recorded the step without running it: run it now
        self.optimizer.step_count = steps_before
        self.optimizer.prepare_replay(self._lr, self.grad_clip)
        graph.launch(s)
        self.graph = graph
