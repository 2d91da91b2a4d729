"""The training loop: gradient accumulation, eval, sampling, checkpoints, logs.

One optimizer step:
    zero_grad
    repeat grad_accum times:  forward(x, y); backward(loss_scale = 1 / grad_accum)
    clip the global gradient norm; AdamW step with this step's learning rate
Every `val_every` steps the mean loss over `val_steps` val batches is measured,
every `sample_every` steps a sample is printed, every `checkpoint_every` steps
a checkpoint is written (and at the end). `--resume` restores the newest
checkpoint that verifies and continues bitwise-identically: the weights, AdamW
state, step and the DataLoader's position are all in it, and nothing else in
the loop is random (sampling draws from its own seeded generator).

Several processes (`mpirun -np N llmpy train ...`, see dist.py) train one
model data-parallel: rank r reads windows of its own (the DataLoader splits
each global batch of B * N windows), each rank runs its grad_accum
micro-steps with loss scale 1 / (grad_accum * N), and once per optimizer
step the gradients are summed over the ranks, which makes them the mean over
all N * grad_accum micro-batches, as one process with the same total batch
would compute. With --zero-stage 0 every rank all-reduces every gradient and
updates every parameter (identically). With --zero-stage 1 each rank owns one
slice of the flat buffer: the gradients are reduce-scattered (each rank gets
the sum of its slice only), each rank updates its slice with the AdamW state
it alone keeps, and the parameters are all-gathered; the same bytes travel as
with an all-reduce, and AdamW's m and v take 1/N of the memory. Rank 0 prints,
logs, evaluates, samples and writes the model; the others stay quiet.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


from . import checkpoint as ckpt
from . import dist, evals
from .config import PRESETS, TrainConfig, preset
from .errors import LlmpyError
from .model import GPT
from .optim import AdamW, clip_scale, global_norm, lr_at


_QUIET = False          # set on ranks other than 0: only rank 0 prints


def log(msg: str):
    if not _QUIET:
        print(msg, flush=True)


# ---------------------------------------------------------------------- set-up pieces


def resolve_data(tc: TrainConfig) -> tuple[str, str | None]:
    """(train pattern, val pattern). With no --data, the embedded pydoc corpus,
    prepared on first use."""
    if tc.data is not None:
        return tc.data, tc.val_data
    from .data.prepare import prepare_pydoc
    info = prepare_pydoc("data/pydoc")
    return str(info["train"]), (tc.val_data if tc.val_data is not None else str(info["val"]))


def build_model(tc: TrainConfig) -> GPT:
    if tc.model in PRESETS:
        # GPT-2's context of 1024 positions, or more if --seq-len asks for it
        cfg = preset(tc.model, block_size=max(tc.seq_len, 1024))
        return GPT(cfg, device=tc.device, seed=tc.seed, dtype=tc.dtype)
    if Path(tc.model).is_dir():
        model = ckpt.load(tc.model, device=tc.device, dtype=tc.dtype)
        if tc.seq_len > model.config.block_size:
            raise LlmpyError(f"--seq-len {tc.seq_len} exceeds {tc.model}'s block_size {model.config.block_size}")
        return model
    raise LlmpyError(f"--model {tc.model!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")


def grad_accum_steps(tc: TrainConfig, world_size: int = 1) -> int:
    per_step = tc.batch_size * tc.seq_len * world_size
    total = tc.total_batch_size or per_step
    if total % per_step:
        raise LlmpyError(f"--total-batch-size {total} is not a multiple of batch-size x seq-len x ranks = {per_step}; "
                         f"use e.g. {per_step * max(1, round(total / per_step))}")
    return total // per_step


def check_config(tc: TrainConfig):
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(tc, name) <= 0:
            raise LlmpyError(f"--{name.replace('_', '-')} must be positive, got {getattr(tc, name)}")
    if tc.lr <= 0 or not math.isfinite(tc.lr):
        raise LlmpyError(f"--lr must be a positive number, got {tc.lr}")
    if tc.dtype not in ("fp32", "bf16"):
        raise LlmpyError(f"--dtype {tc.dtype!r}: use fp32 or bf16 (bf16 needs --device cuda)")
    if tc.dtype == "bf16" and tc.device != "cuda":
        raise LlmpyError("--dtype bf16 needs --device cuda; the NumPy backend computes in fp32")
    if tc.lr_schedule not in ("cosine", "linear", "constant"):
        raise LlmpyError(f"--lr-schedule {tc.lr_schedule!r}: use cosine, linear or constant")
    if tc.zero_stage not in (0, 1):
        raise LlmpyError(f"--zero-stage {tc.zero_stage}: use 0 (replicated AdamW state) or 1 (sharded over ranks)")


def sample_text(model: GPT, tokenizer, n_tokens: int, seed: int) -> str:
    from .sample import generate
    ids = generate(model, [tokenizer.eot], n_tokens, temperature=1.0, top_k=40, seed=seed)
    return tokenizer.decode(ids)


def plot_losses(records: list[dict], path: Path):
    """loss.png: train loss per step, val loss where measured (atomic write)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if r.get("step", 0) <= upto_step:
            records.append(r)
    return records


