"""Tokenization throughput of `llmpy prepare`'s worker pipeline, in tokens/s.

    python bench/tokenize_speed.py [--workers 1 2] [--copies 20]

The corpus is the Python docs (pydoc_data, ~100K tokens) repeated `copies`
times, one document per topic, run through the same batching and worker
processes as prepare (llmpy.data.prepare._encoded). The time includes
starting the workers and building their tokenizers (~1 s each, in parallel),
as a real prepare pays it; a larger --copies makes that share smaller.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import time

from pydoc_data.topics import topics

from llmpy.data import prepare as prep


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its finished children."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def run(workers: int, copies: int) -> tuple[int, float, float, float]:
    """(tokens, wall seconds, main-process CPU seconds, worker CPU seconds)."""
    docs = [(None, topics[name]) for _ in range(copies) for name in sorted(topics)]
    (me0, kids0), t0 = _cpu(), time.perf_counter()
    n = sum(tokens.size for _, tokens in prep._encoded(prep._batches(docs, prep.BATCH_CHARS), workers))
    wall = time.perf_counter() - t0
    me1, kids1 = _cpu()
    return n, wall, me1 - me0, kids1 - kids0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--copies", type=int, default=20)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    for w in args.workers:
        n, dt, main_cpu, worker_cpu = run(w, args.copies)
        # The CPU time says what a worker does when it has a core to itself,
        # which a wall clock on a busy machine does not.
        encode_cpu = main_cpu if w == 1 else worker_cpu
        print(f"workers={w}: {n:,} tokens in {dt:.2f} s = {n / dt / 1e6:.2f} M tokens/s; "
              f"{n / encode_cpu / 1e6:.2f} M tokens per worker CPU-second; "
              f"main process {main_cpu:.2f} CPU-s, workers {worker_cpu:.2f} CPU-s")


if __name__ == "__main__":
    main()
