"""The training loop: learning rate, step, non-finite policy, log, periodic eval, sample and checkpoint.

    for step in start+1 .. steps:
        lr = lr_at(step)                                   (optim.py: warmup, then cosine/linear/constant)
        loss, norm, applied = train_step(next batches, lr, step)   (step.py)
        a non-finite loss or norm: stop naming the step, or (--skip-nonfinite) go on without its update
        log the step; every val_every steps the val loss, every sample_every a sample,
        every checkpoint_every (and at the end) a checkpoint

Everything the loop needs to continue bitwise after `--resume` is in the
checkpoint: the weights, AdamW's m and v, the step and the DataLoader's
position; nothing else in the loop is random (sampling draws from its own
seeded generator). Several processes (`mpirun -np N llmpy train`, dist.py)
train one model data-parallel: each rank reads its own windows of every
global batch, step.HostStep sums the gradients over the ranks, and rank 0
prints, logs, evaluates, samples and writes the model.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from . import checkpoint as ckpt
from . import dist, evals, families
from .config import TrainConfig
from .errors import LlmpyError
from .optim import AdamW, lr_at
from .runlog import RunLog
from .step import DeviceStep, HostStep


def train(tc: TrainConfig) -> dict:
    """Run training; returns a summary dict (final loss, val loss, out dir, ...)."""
    from .data.shards import DataLoader
    from .data.tokenizer import Tokenizer
    tc.check()
    comm = dist.make_communicator(tc.dist, tc.device, tc.dist_timeout)
    world, root = comm.world_size, comm.rank == 0
    out = Path(tc.out)
    if root:
        out.mkdir(parents=True, exist_ok=True)
    train_pattern, val_pattern = resolve_data(tc, comm)
    model = families.build(tc.model, tc.device, tc.dtype, tc.seed, tc.seq_len)
    comm.broadcast(model.params.flat, root=0)      # every rank starts from rank 0's weights
    model.params_updated()
    accum = grad_accum_steps(tc, world)
    shard = comm.bounds(model.params.flat.size) if tc.zero_stage == 1 else None
    optimizer = AdamW(model, weight_decay=tc.weight_decay, shard=shard)
    loader = DataLoader(train_pattern, tc.batch_size, tc.seq_len, rank=comm.rank, world_size=world, seed=tc.seed)
    val_loader = DataLoader(val_pattern, tc.batch_size, tc.seq_len, shuffle=False) if val_pattern and root else None
    say = (lambda text: print(text, flush=True)) if root else (lambda text: None)
    start = ckpt.resume(out, model, optimizer, loader, comm, say) if tc.resume else 0
    if tc.device == "cuda" and world == 1 and tc.cuda_graphs:
        # the whole step on the GPU without host syncs, captured as CUDA graphs
        train_step = DeviceStep(model, optimizer, tc.batch_size, tc.seq_len, tc.grad_clip, accum=accum)
    else:
        train_step = HostStep(model, optimizer, comm, accum, tc.grad_clip,
                              before_sync=lambda step: _test_hooks(step, comm))
    last = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    tokens_per_step = tc.batch_size * tc.seq_len * accum * world
    ranks = f" x {world} ranks ({comm.name}, ZeRO-{tc.zero_stage})" if world > 1 else ""
    say(f"llmpy train: model {tc.model} ({model.num_parameters / 1e6:.1f}M params, "
        f"L={model.config.n_layer} H={model.config.n_head} C={model.config.n_embd}), device {tc.device}, "
        f"B={tc.batch_size} T={tc.seq_len} accum={accum}{ranks} ({tokens_per_step} tokens/step), "
        f"steps {start}->{tc.steps}, data {train_pattern} ({loader.num_tokens:,} tokens), out {out}")
    run = RunLog(out, start, last, tc.steps, tc.progress, quiet=not root)
    tokenizer = Tokenizer()        # for the samples
    loss = val_loss = float("nan")
    try:
        for step in range(start + 1, last + 1):          # step = optimizer steps done after this one
            t0 = time.perf_counter()
            lr = lr_at(step - 1, tc.lr, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_frac)
            loss, norm, applied = train_step([loader.next_batch() for _ in range(accum)], lr, step)
            if applied and math.isfinite(loss):
                ms = (time.perf_counter() - t0) * 1000
                rec = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
                       "ms": round(ms, 2), "tokens_per_s": round(tokens_per_step / (ms / 1000), 1)}
                if val_loader is not None and tc.val_every and (step % tc.val_every == 0 or step == tc.steps):
                    val_loss = rec["val_loss"] = round(evals.val_loss(model, val_loader, tc.val_steps), 6)
                run.record(rec, f"loss {loss:.4f} val {val_loss:.4f} lr {lr:.2e} {rec['tokens_per_s']:.0f} tok/s")
                if tc.sample_every and step % tc.sample_every == 0 and step != tc.steps and root:
                    run.print(f"--- sample at step {step} ---\n{sample_text(model, tokenizer, tc.sample_tokens, step)}"
                              "\n---")
            else:
                # A non-finite loss or gradient would poison the weights and AdamW's
                # m and v for good: stop, or (--skip-nonfinite) go on without this
                # step's update; its batches are consumed and the schedule moves on.
                problem = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
                if not tc.skip_nonfinite:
                    raise LlmpyError(f"step {step}: {problem}; lower --lr or check the data "
                                     "(--skip-nonfinite skips such steps)")
                run.print(f"step {step}: {problem}; skipping this step (--skip-nonfinite)")
                run.skipped()
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == last:
                ckpt.save(out, step, model, optimizer, loader, comm, tc.to_dict(), tc.keep)
                run.plot()
    finally:
        run.close()

    summary = {"out": str(out), "steps": last, "loss": loss, "val_loss": val_loss, "rank": comm.rank}
    comm.barrier()
    comm.close()
    if not root:
        return summary
    run.plot()
    if run.records:
        summary["first_loss"] = run.records[0]["loss"]
    if last == tc.steps and last > start:
        text = sample_text(model, tokenizer, tc.sample_tokens * 2, tc.seed)
        print(f"--- sample after {last} steps ---\n{text}\n---", flush=True)
        summary["sample"] = text
    print(f"done: loss {loss:.4f}, val loss {val_loss:.4f}; log {out / 'log.jsonl'}, plot {out / 'loss.png'}",
          flush=True)
    return summary


# ---------------------------------------------------------------------- set-up pieces


def resolve_data(tc: TrainConfig, comm) -> tuple[str, str | None]:
    """(train pattern, val pattern). With no --data, the embedded pydoc corpus,
    prepared on first use (by rank 0, while the others wait)."""
    if tc.data is not None:
        return tc.data, tc.val_data
    from .data.prepare import prepare_pydoc
    if comm.rank != 0:
        comm.barrier()
    info = prepare_pydoc("data/pydoc")
    if comm.rank == 0:
        comm.barrier()
    return str(info["train"]), (tc.val_data if tc.val_data is not None else str(info["val"]))


def grad_accum_steps(tc: TrainConfig, world_size: int = 1) -> int:
    per_step = tc.batch_size * tc.seq_len * world_size
    total = tc.total_batch_size or per_step
    if total % per_step:
        raise LlmpyError(f"--total-batch-size {total} is not a multiple of batch-size x seq-len x ranks = {per_step}; "
                         f"use e.g. {per_step * max(1, round(total / per_step))}")
    return total // per_step


def sample_text(model, tokenizer, n_tokens: int, seed: int) -> str:
    from .inference import generate
    ids = generate(model, [tokenizer.eot], n_tokens, temperature=1.0, top_k=40, seed=seed)
    return tokenizer.decode(ids)


def _test_hooks(step: int, comm):
    """For tests of a lost rank: the last rank exits (LLMPY_TEST_DIE_AT_STEP)
    or hangs (LLMPY_TEST_HANG_AT_STEP) at that step, before the gradient sync."""
    if comm.world_size == 1 or comm.rank != comm.world_size - 1:
        return
    if os.environ.get("LLMPY_TEST_DIE_AT_STEP") == str(step):
        print(f"rank {comm.rank}: LLMPY_TEST_DIE_AT_STEP={step}: exiting", file=sys.stderr, flush=True)
        os._exit(1)
    if os.environ.get("LLMPY_TEST_HANG_AT_STEP") == str(step):
        print(f"rank {comm.rank}: LLMPY_TEST_HANG_AT_STEP={step}: hanging", file=sys.stderr, flush=True)
        time.sleep(3600)
