"""`llmpy bench`: time one full training step (forward, backward, AdamW).

Protocol (bench/RESULTS.md says how results are recorded): build the model, warm up for 2 steps, time at
least 5 more and take the median. With `--compare torch`, time a PyTorch
reference model of the same shapes in the same run (llmpy.bench_torch; eager
on the CPU, torch.compile on CUDA unless --no-compile). PyTorch is imported
here only when asked for: it is the yardstick, never part of llmpy.

CPU: also measure the machine's single-precision matmul rate (a 2048^3 sgemm
through the same BLAS, best of 5, before and again after the timed steps:
the better of the two) and report
  floor_share = (matmul FLOPs of one step / sgemm rate) / step time,
the fraction of the step the unavoidable matrix multiplies would take at the
machine's best matmul speed; ratio = llmpy ms / torch ms.

The batch is real text (real_text_batch): windows of the Python docs'
tokens, not uniformly random ids. The encoder backward's scatter-add costs
what the most frequent id costs (GPT-2's token 220, a space, is ~17% of
every batch of the docs, ~11,000 of 65,536 positions), which uniform ids
(~1.3 repeats per id) would never show.

CUDA: kernels are asynchronous, so every timed step ends with a device
synchronize. Report MFU (model FLOPs utilisation, see flops_per_token) against
a matmul peak MEASURED in the same run (peak_how says how), peak memory in MiB,
and speedup_vs_torch = llmpy tokens/s / torch tokens/s. The peak is a bf16
matmul for --dtype bf16; for fp32 it is torch's fp32 matmul with TF32 tensor
cores on (the torch reference's setting) when torch is compared, else CuPy's
true-fp32 matmul (llmpy's own fp32 GEMMs use no TF32): compare MFUs only
between results with the same peak_how.
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import numpy as np

from .config import GPTConfig, preset
from .errors import LlmpyError


def matmul_flops(cfg: GPTConfig, B: int, T: int) -> float:
    """FLOPs in the matmuls of one training step (forward + backward = 3x forward)."""
    N, C, L, V = B * T, cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_layer = 2 * N * 12 * C * C + 4 * B * T * T * C     # qkv, attproj, fc, fcproj; q k^T and att v
    forward = L * per_layer + 2 * N * C * V                 # + the LM head
    return 3.0 * forward


def n_params_for_flops(cfg: GPTConfig) -> int:
    """Parameters of GPT-2 except the position embeddings (wpe): every weight
    and bias of the blocks, the final layernorm, and the tied token embedding
    counted once, as the LM head matmul (the embedding lookup itself does no
    FLOPs). Over the real vocabulary (cfg.vocab_size, not llmpy's padded one)."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    # per block: ln_1, ln_2 (2C each); qkv (3C^2+3C); attn proj (C^2+C); fc (4C^2+4C); mlp proj (4C^2+C)
    per_block = 12 * C * C + 13 * C
    return V * C + L * per_block + 2 * C


def flops_per_token(cfg: GPTConfig, T: int) -> float:
    """Training FLOPs per token, the PaLM formula (Chowdhery et al. 2022, app. B):
    6N for the parameter matmuls (2 forward + 4 backward per parameter), plus
    12*L*T*C for attention's q k^T and att v (2 matmuls * 2 FLOPs * T*C, times
    3 for forward + backward; causal masking is not discounted). N is
    n_params_for_flops(cfg)."""
    return 6.0 * n_params_for_flops(cfg) + 12.0 * cfg.n_layer * T * cfg.n_embd


def sgemm_gflops(n: int = 2048, reps: int = 5, dtype: str = "fp32", backend: bool = True) -> float:
    """The CPU's matmul rate now, n^3, best of reps. fp32: the faster of
    NumPy's sgemm and the backend's own GEMM (ops.cpu._gemm: Intel MKL's
    sgemm where it is the BLAS), so the floor is what the best library here
    does (backend=False: NumPy's alone, for a process that must not load MKL,
    see bench()); bf16: MKL's bf16 GEMM as ops.cpu_bf16 runs it (a row block per core)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    if dtype == "bf16":
        from .ops import cpu_bf16
        a16, b16 = a.astype(cpu_bf16.BF16), b.astype(cpu_bf16.BF16)

        def backend():      # the backend's own op: c = a16 @ b16^T, bf16 inputs as they are (no rounding pass)
            cpu_bf16.matmul_forward(c, a16, b16, None)
        return _best_gflops(backend, n, reps)
    from .ops import cpu
    rates = []
    if backend and cpu._mkl_module() is not None:
        # first: once OpenBLAS's threads have run in a process, the pool's
        # two threads can share one core (bench/RESULTS.md, 2026-12-03)
        rates.append(_best_gflops(lambda: cpu.matmul_forward(c, a, b, None), n, reps))
    rates.append(_best_gflops(lambda: np.matmul(a, b, out=c), n, reps))
    return max(rates)


def _best_gflops(matmul, n, reps):
    matmul()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def _best_matmul_tflops(matmul, a, b, c, sync, reps=5, inner=10):
    """Best of `reps` timings of `inner` back-to-back matmul(a, b, out=c) of
    square n x n arrays (after one warm-up), each timing ended by a synchronize."""
    n = a.shape[0]
    matmul(a, b, out=c)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            matmul(a, b, out=c)
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / min(times) / 1e12


def torch_matmul_tflops(dtype: str, n: int = 8192):
    """Dense n^3 matmul rate of the GPU through torch: bf16, or fp32 with TF32
    tensor cores on (what the fp32 torch reference uses)."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device="cuda", dtype=tdt) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=tdt)
    tflops = _best_matmul_tflops(torch.matmul, a, b, c, torch.cuda.synchronize)
    del a, b, c
    torch.cuda.empty_cache()
    return tflops, f"torch {tdt} {n}^3 matmul" + (" (TF32 on)" if dtype == "fp32" else "")


def cupy_matmul_tflops(dtype: str, n: int = 8192):
    """Dense n^3 matmul rate of the GPU through CuPy: float32 (true fp32 unless
    CUPY_TF32=1, like llmpy's own GEMMs), or bfloat16 where this CuPy takes
    ml_dtypes' bfloat16; (None, why) where it does not."""
    import cupy
    try:
        if dtype == "bf16":
            import ml_dtypes
            dt = np.dtype(ml_dtypes.bfloat16)
        else:
            dt = np.dtype(np.float32)
        a, b = (cupy.random.standard_normal((n, n), dtype=cupy.float32).astype(dt) for _ in range(2))
        c = cupy.empty((n, n), dtype=dt)
        tflops = _best_matmul_tflops(cupy.matmul, a, b, c, cupy.cuda.get_current_stream().synchronize)
    except Exception as e:  # no bf16 support in this CuPy
        return None, f"cupy {dtype} matmul unavailable ({type(e).__name__})"
    del a, b, c
    cupy.get_default_memory_pool().free_all_blocks()
    return tflops, f"cupy {dt} {n}^3 matmul"


_pydoc_tokens = None            # the docs' training tokens, tokenized once per process


def real_text_batch(B: int, T: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """(B, T + 1) token ids: B windows of T + 1 consecutive tokens at random
    (seeded) offsets of the Python docs' training shard (125K GPT-2 tokens,
    made by llmpy.data.prepare.prepare_pydoc in a temporary directory: about
    a second, once per process). Ids >= vocab_size (a model with a smaller
    vocabulary) are folded into it, modulo."""
    global _pydoc_tokens
    if _pydoc_tokens is None:
        import contextlib
        import io
        import tempfile
        from .data.prepare import prepare_pydoc
        from .data.shards import read_shard
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):  # --json: one line
            _pydoc_tokens = read_shard(prepare_pydoc(d)["train"]).astype(np.int64)
    tokens = _pydoc_tokens
    starts = np.random.default_rng(seed).integers(0, max(1, tokens.size - T), B)
    return tokens[starts[:, None] + np.arange(T + 1)] % vocab_size


def _time_steps(step, warmup: int, steps: int, sync=None) -> list[float]:
    """Seconds per step; sync (if given) runs inside the timing after each step,
    so a GPU step is counted until its last kernel finishes."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        step()
        sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _out_of_memory(e, who, B, T):
    # cupy.cuda.memory.OutOfMemoryError and torch.OutOfMemoryError share the name
    if type(e).__name__ == "OutOfMemoryError":
        raise LlmpyError(f"{who} ran out of GPU memory at B={B} T={T}; try a smaller -B "
                         "(or --only torch for the reference alone)") from None


def bench_llmpy(cfg, device, B, T, steps, dtype="fp32", graphs=True, profile=False):
    """(seconds per step, peak pool MiB or None, extra facts). The step is
    train.py's (step.py): HostStep on the CPU; on cuda DeviceStep, replayed
    as a CUDA graph unless graphs=False. profile=True then times a few more
    HostSteps op by op (profile.OpTimer) and returns the table in
    extra["profile"]."""
    from .dist import SingleProcess
    from .model import GPT
    from .optim import AdamW
    from .step import DeviceStep, HostStep, check_fits
    model = GPT(cfg, device=device, seed=0, dtype=dtype)
    opt = AdamW(model, weight_decay=0.1)
    ids = real_text_batch(B, T, cfg.vocab_size)
    x, y = ids[:, :-1], ids[:, 1:]
    # CuPy's pool only grows (cached blocks are reused, not returned), so its
    # size after each step is the peak so far.
    pool = model.xp.get_default_memory_pool() if device == "cuda" else None
    peak = [0]
    extra = {}
    t = [0]                                      # AdamW's update number

    def timed(train_step):
        def step():
            t[0] += 1
            train_step((x, y), 1e-4, t[0])       # returns once the step is done (it reads the loss)
            if pool is not None:
                peak[0] = max(peak[0], pool.total_bytes())
        return step

    if device == "cpu":
        check_fits(model, B, T)                 # (DeviceStep asks on a GPU)
    host_step = HostStep(model, opt, SingleProcess(), grad_clip=1.0)
    if device == "cuda":
        device_step = DeviceStep(model, opt, B, T, grad_clip=1.0, capture=graphs)
        times = _time_steps(timed(device_step), 2, steps, None)
        extra["cuda_graph"] = device_step.graph is not None
        extra["matmuls"] = model.ops.matmul_library
        # what attention kept: (L, B, NH, T) row logsumexps = cuDNN flash attention,
        # (L, B, NH, T, T) probabilities = our batched-GEMM path
        extra["attention"] = ("cudnn flash attention" if model.acts.att.ndim == 4
                              else model.ops.attention_library)
        from .model import memory_estimate          # what the buffers alone should take, to compare with peak_mib
        est = memory_estimate(cfg, B, T, dtype, flash=model.acts.att.ndim == 4)
        extra["estimate_mib"] = round(est["total"] / 2**20, 1)
    else:
        times = _time_steps(timed(host_step), 2, steps, None)
    if profile:
        from .profile import OpTimer
        with OpTimer(model.ops) as timer:
            for _ in range(3):
                timed(host_step)()
        extra["profile"] = timer.table(steps=3)
        extra["profile_ms"] = {k: round(ms / 3, 3) for k, (_, ms) in timer.totals().items()}
    return times, (round(peak[0] / 2**20, 1) if pool is not None else None), extra


def bench_torch(cfg, B, T, steps, threads, device="cpu", dtype="fp32", compile=False):
    """(seconds per step, peak allocated MiB or None)."""
    import torch
    from .bench_torch import torch_step
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls on TF32 tensor cores, as usual in training
        torch.cuda.reset_peak_memory_stats()
    step, _ = torch_step(cfg, B, T, device, dtype, compile)
    sync = torch.cuda.synchronize if device == "cuda" else None
    times = _time_steps(step, 2, steps, sync)
    if device != "cuda":
        return times, None
    return times, round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _mkl_loaded() -> bool:
    from .ops import mkl
    return mkl._lib is not None


def _llmpy_supports(dtype, device):
    """Raise LlmpyError now, before minutes of measuring, if llmpy cannot run `dtype` on `device`."""
    from .ops import get_backend
    get_backend(device, dtype).storage_dtype(dtype)    # the backend's own one-line refusal, if any


def bench(device="cpu", model="d12", B=4, T=64, steps=7, compare=None, dtype="fp32", only=None,
          compile=None, graphs=True, profile=False) -> dict:
    """Run the benchmark; returns the result dict (`llmpy bench --json` prints it).

    only="torch" times the PyTorch reference alone (implies compare="torch").
    compile: torch.compile the reference; None = on for cuda, off for cpu."""
    from .ops.cpu_parallel import blas_threads
    cfg = preset(model, T)
    steps = max(5, steps)
    if only == "torch":
        compare = "torch"
    if compile is None:
        compile = device == "cuda"
    run_llmpy = only != "torch"
    if run_llmpy:
        _llmpy_supports(dtype, device)
    threads = blas_threads()
    res = {"device": device, "model": model, "B": B, "T": T, "dtype": dtype, "threads": threads, "steps": steps}
    flops = matmul_flops(cfg, B, T)
    res["matmul_gflop_per_step"] = round(flops / 1e9, 2)
    if device == "cpu":
        res["sgemm_gflops"] = round(sgemm_gflops(backend=run_llmpy), 1)
        floor_ms = flops / (res["sgemm_gflops"] * 1e9) * 1000
        res["floor_ms"] = round(floor_ms, 1)
    else:
        # the MFU denominator, measured now on this GPU
        peak, how = torch_matmul_tflops(dtype) if compare == "torch" else cupy_matmul_tflops(dtype)
        res.update(flops_per_token=flops_per_token(cfg, T),
                   peak_tflops=None if peak is None else round(peak, 1), peak_how=how)

    def mfu(tokens_per_s):
        # achieved model FLOP/s over the measured peak
        if res.get("peak_tflops") is None:
            return None
        return round(tokens_per_s * res["flops_per_token"] / (res["peak_tflops"] * 1e12), 4)

    if run_llmpy:
        try:
            times, peak_mib, extra = bench_llmpy(cfg, device, B, T, steps, dtype, graphs, profile)
            res.update(extra)
        except Exception as e:
            _out_of_memory(e, "llmpy", B, T)
            raise
        ms = statistics.median(times) * 1000
        res.update(ms_per_step=round(ms, 1), tokens_per_s=round(B * T / (ms / 1000), 1))
        if device == "cpu":
            # the rate again after the steps, the better of the two kept: a
            # neighbour's burst during one measurement must not lower the
            # floor (and inflate the share)
            res["sgemm_gflops"] = round(max(res["sgemm_gflops"], sgemm_gflops(backend=run_llmpy)), 1)
            floor_ms = flops / (res["sgemm_gflops"] * 1e9) * 1000
            res["floor_ms"] = round(floor_ms, 1)
            res["floor_share"] = round(floor_ms / ms, 3)
        else:
            res.update(mfu=mfu(res["tokens_per_s"]), peak_mib=peak_mib)
            import cupy
            gc.collect()                                        # llmpy's model is garbage now:
            cupy.get_default_memory_pool().free_all_blocks()   # hand its GPU memory back before torch
    if compare == "torch" and device == "cpu" and run_llmpy and _mkl_loaded() and not compile:
        # PyTorch imported into a process that holds MKL's libraries binds
        # its own MKL and thread-count calls to them (it then runs on one
        # thread: d4 steps 40% slower, measured): so it runs in a child
        tms = bench_child("torch_bf16" if dtype == "bf16" else "torch", model, B, T, steps)["torch_ms_per_step"]
        tpeak_mib = None
    elif compare == "torch":
        try:
            ttimes, tpeak_mib = bench_torch(cfg, B, T, steps, threads, device, dtype, compile)
        except Exception as e:
            _out_of_memory(e, "PyTorch", B, T)
            raise
        tms = statistics.median(ttimes) * 1000
    if compare == "torch":
        res.update(torch_ms_per_step=round(tms, 1), torch_tokens_per_s=round(B * T / (tms / 1000), 1),
                   torch_compile=compile)
        if device != "cpu":
            res.update(torch_mfu=mfu(res["torch_tokens_per_s"]), torch_peak_mib=tpeak_mib)
        if run_llmpy:
            res["ratio"] = round(ms / tms, 3)                  # time ratio: < 1 means llmpy is faster
            res["speedup_vs_torch"] = round(res["tokens_per_s"] / res["torch_tokens_per_s"], 3)
    return res


def print_table(res: dict) -> str:
    gpu = res["device"] != "cpu"
    torch_name = "pytorch compile" if res.get("torch_compile") else "pytorch eager"
    rows = []
    if "ms_per_step" in res:
        rows.append(("llmpy", res["ms_per_step"], res["tokens_per_s"],
                     res.get("mfu") if gpu else res.get("floor_share"), res.get("peak_mib")))
    if "torch_ms_per_step" in res:
        share = res["floor_ms"] / res["torch_ms_per_step"] if "floor_ms" in res else None
        rows.append((torch_name, res["torch_ms_per_step"], res["torch_tokens_per_s"],
                     res.get("torch_mfu") if gpu else share, res.get("torch_peak_mib")))
    if gpu:
        lines = [f"{res['model']} B={res['B']} T={res['T']} {res['dtype']} on {res['device']}; "
                 f"peak {res['peak_tflops'] or '-'} TFLOP/s ({res['peak_how']})",
                 f"{'':16}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'peak MiB':>10}"]
        for name, ms, tps, share, mib in rows:
            lines.append(f"{name:16}{ms:10.1f}{tps:12.1f}{(f'{share:.1%}' if share is not None else '-'):>8}"
                         f"{(f'{mib:.0f}' if mib is not None else '-'):>10}")
        if "speedup_vs_torch" in res:
            lines.append(f"llmpy tokens/s / pytorch tokens/s: {res['speedup_vs_torch']:.3f}")
        if "cuda_graph" in res:
            lines.append(f"llmpy: CUDA graph {'on' if res['cuda_graph'] else 'off'}; matmuls: {res['matmuls']}; "
                         f"attention: {res['attention']}")
        if "profile" in res:
            lines += ["llmpy time per op (steps run op by op, no graph):", res["profile"]]
        return "\n".join(lines)
    lines = [f"{res['model']} B={res['B']} T={res['T']} on {res['device']} ({res['threads']} threads); "
             f"sgemm {res.get('sgemm_gflops', '-')} GFLOP/s, matmul floor {res.get('floor_ms', '-')} ms/step",
             f"{'':16}{'ms/step':>10}{'tokens/s':>12}{'floor share':>13}"]
    for name, ms, tps, share, _ in rows:
        lines.append(f"{name:16}{ms:10.1f}{tps:12.1f}{(f'{share:.1%}' if share else '-'):>13}")
    if "ratio" in res:
        lines.append(f"ratio llmpy / pytorch: {res['ratio']:.3f}")
    if "profile" in res:
        lines += ["llmpy time per op:", res["profile"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# the CPU suite (issue 14): every shape a CPU user runs, llmpy against PyTorch

SUITE = (("d12", 4, 64), ("d4", 8, 128), ("d6", 8, 256), ("d2", 4, 64))


def parse_shapes(spec: str) -> tuple:
    """'d12:4:64,d2:4:64' -> (("d12", 4, 64), ("d2", 4, 64))."""
    shapes = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        try:
            model, B, T = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise LlmpyError(f"--shapes: {item!r} is not MODEL:B:T (e.g. d12:4:64)") from None
        if len(parts) != 3 or not model or B < 1 or T < 1:
            raise LlmpyError(f"--shapes: {item!r} is not MODEL:B:T with B, T >= 1 (e.g. d12:4:64)")
        preset(model, T)                          # an unknown model is refused now, not in a child
        shapes.append((model, B, T))
    return tuple(shapes)


def bench_child(side: str, model: str, B: int, T: int, steps: int) -> dict:
    """One side of the suite in a process of its own, so that its peak RSS is
    its own: `llmpy bench --json` for side "llmpy", "llmpy_bf16" (--dtype
    bf16: MKL's bf16 matmuls), "torch" (eager fp32) or "torch_bf16" (eager
    under bf16 autocast). Returns the child's result dict
    with peak_rss_mib added (the child's ru_maxrss, from os.wait4)."""
    import json
    import subprocess
    import sys
    import tempfile
    cmd = [sys.executable, "-m", "llmpy", "bench", "--device", "cpu", "--model", model,
           "-B", str(B), "-T", str(T), "--steps", str(steps), "--json"]
    if side.startswith("torch"):
        cmd += ["--only", "torch"]
    cmd += ["--dtype", "bf16" if side.endswith("bf16") else "fp32"]
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True)
        # wait4, not proc.wait(): it also returns the child's own resource usage
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0), ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if proc.returncode != 0 or not out.strip():
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise LlmpyError(f"bench suite: {side} {model} B={B} T={T} failed: {last}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)   # ru_maxrss is in KiB on Linux
    return res


def suite(shapes=SUITE, runs: int = 1, steps: int = 7, bf16: bool = False, llmpy_bf16: bool = False,
          echo=None) -> list[dict]:
    """Every shape, `runs` times: llmpy and PyTorch eager fp32 (and, with
    bf16, PyTorch under bf16 autocast; with llmpy_bf16 too, llmpy's
    --dtype bf16 beside it, bf16_ratio = llmpy bf16 / PyTorch bf16) each in its own child process, one
    after the other, the order alternating from run to run (a machine whose
    speed drifts then favours neither side). One row per (run, shape):
    both step times, ratio = llmpy / PyTorch, floor share (the matmul floor
    from the sgemm rate llmpy's child measured), peak RSS of each child.
    echo(row) is called as each row is done."""
    rows = []
    for run in range(1, runs + 1):
        for model, B, T in shapes:
            sides = ["llmpy", "torch"] + (["llmpy_bf16"] if bf16 and llmpy_bf16 else []) + \
                (["torch_bf16"] if bf16 else [])
            if run % 2 == 0:
                sides.reverse()
            got = {side: bench_child(side, model, B, T, steps) for side in sides}
            me, ref = got["llmpy"], got["torch"]
            row = {"run": run, "model": model, "B": B, "T": T, "order": " ".join(sides),
                   "sgemm_gflops": me["sgemm_gflops"], "floor_ms": me["floor_ms"],
                   "ms_per_step": me["ms_per_step"], "torch_ms_per_step": ref["torch_ms_per_step"],
                   "ratio": round(me["ms_per_step"] / ref["torch_ms_per_step"], 3),
                   "floor_share": me["floor_share"],
                   "peak_rss_mib": me["peak_rss_mib"], "torch_peak_rss_mib": ref["peak_rss_mib"]}
            if bf16:
                row["torch_bf16_ms_per_step"] = got["torch_bf16"]["torch_ms_per_step"]
                row["torch_bf16_peak_rss_mib"] = got["torch_bf16"]["peak_rss_mib"]
            if "llmpy_bf16" in got:
                row["llmpy_bf16_ms_per_step"] = got["llmpy_bf16"]["ms_per_step"]
                row["llmpy_bf16_peak_rss_mib"] = got["llmpy_bf16"]["peak_rss_mib"]
                row["bf16_ratio"] = round(row["llmpy_bf16_ms_per_step"] / row["torch_bf16_ms_per_step"], 3)
            rows.append(row)
            if echo is not None:
                echo(row)
    return rows


SUITE_HEADER = ("run", "shape", "sgemm GFLOP/s", "llmpy ms", "PyTorch ms", "ratio", "floor share",
                "llmpy RSS MiB", "PyTorch RSS MiB")


def suite_line(row: dict) -> str:
    """One suite row as a Markdown table row (SUITE_HEADER's columns, then
    PyTorch bf16 autocast ms where measured, then llmpy bf16's ms, bf16 ratio
    and both bf16 RSS where measured)."""
    cells = [row["run"], f"{row['model']} B={row['B']} T={row['T']}", row["sgemm_gflops"],
             row["ms_per_step"], row["torch_ms_per_step"], f"{row['ratio']:.3f}", f"{row['floor_share']:.1%}",
             row["peak_rss_mib"], row["torch_peak_rss_mib"]]
    if "torch_bf16_ms_per_step" in row:
        cells.append(row["torch_bf16_ms_per_step"])
    if "llmpy_bf16_ms_per_step" in row:
        cells += [row["llmpy_bf16_ms_per_step"], f"{row['bf16_ratio']:.3f}", row["llmpy_bf16_peak_rss_mib"],
                  row["torch_bf16_peak_rss_mib"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def suite_machine_lines() -> list[str]:
    """What the suite ran on, as '# ' lines to paste above its table in
    bench/RESULTS.md: date, CPU model, cores and load; the CPU's vector and
    matrix flags; NumPy's BLAS (its kernels and threads) and torch's version
    (read from its metadata: PyTorch is imported by the children only). A note
    where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set: they slow a current
    NumPy, and bench/cpu_suite.sh unsets them for its run."""
    import datetime
    from importlib import metadata
    from .ops.mkl import _cpuinfo
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    have = set(_cpuinfo("flags").split())
    lines = [f"# {now} {_cpuinfo('model name') or 'unknown CPU'} x{cores}; load: {load}",
             f"# cpu flags: {' '.join(f for f in wanted if f in have) or '(none of ' + ' '.join(wanted) + ')'}"]
    try:
        import threadpoolctl
        blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        kind = (f"{blas[0]['internal_api']} {blas[0].get('architecture')} kernels, {blas[0]['num_threads']} threads"
                if blas else "no BLAS found")
    except ImportError:
        kind = "BLAS unknown: no threadpoolctl"
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    lines.append(f"# numpy {np.__version__} ({kind}), torch {torch}")
    tuned = [f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ]
    if tuned:
        lines.append(f"# note: {' '.join(tuned)} is set and slows NumPy's sgemm; "
                     "bash bench/cpu_suite.sh runs without it")
    return lines


def run_suite(shapes: str | None = None, runs: int | None = 1, steps: int = 7, bf16: bool = False,
              quick: bool = False, as_json: bool = False) -> None:
    """The suite as `llmpy bench --suite` and `python -m llmpy.bench --suite`
    run it: the machine's lines and a Markdown table (as_json: one JSON line a
    row instead), each row printed as it is done. shapes: 'M:B:T,...' (default
    SUITE); quick: the smallest shape once, 5 steps. LlmpyError on bad input."""
    import importlib.util
    import json
    runs = 1 if runs is None else runs
    if runs < 1:
        raise LlmpyError(f"--runs {runs}: must be >= 1")
    parsed = parse_shapes(shapes) if shapes else SUITE
    if importlib.util.find_spec("torch") is None:       # (before a child has spent a minute on llmpy's side)
        raise LlmpyError("the suite times PyTorch beside llmpy, and torch is not installed in this environment: "
                         "pip install -e '.[test]' (or pip install torch)")
    if quick:
        parsed, runs, steps = (SUITE[-1],), 1, 5
    llmpy_bf16 = False
    if bf16:
        from .ops import mkl
        try:
            mkl.library()
            llmpy_bf16 = True
        except LlmpyError as e:
            print(f"# llmpy --dtype bf16 not timed: {e}", flush=True)
    if not as_json:
        header = list(SUITE_HEADER) + (["PyTorch bf16 ms"] if bf16 else []) + \
            (["llmpy bf16 ms", "bf16 ratio", "llmpy bf16 RSS MiB", "PyTorch bf16 RSS MiB"] if llmpy_bf16 else [])
        print("\n".join(suite_machine_lines()), flush=True)
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    suite(parsed, runs, steps, bf16, llmpy_bf16,
          echo=lambda row: print(json.dumps(row) if as_json else suite_line(row), flush=True))
    if not as_json:
        print(f"# load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def suite_main(argv=None) -> int:
    """python -m llmpy.bench --suite [--runs N] [--steps N] [--shapes M:B:T,...] [--bf16] [--quick] [--json]
    (the same as `llmpy bench --suite ...`)"""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m llmpy.bench", description="the CPU suite (bench/cpu_suite.sh)")
    p.add_argument("--suite", action="store_true", required=True, help="run the CPU suite")
    add_suite_arguments(p)
    p.add_argument("--steps", type=int, default=7, help="timed steps per side (at least 5)")
    p.add_argument("--json", action="store_true", help="one JSON line per row instead of a table")
    args = p.parse_args(argv)
    try:
        run_suite(args.shapes, args.runs, args.steps, args.bf16, args.quick, args.json)
    except LlmpyError as e:
        print(f"llmpy bench --suite: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_suite_arguments(p):
    """The suite's own flags, for both of its command lines."""
    p.add_argument("--runs", type=int, default=None, help="--suite: times through every shape, the order "
                   "alternating (default 1)")
    p.add_argument("--shapes", default=None, help="--suite: MODEL:B:T,... (default: "
                   + ",".join(f"{m}:{b}:{t}" for m, b, t in SUITE) + ")")
    p.add_argument("--bf16", action="store_true", help="--suite: also PyTorch under bf16 autocast, and llmpy "
                   "--dtype bf16 where Intel MKL is installed (llmpy[cpu-bf16])")
    p.add_argument("--quick", action="store_true", help="--suite: the smallest shape (d2 B=4 T=64) once, "
                   "5 steps: a smoke test")


if __name__ == "__main__":
    raise SystemExit(suite_main())
