"""`llmpy bench`: time one full training step (forward, backward, AdamW).

Protocol (DESIGN.md section 7): build the model, warm up for 2 steps, time at
least 5 more and take the median. In the same run, measure the machine's
single-precision matrix-multiply rate (a 2048^3 sgemm through the same BLAS),
and with `--compare torch` time a PyTorch reference model of the same shapes
(eager, same thread count, torch's AdamW). PyTorch is imported here only when
asked for: it is the yardstick, never part of llmpy.

floor_share = (matmul FLOPs of one step / measured sgemm rate) / step time:
the fraction of the step that the unavoidable matrix multiplies would take
at the machine's best matmul speed.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from .config import GPTConfig, preset


def matmul_flops(cfg: GPTConfig, B: int, T: int) -> float:
    """FLOPs in the matmuls of one training step (forward + backward = 3x forward)."""
    N, C, L, V = B * T, cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_layer = 2 * N * 12 * C * C + 4 * B * T * T * C     # qkv, attproj, fc, fcproj; q k^T and att v
    forward = L * per_layer + 2 * N * C * V                 # + the LM head
    return 3.0 * forward


def sgemm_gflops(n: int = 2048, reps: int = 5) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def _time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def bench_llmpy(cfg, device, B, T, steps):
    from .model import GPT
    from .optim import AdamW, clip_scale, global_norm
    model = GPT(cfg, device=device, seed=0)
    opt = AdamW(model, lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (B, T + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    x, y = model.xp.asarray(x), model.xp.asarray(y)

    def step():
        model.zero_grad()
        model.forward(x, y)
        model.backward()
        opt.step(grad_scale=clip_scale(global_norm(model), 1.0))
    return _time_steps(step, 2, steps)


def bench_torch(cfg, B, T, steps, threads):
    import torch
    from .bench_torch import TorchGPT
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = TorchGPT(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return _time_steps(step, 2, steps)


def bench(device="cpu", model="d12", B=4, T=64, steps=7, compare=None) -> dict:
    from .optim import _num_threads
    cfg = preset(model, block_size=max(1024, T))
    steps = max(5, steps)
    threads = _num_threads()
    res = {"device": device, "model": model, "B": B, "T": T, "threads": threads, "steps": steps}
    if device == "cpu":
        res["sgemm_gflops"] = round(sgemm_gflops(), 1)
    times = bench_llmpy(cfg, device, B, T, steps)
    ms = statistics.median(times) * 1000
    flops = matmul_flops(cfg, B, T)
    res.update(ms_per_step=round(ms, 1), tokens_per_s=round(B * T / (ms / 1000), 1),
               matmul_gflop_per_step=round(flops / 1e9, 2))
    if "sgemm_gflops" in res:
        floor_ms = flops / (res["sgemm_gflops"] * 1e9) * 1000
        res["floor_ms"] = round(floor_ms, 1)
        res["floor_share"] = round(floor_ms / ms, 3)
    if compare == "torch":
        ttimes = bench_torch(cfg, B, T, steps, threads)
        tms = statistics.median(ttimes) * 1000
        res.update(torch_ms_per_step=round(tms, 1), torch_tokens_per_s=round(B * T / (tms / 1000), 1),
                   ratio=round(ms / tms, 3))
    return res


def print_table(res: dict) -> str:
    rows = [("llmpy", res["ms_per_step"], res["tokens_per_s"], res.get("floor_share"))]
    if "torch_ms_per_step" in res:
        share = res["floor_ms"] / res["torch_ms_per_step"] if "floor_ms" in res else None
        rows.append(("pytorch eager", res["torch_ms_per_step"], res["torch_tokens_per_s"], share))
    lines = [f"{res['model']} B={res['B']} T={res['T']} on {res['device']} ({res['threads']} threads); "
             f"sgemm {res.get('sgemm_gflops', '-')} GFLOP/s, matmul floor {res.get('floor_ms', '-')} ms/step",
             f"{'':16}{'ms/step':>10}{'tokens/s':>12}{'floor share':>13}"]
    for name, ms, tps, share in rows:
        lines.append(f"{name:16}{ms:10.1f}{tps:12.1f}{(f'{share:.1%}' if share else '-'):>13}")
    if "ratio" in res:
        lines.append(f"ratio llmpy / pytorch: {res['ratio']:.3f}")
    return "\n".join(lines)
