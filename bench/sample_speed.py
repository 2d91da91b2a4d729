"""Sampling speed with and without the KV cache (CPU, fp32, random weights).

A preset model (GPT-2's vocabulary and block_size 1024), a 16-token prompt,
64 new tokens, greedy decoding (so both paths must produce the same tokens,
which is checked). Each path is warmed up once, then timed RUNS times; every
run is printed (the machine is shared: report all, not the best).

    PYTHONPATH=. python bench/sample_speed.py [--models d2 d4 d12] [--runs 3]

Without the cache every token recomputes the whole context (a fixed window of
prompt + new tokens, 79 positions here); with it, the prompt is run once and
each later token is one position through every layer, attention included.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

import llmpy
from llmpy.sample import generate

PROMPT, NEW = 16, 64


def time_one(model, prompt, use_cache):
    t0 = time.perf_counter()
    out = generate(model, prompt, NEW, temperature=0, stop_at_eot=False, use_cache=use_cache)
    dt = time.perf_counter() - t0
    return out, NEW / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["d2", "d4"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, numpy {np.__version__}")
    for name in args.models:
        model = llmpy.GPT(llmpy.preset(name), seed=0)
        prompt = np.random.default_rng(0).integers(0, 50257, size=PROMPT).tolist()
        ref, _ = time_one(model, prompt, use_cache=False)       # warm-up (allocations, BLAS threads)
        time_one(model, prompt, use_cache=True)
        for run in range(1, args.runs + 1):
            toks_full, full = time_one(model, prompt, use_cache=False)
            toks_cached, cached = time_one(model, prompt, use_cache=True)
            assert toks_full == toks_cached == ref, "cached and full decoding disagree"
            print(json.dumps({"model": name, "run": run, "prompt": PROMPT, "new_tokens": NEW,
                              "no_cache_tok_s": round(full, 1), "kv_cache_tok_s": round(cached, 1),
                              "speedup": round(cached / full, 2)}), flush=True)


if __name__ == "__main__":
    main()
