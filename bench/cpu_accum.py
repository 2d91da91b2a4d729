"""What a gradient-accumulation micro-step costs on the CPU.

The first micro-step of an optimizer step writes the gradients (acc=False);
every later one adds to them (acc=True). Times zero_grad + n forward/backward
micro-steps for n = 1 and 4, three times, and prints the cost of one added
micro-step beside the first (no AdamW: the difference is the accumulation).

    python bench/cpu_accum.py [MODEL B T]      (default: d12 4 64)
"""
from __future__ import annotations

import sys
import time

from llmpy import bench
from llmpy.config import preset
from llmpy.model import GPT


def main(model="d12", B=4, T=64):
    cfg = preset(model, seq_len=T)
    m = GPT(cfg, device="cpu", seed=0)
    ids = bench.real_text_batch(B, T, cfg.vocab_size)

    def micro_steps(n):
        t = time.perf_counter()
        m.zero_grad()
        for _ in range(n):
            m.forward(ids[:, :-1], ids[:, 1:])
            m.backward()
        return (time.perf_counter() - t) * 1e3

    micro_steps(1)
    micro_steps(2)                                   # warm-up: page faults, the first acc=True pass
    for _ in range(3):
        one, four = micro_steps(1), micro_steps(4)
        print(f"{model} B={B} T={T}: 1 micro-step {one:.0f} ms, 4 micro-steps {four:.0f} ms: "
              f"an added micro-step {(four - one) / 3:.0f} ms")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], int(args[1]), int(args[2])) if args else main()
