"""One training step as one object: step(batches, lr, t) -> (loss, grad_norm, applied).

A step takes `accum` micro-batches (x, y), each (B, T) token ids, and:
    zero the gradients
    for each micro-batch:  forward(x, y); backward(loss_scale = 1 / (accum * ranks))
    sum the gradients over the ranks (several processes, see dist.py)
    global gradient norm; if the loss or the norm is not finite, stop here (applied = False)
    clip: scale = min(1, grad_clip / norm), folded into AdamW update number t
The loss returned is the mean over all micro-batches of all ranks. Two
implementations, same arithmetic in the same order:

- HostStep: the loop written out in Python, one op call at a time; any
  backend, one process or several (ZeRO-0 or ZeRO-1). The reference.
- DeviceStep: the same step kept on the GPU and replayed as CUDA graphs
  (one process). Why and how:

  A step is ~15 kernel launches per layer plus the optimizer: at d12 that is a
  few hundred launches, each costing the CPU several microseconds of Python
  and driver work. If the GPU finishes a kernel before the next one is
  queued, it idles. A CUDA graph records the whole sequence once and then
  replays it with one launch.

  Recording ("capture") imposes rules, and DeviceStep is where they are met:
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

  The step runs on a non-blocking stream of its own, which does not wait
  for the legacy null stream, where the model's buffers were zeroed, its
  weights uploaded and cast to bf16: the first step waits for the whole
  device once, and every step's stream waits for the null stream's work
  (an event: evaluations and samples between steps run there).

  The uploads come from pinned host buffers, two sets used in turn
  (runtime.Staging), so the host sorts and copies micro-batch i + 1 while
  the GPU still runs micro-step i.

  Capture needs cuBLASLt (CuPy's cuBLAS calls cannot be captured); without it,
  or if capture fails, every step runs eagerly, the same work in the same
  order. Several ranks take HostStep (the all-reduce sits between the
  backward and the update).

train.py and bench.py both drive a step through this interface; so would a
second model family, which needs only forward / backward / zero_grad and the
flat params / grads buffers.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from .optim import clip_scale, global_norm


def _micro_batches(batches, accum: int) -> list:
    """A list of `accum` (x, y) pairs; one bare pair is accepted when accum is 1."""
    if accum == 1 and len(batches) == 2 and not isinstance(batches[0], tuple):
        batches = [batches]
    if len(batches) != accum:
        raise ValueError(f"{len(batches)} micro-batches for a step of {accum}")
    return batches


class HostStep:
    """step(batches, lr, t) -> (loss, grad_norm, applied), one op call at a time.

    With several ranks (comm.world_size > 1) each rank passes its own
    micro-batches; the gradients are summed over the ranks once per step.
    ZeRO-0 (optimizer.shard is None): all-reduce every gradient, every rank
    updates every parameter identically. ZeRO-1: reduce-scatter (each rank
    gets the sum of its own slice only), each rank updates its slice with the
    AdamW state it alone keeps, then the parameters are all-gathered.
    before_sync(t), if given, runs between the backward passes and the
    gradient sync (tests use it to lose a rank there). accept(loss, norm), if
    given, may veto the update of a step whose loss and norm are finite
    (applied = False: train.Outliers, llm.c's outlier skipping); it sees the
    same numbers on every rank, so the ranks agree."""

    def __init__(self, model, optimizer, comm, accum: int = 1, grad_clip: float = 1.0, before_sync=None,
                 accept=None):
        self.model, self.optimizer, self.comm = model, optimizer, comm
        self.accum, self.grad_clip, self.before_sync, self.accept = int(accum), grad_clip, before_sync, accept

    def __call__(self, batches, lr, t):
        model, comm, world = self.model, self.comm, self.comm.world_size
        model.zero_grad()
        loss = 0.0
        scale = 1.0 / (self.accum * world)      # each micro-batch's share of the step's mean loss
        for x, y in _micro_batches(batches, self.accum):
            # the loss and the logits' gradient in one pass (the classifier's fused op)
            _, micro_loss = model.forward(x, y, loss_scale=scale)
            model.backward(loss_scale=scale)
            loss += micro_loss / self.accum
        if self.before_sync is not None:
            self.before_sync(t)
        if world > 1:
            loss = comm.all_reduce_scalar(loss) / world       # the mean over all ranks
            norm = self._sync_gradients()
        else:
            norm = global_norm(model) if math.isfinite(loss) else float("nan")
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return loss, norm, False
        if self.accept is not None and not self.accept(loss, norm):
            return loss, norm, False
        self.optimizer.step(lr, t, grad_scale=clip_scale(norm, self.grad_clip))
        if self.optimizer.shard is not None:
            # every rank's updated slice to every rank: of what the ops read, the
            # weights themselves in fp32, the bf16 copy in bf16. The bf16 run's
            # fp32 master slices stay with their owners (half the bytes each
            # step); checkpoint.save_training_checkpoint gathers them.
            comm.all_gather(model.compute_params.flat)
        return loss, norm, True

    def _sync_gradients(self) -> float:
        """Sum the gradients over the ranks (each rank's are already scaled by
        1 / (accum * world), so the sum is the mean); returns the global norm.
        ZeRO-1: the norm is the square root of the all-reduced sums of squares
        of the slices."""
        model, comm = self.model, self.comm
        g = model.grads.flat
        if self.optimizer.shard is None:
            comm.all_reduce(g)
            return global_norm(model)
        comm.reduce_scatter(g)
        lo, hi = self.optimizer.shard
        return math.sqrt(comm.all_reduce_scalar(float(model.ops.sum_of_squares(g[lo:hi]))))


def check_fits(model, B: int, T: int):
    """Refuse, in one line, a (B, T) whose training buffers alone
    (model.memory_estimate: a lower bound; with flash attention's smaller
    activations for bf16 on a GPU) are larger than the memory they go in:
    the GPU's, or on the CPU this machine's (machine_memory), naming the
    largest halving of B that fits in 90% of it; nothing is said where that
    memory is unknown. On the CPU the fp32 count (activations and gradients
    are float32 there in either --dtype) is what a process of one rank needs:
    train.py asks before anything is written, so a run too large for the
    machine ends in this line, not in the kernel's out-of-memory kill."""
    runtime = getattr(model.ops, "runtime", None)          # the GPU backend's; the CPU's ops have none
    total = machine_memory() if runtime is None else runtime.device_memory()
    if total is None:
        return
    from .errors import LlmpyError

    def need(b):   # the model family's own count (GPT-2's or Llama's buffers)
        if runtime is None:
            return model.memory_estimate(model.config, b, T, "fp32", flash=False, device="cpu")["total"]
        return model.memory_estimate(model.config, b, T, model.dtype, flash=model.dtype != "fp32")["total"]
    if need(B) <= total:
        return
    fits = B
    while fits > 1 and need(fits) > 0.9 * total:
        fits //= 2
    gib = 2 ** 30
    hint = (f"-B {fits} needs ~{need(fits) / gib:.1f} GiB (gradient accumulation keeps the tokens per step: "
            f"--total-batch-size)" if need(fits) <= 0.9 * total else "even -B 1 does not fit: a smaller model")
    where = "this machine has" if runtime is None else "the GPU has"
    raise LlmpyError(f"-B {B} -T {T} --dtype {model.dtype}: the step's buffers need ~{need(B) / gib:.1f} GiB "
                     f"(model.memory_estimate), {where} {total / gib:.1f} GiB; {hint}")


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's RAM, or the
    container's limit where a cgroup (v2) sets a smaller one; None where
    neither can be read."""
    import os
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


class DeviceStep:
    """step(batches, lr, t) -> (loss, grad_norm, applied): one optimizer step over
    `accum` micro-batches (zero_grad, forward + backward each, global norm,
    clipped AdamW), on fixed device buffers, in three recorded pieces: the
    first micro-step (gradients written), the others (gradients added), and
    the update. Nothing waits for the GPU until the loss is read at the end,
    so the host prepares micro-batch i + 1 (its sort, its upload) while the
    GPU runs micro-step i."""

    def __init__(self, model, optimizer, B: int, T: int, grad_clip: float, accum: int = 1,
                 capture: bool = True):
        ops, xp = model.ops, model.xp
        self.model, self.optimizer, self.ops = model, optimizer, ops
        check_fits(model, B, T)
        self.accum = int(accum)
        self.grad_clip = float(grad_clip) if grad_clip and grad_clip > 0 else 0.0
        self.ids = xp.zeros((B, T), dtype=np.int64)
        self.targets = xp.zeros((B, T), dtype=np.int64)
        self.sorted_ids = xp.zeros(B * T, dtype=np.int64)
        self.order = xp.zeros(B * T, dtype=np.int64)
        self.staging = ops.runtime.Staging({"ids": ((B, T), np.int64), "targets": ((B, T), np.int64),
                                            "sorted_ids": ((B * T,), np.int64), "order": ((B * T,), np.int64)})
        self.sumsq = xp.zeros(1, dtype=np.float64)          # the gradients' sum of squares
        self.loss = xp.zeros(1, dtype=np.float64)           # the step's mean loss, summed on the device
        cupy = getattr(ops, "cupy", None)                   # the CUDA backend's array library
        self.capture = (capture and getattr(ops, "capturable", False) and cupy is not None
                        and hasattr(cupy.cuda, "Graph"))
        self.stream = cupy.cuda.Stream(non_blocking=True) if self.capture else None
        self.graphs = {}           # "first" / "rest" / "update" -> captured graph
        self.eager_runs = {}       # piece -> times run eagerly (capture comes after one)
        self.steps = 0             # calls so far

    @property
    def graph(self):
        """The update's graph once captured (None while steps run eagerly)."""
        return self.graphs.get("update")

    # ------------------------------------------------------------ the pieces

    def _micro(self, first: bool):
        m, s = self.model, 1.0 / self.accum
        if first:
            m.zero_grad()
        m.forward(self.ids, self.targets, sync=False, loss_scale=s)   # the loss and dlogits in one pass
        # The activations the micro-steps write (a captured graph writes these
        # same buffers on every replay). Holding them keeps their memory alive
        # even if the model's cache of activations drops them.
        self.acts = m.acts
        m.backward(loss_scale=s, sorted_order=(self.sorted_ids, self.order))
        losses = m.acts.losses
        self.ops.accumulate_sum(self.loss, losses, s / losses.size, first)

    def _update(self, capturing: bool = False):
        self.ops.sum_of_squares_into(self.model.grads.flat, self.sumsq)
        self.optimizer.step(self._lr, self._t, sumsq=self.sumsq, max_norm=self.grad_clip, upload=not capturing)

    def _run(self, name, piece):
        """Run one piece: replay its graph, or capture it (after one eager
        run: plans, scratch buffers and cuDNN graphs get made then) and run
        that, or run it eagerly."""
        is_update = name == "update"
        graph = self.graphs.get(name)
        if graph is None and self.capture and self.eager_runs.get(name, 0) >= 1:
            graph = self._capture(name, piece)
        if graph is None:
            piece()
            self.eager_runs[name] = self.eager_runs.get(name, 0) + 1
            return
        if is_update:
            # AdamW's hyperparameters for this step go where the recorded kernel reads them
            self.optimizer.prepare_replay(self._lr, self._t, self.grad_clip)
        graph.launch(self.stream)

    def _capture(self, name, piece):
        s = self.stream
        try:
            s.begin_capture()
            try:
                piece(capturing=True) if name == "update" else piece()
            finally:
                graph = s.end_capture()
            if hasattr(graph, "upload"):
                graph.upload(s)
        except Exception as e:
            print(f"llmpy: CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                  "running the step without graphs", file=sys.stderr)
            graph = None
            self.capture = False
        if graph is not None:
            self.graphs[name] = graph
        return graph

    # ------------------------------------------------------------ a step

    def _upload(self, x, y):
        vocab = self.model.config.vocab_size
        for what, a in (("ids", x), ("targets", y)):
            if a.shape != self.ids.shape or a.min() < 0 or a.max() >= vocab:
                raise ValueError(f"{what} must be {self.ids.shape} token ids in [0, {vocab})")
        host = self.staging.next()                 # pinned, and no copy of it still in flight
        host["ids"][...], host["targets"][...] = x, y
        host["sorted_ids"][...], host["order"][...] = self.ops.host_sort(x)
        # in order on the stream: after the previous micro-step has read these buffers
        self.staging.upload([(self.ids, "ids"), (self.targets, "targets"), (self.sorted_ids, "sorted_ids"),
                             (self.order, "order")])

    def _wait_for_null_stream(self):
        """The step's stream waits for what was queued on the legacy null
        stream (the first time: the host waits for the whole device)."""
        if self.steps == 0:
            self.ops.runtime.synchronize_device()
        if self.stream is not None:
            null = self.ops.cupy.cuda.Stream.null
            self.stream.wait_event(null.record())

    def __call__(self, batches, lr, t):
        """batches: `accum` (x, y) pairs of (B, T) host int arrays (inputs,
        next tokens), or one pair when accum is 1; lr: this step's learning
        rate; t: the update's number (1, 2, ...). applied is False when the
        norm was not finite and the kernel skipped the update."""
        import contextlib
        batches = _micro_batches(batches, self.accum)
        self._lr, self._t = lr, t
        self._wait_for_null_stream()
        self.steps += 1
        with (self.stream if self.stream is not None else contextlib.nullcontext()):
            for i, (x, y) in enumerate(batches):
                self._upload(np.asarray(x), np.asarray(y))
                first = i == 0
                self._run("first" if first else "rest", lambda f=first: self._micro(f))
            self._run("update", self._update)
            loss = float(self.loss[0])                    # waits for the step
            sumsq = float(self.sumsq[0])
        norm = math.sqrt(sumsq) if sumsq >= 0 else float("nan")
        return loss, norm, math.isfinite(norm)
