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
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


from . import checkpoint as ckpt
from . import evals
from .config import PRESETS, TrainConfig, preset
from .errors import LlmpyError
from .model import GPT
from .optim import AdamW, clip_scale, global_norm, lr_at


def log(msg: str):
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
        return GPT(cfg, device=tc.device, seed=tc.seed)
    if Path(tc.model).is_dir():
        model = ckpt.load(tc.model, device=tc.device)
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
    if tc.dtype != "fp32" and tc.device == "cpu":
        raise LlmpyError(f"--dtype {tc.dtype} is not available on the CPU; the CPU path is fp32")
    if tc.lr_schedule not in ("cosine", "linear", "constant"):
        raise LlmpyError(f"--lr-schedule {tc.lr_schedule!r}: use cosine, linear or constant")


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
    from .data.shards import DataLoader
    check_config(tc)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)

    train_pattern, val_pattern = resolve_data(tc)
    model = build_model(tc)
    if tc.seq_len > model.config.block_size:
        raise LlmpyError(f"--seq-len {tc.seq_len} exceeds the model's block_size {model.config.block_size}")
    accum = grad_accum_steps(tc)
    optimizer = AdamW(model, lr=tc.lr, weight_decay=tc.weight_decay)
    loader = DataLoader(train_pattern, tc.batch_size, tc.seq_len, seed=tc.seed)
    val_loader = DataLoader(val_pattern, tc.batch_size, tc.seq_len, shuffle=False) if val_pattern else None

    start = 0
    if tc.resume:
        start = _resume(out, model, optimizer, loader)
    records = _read_log(out / "log.jsonl", start)
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logf = open(out / "log.jsonl", "a")

    tokens_per_step = tc.batch_size * tc.seq_len * accum
    log(f"llmpy train: model {tc.model} ({model.num_parameters / 1e6:.1f}M params, "
        f"L={model.config.n_layer} H={model.config.n_head} C={model.config.n_embd}), device {tc.device}, "
        f"B={tc.batch_size} T={tc.seq_len} accum={accum} ({tokens_per_step} tokens/step), "
        f"steps {start}->{tc.steps}, data {train_pattern} ({loader.num_tokens:,} tokens), out {out}")

    from .data.tokenizer import Tokenizer
    tokenizer = Tokenizer()        # for the samples

    last_stop = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    bar = None
    if tc.progress and last_stop > start:
        from tqdm import tqdm
        bar = tqdm(total=last_stop, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)
    loss = val_loss = float("nan")
    try:
        for step in range(start + 1, last_stop + 1):      # step = optimizer steps done after this one
            t0 = time.perf_counter()
            checkpoint_due = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == last_stop
            lr = lr_at(step - 1, tc.lr, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_frac)
            model.zero_grad()
            loss = 0.0
            for _ in range(accum):
                x, y = loader.next_batch()
                _, micro_loss = model.forward(x, y)
                model.backward(loss_scale=1.0 / accum)
                loss += micro_loss / accum
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
                    _checkpoint(tc, out, step, model, optimizer, loader)
                continue
            optimizer.step(lr, grad_scale=clip_scale(norm, tc.grad_clip))
            ms = (time.perf_counter() - t0) * 1000
            rec = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
                   "ms": round(ms, 2), "tokens_per_s": round(tokens_per_step / (ms / 1000), 1)}
            if val_loader is not None and tc.val_every and (step % tc.val_every == 0 or step == tc.steps):
                val_loss = evals.val_loss(model, val_loader, tc.val_steps)
                rec["val_loss"] = round(val_loss, 6)
            records.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.4f} val {val_loss:.4f} lr {lr:.2e} "
                                    f"{rec['tokens_per_s']:.0f} tok/s", refresh=False)
                bar.update(1)
            elif "val_loss" in rec or step == start + 1:
                log(f"step {step}/{tc.steps} loss {loss:.4f} val {val_loss:.4f} {rec['tokens_per_s']:.0f} tok/s")
            if tc.sample_every and step % tc.sample_every == 0 and step != tc.steps:
                _print(bar, f"--- sample at step {step} ---\n{sample_text(model, tokenizer, tc.sample_tokens, step)}\n---")
            if checkpoint_due:
                _checkpoint(tc, out, step, model, optimizer, loader)
                plot_losses(records, out / "loss.png")
    finally:
        if bar is not None:
            bar.close()
        logf.close()

    summary = {"out": str(out), "steps": last_stop, "loss": loss, "val_loss": val_loss}
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


def _checkpoint(tc, out, step, model, optimizer, loader):
    state = {"loader": loader.state_dict(), "train_config": tc.to_dict(),
             "model_config": model.config.to_dict()}
    ckpt.save_training_checkpoint(out, step, model, optimizer, state, keep=tc.keep)


def _resume(out: Path, model, optimizer, loader) -> int:
    """Restore the newest checkpoint that verifies; returns its step (0: none)."""
    for p in ckpt.remove_stale_temporaries(out):
        log(f"resume: removed {p}, left behind by an interrupted run")
    found = ckpt.list_checkpoints(out)
    for path in reversed(found):
        problem = ckpt.verify_checkpoint(path)
        if problem:
            log(f"resume: skipping {path}: {problem}")
            continue
        state = ckpt.load_training_checkpoint(path, model, optimizer)
        try:
            loader.load_state_dict(state["loader"])
        except LlmpyError as e:
            raise LlmpyError(f"{path / 'train_state.json'}: {e}") from None
        log(f"resume: continuing from {path} (step {state['step']})")
        return int(state["step"])
    log(f"resume: no checkpoint in {out}; starting from step 0")
    return 0