# ---------------------------------------------------------------------- the loop


def train(tc: TrainConfig) -> dict:
    """Run training; returns a summary dict (final loss, val loss, out dir, ...)."""
    global _QUIET
    from .data.shards import DataLoader
    check_config(tc)
    comm = dist.make_communicator(tc.dist, tc.device, tc.dist_timeout)
    world, root = comm.world_size, comm.rank == 0
    _QUIET = not root
    out = Path(tc.out)
    if root:
        out.mkdir(parents=True, exist_ok=True)
    if tc.data is None and not root:
        comm.barrier()                 # rank 0 prepares the default corpus once
    train_pattern, val_pattern = resolve_data(tc)
    if tc.data is None and root:
        comm.barrier()
    model = build_model(tc)
    if tc.seq_len > model.config.block_size:
        raise LlmpyError(f"--seq-len {tc.seq_len} exceeds the model's block_size {model.config.block_size}")
    comm.broadcast(model.params.flat, root=0)      # every rank starts from rank 0's weights
    model.params_updated()
    accum = grad_accum_steps(tc, world)
    shard = comm.bounds(model.params.flat.size) if tc.zero_stage == 1 else None
    optimizer = AdamW(model, lr=tc.lr, weight_decay=tc.weight_decay, shard=shard)
    loader = DataLoader(train_pattern, tc.batch_size, tc.seq_len, rank=comm.rank, world_size=world, seed=tc.seed)
    val_loader = DataLoader(val_pattern, tc.batch_size, tc.seq_len, shuffle=False) if val_pattern and root else None

    start = 0
    if tc.resume:
        start = _resume(out, model, optimizer, loader, comm, tc)
    records, logf = [], None
    if root:
        records = _read_log(out / "log.jsonl", start)
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        logf = open(out / "log.jsonl", "a")

    tokens_per_step = tc.batch_size * tc.seq_len * accum * world
    ranks = f" x {world} ranks ({comm.name}, ZeRO-{tc.zero_stage})" if world > 1 else ""
    log(f"llmpy train: model {tc.model} ({model.num_parameters / 1e6:.1f}M params, "
        f"L={model.config.n_layer} H={model.config.n_head} C={model.config.n_embd}), device {tc.device}, "
        f"B={tc.batch_size} T={tc.seq_len} accum={accum}{ranks} ({tokens_per_step} tokens/step), "
        f"steps {start}->{tc.steps}, data {train_pattern} ({loader.num_tokens:,} tokens), out {out}")

    from .data.tokenizer import Tokenizer
    tokenizer = Tokenizer()        # for the samples

    last_stop = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    bar = None
    if tc.progress and last_stop > start and root:
        from tqdm import tqdm
        bar = tqdm(total=last_stop, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)
    loss = val_loss = float("nan")
    device_step = None
    if tc.device == "cuda" and world == 1 and tc.cuda_graphs:
        # the whole step on the GPU without host syncs, captured as CUDA graphs (graph_step.py)
        from .graph_step import DeviceStep
        device_step = DeviceStep(model, optimizer, tc.batch_size, tc.seq_len, tc.grad_clip, accum=accum)
    try:
        for step in range(start + 1, last_stop + 1):      # step = optimizer steps done after this one
            t0 = time.perf_counter()
            checkpoint_due = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == last_stop
            lr = lr_at(step - 1, tc.lr, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_frac)
            if device_step is not None:
                # forward, backward, norm and the clipped AdamW update in one go
                # on the GPU; a non-finite norm made the kernel skip the update
                loss, norm = device_step([loader.next_batch() for _ in range(accum)], lr)
                _test_hooks(step, comm)
                if not math.isfinite(norm):
                    optimizer.step_count -= 1     # as if optimizer.step had not run
            else:
                model.zero_grad()
                loss = 0.0
                for _ in range(accum):
                    x, y = loader.next_batch()
                    _, micro_loss = model.forward(x, y)
                    model.backward(loss_scale=1.0 / (accum * world))
                    loss += micro_loss / accum
                _test_hooks(step, comm)
                if world > 1:
                    loss = comm.all_reduce_scalar(loss) / world       # the mean over all ranks
                    norm = _sync_gradients(model, optimizer, comm, tc.zero_stage)
                else:
                    norm = global_norm(model) if math.isfinite(loss) else float("nan")
            problem = (f"the loss is {loss}" if not math.isfinite(loss) else
                       f"the gradient norm is {norm}" if not math.isfinite(norm) else None)
            if problem:
                # A non-finite loss or gradient would poison the weights and AdamW's
                # m and v for good: stop, or (--skip-nonfinite) drop this step's
                # update; its batches are consumed and the schedule moves on.
                if not tc.skip_nonfinite:
                    raise LlmpyError(f"step {step}: {problem}; lower --lr or check the data "
                                     "(--skip-nonfinite skips such steps)")
                _print(bar, f"step {step}: {problem}; skipping this step (--skip-nonfinite)")
                if bar is not None:
                    bar.update(1)
                if checkpoint_due:
                    _checkpoint(tc, out, step, model, optimizer, loader, comm)
                continue
            if device_step is None:
                optimizer.step(lr, grad_scale=clip_scale(norm, tc.grad_clip))
                if optimizer.shard is not None:
                    comm.all_gather(model.params.flat)      # every rank's updated slice to every rank
                    if model.compute_params is not model.params:   # bf16: the rounded copy too
                        comm.all_gather(model.compute_params.flat)
            ms = (time.perf_counter() - t0) * 1000
            rec = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
                   "ms": round(ms, 2), "tokens_per_s": round(tokens_per_step / (ms / 1000), 1)}
            if val_loader is not None and tc.val_every and (step % tc.val_every == 0 or step == tc.steps):
                val_loss = evals.val_loss(model, val_loader, tc.val_steps)
                rec["val_loss"] = round(val_loss, 6)
            records.append(rec)
            if logf is not None:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f} val {val_loss:.4f} lr {lr:.2e} "
                                    f"{rec['tokens_per_s']:.0f} tok/s", refresh=False)
                bar.update(1)
            elif "val_loss" in rec or step == start + 1:
                log(f"step {step}/{tc.steps} loss {loss:.4f} val {val_loss:.4f} {rec['tokens_per_s']:.0f} tok/s")
            if tc.sample_every and step % tc.sample_every == 0 and step != tc.steps and root:
                _print(bar, f"--- sample at step {step} ---\n{sample_text(model, tokenizer, tc.sample_tokens, step)}\n---")
            if checkpoint_due:
                _checkpoint(tc, out, step, model, optimizer, loader, comm)
                if root:
                    plot_losses(records, out / "loss.png")
    finally:
        if bar is not None:
            bar.close()
        if logf is not None:
            logf.close()

    summary = {"out": str(out), "steps": last_stop, "loss": loss, "val_loss": val_loss, "rank": comm.rank}
    comm.barrier()
    comm.close()
    if not root:
        return summary
    if records:
        plot_losses(records, out / "loss.png")
        summary["first_loss"] = records[0]["loss"]
    if last_stop == tc.steps and last_stop > start:
        text = sample_text(model, tokenizer, tc.sample_tokens * 2, tc.seed)
        log(f"--- sample after {last_stop} steps ---\n{text}\n---")
        summary["sample"] = text
    log(f"done: loss {loss:.4f}, val loss {val_loss:.4f}; log {out / 'log.jsonl'}, plot {out / 'loss.png'}")
    return summary


