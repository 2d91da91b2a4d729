"""Would the gradient norm be cheaper computed inside the backward pass?

The CPU step sums the squares of all gradients in one pass after the
backward (optim.global_norm: 124M floats at d12, from memory). The
alternative measured here: each weight gradient's sum of squares right
after the matmul_backward that wrote it, while it may still be in cache
(the matmuls' weights are 99% of GPT-2's parameters). Prints the backward
pass plus the one full pass, against the backward with the sums inside,
three times (median of 5 each).

    python bench/cpu_norm_in_backward.py        (d12, B=4, T=64)
"""
from __future__ import annotations

import time

import numpy as np

from llmpy import bench
from llmpy.config import preset
from llmpy.model import GPT
from llmpy.ops import cpu


def main():
    cfg = preset("d12", seq_len=64)
    model = GPT(cfg, device="cpu", seed=0)
    ids = bench.real_text_batch(4, 64, cfg.vocab_size)
    matmul_backward = cpu.matmul_backward

    def with_sum(dinp, dweight, dbias, dout, inp, weight, acc=True, **kw):
        matmul_backward(dinp, dweight, dbias, dout, inp, weight, acc=acc, **kw)
        cpu.sum_of_squares(dweight)

    def backward_ms(inside: bool) -> float:
        cpu.matmul_backward = with_sum if inside else matmul_backward
        try:
            times = []
            for _ in range(6):
                model.zero_grad()
                model.forward(ids[:, :-1], ids[:, 1:])
                t = time.perf_counter()
                model.backward()
                if not inside:
                    cpu.sum_of_squares(model.grads.flat)
                times.append(time.perf_counter() - t)
            return float(np.median(times[1:])) * 1e3
        finally:
            cpu.matmul_backward = matmul_backward

    for _ in range(3):
        print(f"backward + one pass over all gradients {backward_ms(False):.1f} ms | "
              f"backward with each weight gradient's sum inside {backward_ms(True):.1f} ms")


if __name__ == "__main__":
    main()
