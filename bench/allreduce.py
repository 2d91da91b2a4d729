"""All-reduce bandwidth of llmpy's MPI communicator (CPU ranks).

    mpirun -np 2 python bench/allreduce.py [--floats 124000000] [--reps 5]

Reports, like nccl-tests, the algorithm bandwidth (bytes / time) and the bus
bandwidth: a ring all-reduce moves 2 (n - 1) / n of the buffer through every
rank's link, so busbw = algbw * 2 (n - 1) / n is comparable across rank counts.
Also times reduce-scatter + all-gather (ZeRO-1's pair).
"""
import argparse
import time

import numpy as np

from llmpy.dist import MPIComm

ap = argparse.ArgumentParser()
ap.add_argument("--floats", type=int, default=124_000_000)   # ~ GPT-2 124M's gradients
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()
comm = MPIComm(timeout=0)
world = comm.world_size
buf = np.ones(args.floats, dtype=np.float32)
nbytes = buf.nbytes


def timed(fn):
    comm.all_reduce(buf[:1024])         # warm-up and line the ranks up
    comm.barrier()
    best = float("inf")
    for _ in range(args.reps):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


t_ar = timed(lambda: comm.all_reduce(buf))
t_rsag = timed(lambda: (comm.reduce_scatter(buf), comm.all_gather(buf)))
if comm.rank == 0:
    bus = 2 * (world - 1) / world
    for name, t in (("all-reduce", t_ar), ("reduce-scatter + all-gather", t_rsag)):
        print(f"{name}: {args.floats:,} float32 ({nbytes / 1e6:.0f} MB) on {world} ranks: best {t * 1000:.1f} ms, "
              f"algbw {nbytes / t / 1e9:.2f} GB/s, busbw {nbytes / t * bus / 1e9:.2f} GB/s")