def _print(bar, text):
    if bar is not None:
        bar.write(text)
    else:
        log(text)


def _sync_gradients(model, optimizer, comm, zero_stage: int) -> float:
    """Sum the gradients over the ranks (each rank's are already scaled by
    1 / (accum * world), so the sum is the mean); returns the global norm.
    ZeRO-0: all-reduce all of them. ZeRO-1: reduce-scatter, so each rank
    holds the sum of its own slice only; the norm is then the square root of
    the all-reduced sums of squares of the slices."""
    g = model.grads.flat
    if zero_stage == 0:
        comm.all_reduce(g)
        return global_norm(model)
    comm.reduce_scatter(g)
    lo, hi = optimizer.shard
    return math.sqrt(comm.all_reduce_scalar(float(model.ops.sum_of_squares(g[lo:hi]))))


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


def _checkpoint(tc, out, step, model, optimizer, loader, comm):
    state = {"loader": loader.state_dict(), "train_config": tc.to_dict(),
             "model_config": model.config.to_dict(), "world_size": comm.world_size, "zero_stage": tc.zero_stage}
    if optimizer.shard is not None:         # ZeRO-1: every rank writes its slice of AdamW's state
        ckpt.save_training_checkpoint(out, step, model, optimizer, state, keep=tc.keep, comm=comm)
    elif comm.rank == 0:                    # otherwise every rank holds the same state: rank 0 writes it
        ckpt.save_training_checkpoint(out, step, model, optimizer, state, keep=tc.keep)
    comm.barrier()


