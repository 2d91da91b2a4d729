"""Where a training step's time goes: the time of every op, per op name.

    with OpTimer(model.ops) as timer:
        ...run some steps...
    print(timer.table())

Every op of the contract that does device work (llmpy/ops/contract.py:
the layers, fused ones included, and each backend's optimizer pieces) is
wrapped on the backend module while the `with` block runs. On the GPU each call is
bracketed by two CUDA events recorded on the current stream: the GPU time
between them is the op's, measured without stopping the stream (the events
are read once, at the end). On the CPU it is the wall clock around the call.
Calls made from inside another op (the CUDA matmul falling back to the GELU
kernel, say) count towards the outer op only. (On the CPU, AdamW's chunks
run on two threads at once: their times add up to more than the wall clock.)

This profiles steps run op by op, not a replayed CUDA graph (a graph is one
launch: nothing to wrap); launch gaps between ops are not attributed to any
op, and show up as the difference between the table's total and the step.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

from .ops import contract

OPS = contract.timed_ops()      # what a backend may have to time (a backend lacking one is skipped)


class OpTimer:
    def __init__(self, ops):
        self.ops = ops
        self.gpu = getattr(ops, "name", "") == "cuda"
        self.records = defaultdict(list)      # op -> [(start, end)] events, or [seconds]
        self._saved = {}
        self._local = threading.local()       # nesting depth, per thread (CPU AdamW runs on two)

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth:
                return fn(*args, **kwargs)
            self._local.depth = 1
            try:
                if self.gpu:
                    import cupy
                    start, end = cupy.cuda.Event(), cupy.cuda.Event()
                    start.record()
                    out = fn(*args, **kwargs)
                    end.record()
                    self.records[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    out = fn(*args, **kwargs)
                    self.records[name].append(time.perf_counter() - t0)
                return out
            finally:
                self._local.depth = 0
        return timed

    def __enter__(self):
        targets = [(self.ops, name, name) for name in OPS]
        if not self.gpu:            # the CPU's AdamW calls the compiled update where numba is installed
            from .ops import cpu_kernels
            targets.append((cpu_kernels, "adamw_update", "adamw_update"))
        for where, attr, name in targets:
            fn = getattr(where, attr, None)
            if fn is not None:
                self._saved[(where, attr)] = fn
                setattr(where, attr, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for (where, attr), fn in self._saved.items():
            setattr(where, attr, fn)
        self._saved.clear()

    def totals(self) -> dict:
        """op -> (calls, milliseconds), slowest first."""
        out = {}
        if self.gpu and self.records:
            import cupy
            cupy.cuda.get_current_stream().synchronize()
        for name, recs in self.records.items():
            if self.gpu:
                import cupy
                ms = sum(cupy.cuda.get_elapsed_time(s, e) for s, e in recs)
            else:
                ms = 1000.0 * sum(recs)
            out[name] = (len(recs), ms)
        return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))

    def table(self, steps: int = 1) -> str:
        """The totals per step as a text table, with each op's share."""
        totals = self.totals()
        whole = sum(ms for _, ms in totals.values()) or 1.0
        lines = [f"{'op':24}{'calls/step':>11}{'ms/step':>10}{'share':>8}"]
        for name, (calls, ms) in totals.items():
            lines.append(f"{name:24}{calls / steps:11.1f}{ms / steps:10.3f}{ms / whole:8.1%}")
        lines.append(f"{'total in ops':24}{'':11}{whole / steps:10.3f}")
        if not self.gpu and "adamw_update" in totals:
            lines.append("(adamw_update runs on every core at once: its ms are the sum over its threads)")
        return "\n".join(lines)
