"""The CPU backend's causal attention, forward + backward, on GPT-2's and
grouped-query (Llama 3) shapes: ms per call pair, median of 15.

    python bench/cpu_attention.py                       # this checkout's ops/cpu.py
    python bench/cpu_attention.py OTHER/llmpy/ops/cpu.py  # and another version's,
                                                          # taking turns, with the ratio

To compare with an earlier commit: `git worktree add /tmp/old REV`, then pass
/tmp/old/llmpy/ops/cpu.py. Run it with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
unset (see bench/cpu_suite.sh).
"""
from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np

import llmpy.ops.cpu as this

# (B, T, NH, NKV, hs): GPT-2 d12 and d6 as the suite runs them, Llama 3.2 1B's
# heads (32 query, 8 key/value), a narrower GQA at a longer context
SHAPES = [(4, 64, 12, 12, 64), (8, 256, 6, 6, 64), (4, 64, 32, 8, 64), (4, 256, 8, 2, 32)]


def load_other(path):
    # another version's cpu.py as a module of this llmpy.ops package (its relative imports resolve here)
    spec = importlib.util.spec_from_file_location("llmpy.ops.cpu_other", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv):
    versions = {"this": this}
    if argv:
        versions["other"] = load_other(argv[0])
    rng = np.random.default_rng(0)
    for B, T, NH, NKV, hs in SHAPES:
        qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
        dout = rng.standard_normal((B, T, NH * hs)).astype(np.float32)
        out, att = np.empty((B, T, NH * hs), np.float32), np.empty((B, NH, T, T), np.float32)
        datt, dqkv = np.empty_like(att), np.empty_like(qkv)

        def run(ops):
            if NKV == NH:
                ops.attention_forward(out, att, qkv, NH)
                ops.attention_backward(dqkv, dout, qkv, att, datt, NH)
            else:
                ops.gqa_attention_forward(out, att, qkv, NH, NKV)
                ops.gqa_attention_backward(dqkv, dout, qkv, att, datt, NH, NKV)
            return dqkv.copy()

        results = {name: run(ops) for name, ops in versions.items()}        # (and the warm-up)
        times = {name: [] for name in versions}
        for i in range(15):
            order = list(versions.items())
            for name, ops in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                run(ops)
                times[name].append(time.perf_counter() - t0)
        ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        line = f"B={B} T={T} NH={NH} NKV={NKV} hs={hs}: this {ms['this']:.2f} ms"
        if "other" in ms:
            diff = np.abs(results["this"] - results["other"]).max() / np.abs(results["other"]).max()
            line += (f", other {ms['other']:.2f} ms, this/other {ms['this'] / ms['other']:.2f}; "
                     f"dqkv max relative difference {diff:.1e}")
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