def _resume(out: Path, model, optimizer, loader, comm, tc) -> int:
    """Restore the newest checkpoint that verifies; returns its step (0: none).
    Rank 0 picks it and tells the others, which then load the same one."""
    import numpy as np
    chosen = np.zeros(1, dtype=np.int64)
    if comm.rank == 0:
        for p in ckpt.remove_stale_temporaries(out):
            log(f"resume: removed {p}, left behind by an interrupted run")
        for path in reversed(ckpt.list_checkpoints(out)):
            problem = ckpt.verify_checkpoint(path)
            if problem:
                log(f"resume: skipping {path}: {problem}")
                continue
            chosen[0] = int(path.name[len(ckpt.CKPT_PREFIX):])
            break
    comm.broadcast(chosen, root=0)
    if not chosen[0]:
        log(f"resume: no checkpoint in {out}; starting from step 0")
        return 0
    path = out / f"{ckpt.CKPT_PREFIX}{int(chosen[0]):08d}"
    state = ckpt.load_training_checkpoint(path, model, optimizer)
    try:
        loader.load_state_dict(state["loader"])
    except LlmpyError as e:
        raise LlmpyError(f"{path / 'train_state.json'}: {e}") from None
    was_world, was_zero = state.get("world_size", 1), state.get("zero_stage", 0)
    if (was_world, was_zero) != (comm.world_size, tc.zero_stage):
        # The AdamW state is re-cut for the new slices (load_training_checkpoint
        # reads whatever slices the checkpoint has), and the data continues from
        # the same global position; but with another number of ranks the batches
        # group differently, so the run is no longer identical to one that was
        # never stopped.
        log(f"resume: {path} was written by {was_world} rank(s) with ZeRO-{was_zero}, this run has "
            f"{comm.world_size} with ZeRO-{tc.zero_stage}: AdamW state re-sharded; training continues, "
            f"but not bitwise as an uninterrupted {was_world}-rank run would")
    log(f"resume: continuing from {path} (step {state['step']})")
    return int(state["step"])
