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
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from . import dist, evals, families
from .bench import flops_per_token
from .config import TrainConfig
from .errors import Interrupted, LlmpyError
from .ops import get_backend
from .optim import AdamW, lr_at
from .runlog import RunLog
from .step import DeviceStep, HostStep, check_fits


def train(tc: TrainConfig, given: set[str] | None = None) -> dict:
    """Run training; returns a summary dict (final loss, val loss, out dir, ...).

    given: the flags the user set (the CLI knows); --resume keeps the saved
    value of every other one. None (the Python API): the fields that differ
    from TrainConfig's defaults."""
    from .data.shards import DataLoader
    tc.check()
    get_backend(tc.device, tc.dtype)    # one line now if it cannot run here, before --out is touched
    if given is None:
        given = {k for k, v in tc.to_dict().items() if v != getattr(TrainConfig(), k)}
    comm = dist.make_communicator(tc.dist, tc.device, tc.dist_timeout)
    world, root = comm.world_size, comm.rank == 0
    say = (lambda text: print(text, flush=True)) if root else (lambda text: None)
    if world == 1 and tc.zero_stage == 1:
        raise LlmpyError("--zero-stage 1 shards AdamW's state over ranks, but this is one process; "
                         "start several with mpirun -np N llmpy train ...")
    if world == 1 and tc.dist != "auto" and not dist.launched_by_mpi():
        say(f"--dist {tc.dist}: not started by an MPI launcher (mpirun, srun): one process")
    out = Path(tc.out)

    tc, resume_from, finished_at = _plan_resume(tc, given, out, comm, say)
    if finished_at is not None:
        if finished_at >= tc.steps:
            say(f"{out}: already at step {finished_at} of {tc.steps}; --steps M extends it")
        else:
            say(f"{out}: already at step {finished_at}, at or past --stop-at {tc.stop_at}: nothing to do "
                f"(a later --stop-at, or none, continues it)")
        comm.close()
        return {"out": str(out), "steps": finished_at, "done": True, "rank": comm.rank}
    # the model and its tokenizer before anything is written: a bad --model
    # or --tokenizer ends in one line with no --out directory made and no
    # data prepared
    if resume_from is not None:         # the checkpoint is the model: its shape, then its weights (restore)
        model = families.load(resume_from, device=tc.device, dtype=tc.dtype)
        init = f"resumed from {resume_from}"
    else:
        model, init = families.build(tc.model, tc.device, tc.dtype, tc.seed, tc.seq_len)
    tokenizer, tokenizer_files, samples_note = run_tokenizer(tc, model, resume_from)
    if tc.device == "cpu" and world == 1:
        # (on a GPU DeviceStep asks; several CPU ranks share a machine, and ZeRO-1 shards m and v)
        check_fits(model, tc.batch_size, tc.seq_len)
    if root:
        out.mkdir(parents=True, exist_ok=True)
    train_pattern, val_pattern = resolve_data(tc, comm)
    if tc.tf32:                 # (before any matmul plan is made: plans keep their compute type)
        model.ops.matmul.use_tf32(True)
    comm.broadcast(model.params.flat, root=0)      # every rank starts from rank 0's weights
    model.params_updated()
    accum = grad_accum_steps(tc, world)
    shard = comm.bounds(model.params.flat.size) if tc.zero_stage == 1 else None
    optimizer = AdamW(model, weight_decay=tc.weight_decay, shard=shard)
    loader = DataLoader(train_pattern, tc.batch_size, tc.seq_len, rank=comm.rank, world_size=world, seed=tc.seed)
    val_loader = DataLoader(val_pattern, tc.batch_size, tc.seq_len, shuffle=False) if val_pattern and root else None
    for data in (loader, val_loader):       # another tokenizer's ids fail here, not as an index error mid-step
        if data is not None:
            data.check_vocab(model.config.vocab_size, tc.model)
    val_steps = tc.val_steps if tc.val_steps > 0 or val_loader is None else val_loader.num_windows // tc.batch_size
    outliers = Outliers(tc.skip_loss_z, tc.skip_norm_z)
    if tc.hellaswag and root:
        evals.read_hellaswag(tc.hellaswag, tc.hellaswag_limit)      # a wrong file fails now, not at step N
        evals.check_hellaswag_tokenizer(tc.hellaswag, tokenizer, tc.model)
    start = 0
    if resume_from is not None:
        state = ckpt.restore(resume_from, model, optimizer, loader, comm, say)
        start = int(state["step"])
        outliers.load_state_dict(state.get("outliers"))
    if tc.device == "cuda" and world == 1 and tc.cuda_graphs:
        if outliers.active:
            raise LlmpyError("--skip-loss-z / --skip-norm-z decide on the host, between the gradient norm and the "
                             "update; with CUDA graphs the update is recorded with the step: add --no-cuda-graphs")
        # the whole step on the GPU without host syncs, captured as CUDA graphs
        train_step = DeviceStep(model, optimizer, tc.batch_size, tc.seq_len, tc.grad_clip, accum=accum)
    else:
        train_step = HostStep(model, optimizer, comm, accum, tc.grad_clip,
                              before_sync=lambda step: _test_hooks(step, comm), accept=outliers.accept)
    last = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    tokens_per_step = tc.batch_size * tc.seq_len * accum * world
    ranks = f" x {world} ranks ({comm.name}, ZeRO-{tc.zero_stage})" if world > 1 else ""
    say(f"llmpy train: model {tc.model} ({model.num_parameters / 1e6:.1f}M params, "
        f"L={model.config.n_layer} H={model.config.n_head} C={model.config.n_embd}), device {tc.device}, "
        f"B={tc.batch_size} T={tc.seq_len} accum={accum}{ranks} ({tokens_per_step} tokens/step), "
        f"steps {start}->{tc.steps}, data {train_pattern} ({loader.num_tokens:,} tokens), out {out}")
    say(f"init: {init}")
    say(samples_note)
    samples = root and tokenizer is not None       # (rank 0 prints them, if any tokenizer can decode them)
    if val_loader is None and root:
        say("no val data (--val-data not given): the val loss is not measured")
    peak_flops, peak_how = _peak_flops(tc) if root else (None, "")
    flops_per_step = flops_per_token(model.config, tc.seq_len) * tokens_per_step
    if root:
        say(f"mfu: model FLOPs (6N + 12LTC per token) over {peak_how}")
    run = RunLog(out, start, last, tc.steps, tc.progress, tc.log_every or max(1, tc.steps // 20), quiet=not root)
    loss = val_loss = float("nan")
    first_batch = None
    try:
        with StopRequest() as stop:
            for step in range(start + 1, last + 1):          # step = optimizer steps done after this one
                t0 = time.perf_counter()
                lr = _lr(tc, step)
                if tc.overfit_batch:          # the same batches every step (llm.c -a)
                    first_batch = first_batch or [loader.next_batch() for _ in range(accum)]
                    batches = first_batch
                else:
                    batches = [loader.next_batch() for _ in range(accum)]
                loss, norm, applied = train_step(batches, lr, step)
                if math.isfinite(loss) and math.isfinite(norm):
                    ms = (time.perf_counter() - t0) * 1000
                    rec = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
                           "ms": round(ms, 2), "tokens_per_s": round(tokens_per_step / (ms / 1000), 1)}
                    if peak_flops:
                        rec["mfu"] = round(flops_per_step / (ms / 1000) / peak_flops, 4)
                    if not applied:
                        rec["skipped"] = outliers.last_reason
                        run.print(f"step {step}: {outliers.last_reason}; update skipped")
                    if val_loader is not None and tc.val_every and (step % tc.val_every == 0 or step == tc.steps):
                        val_loss = rec["val_loss"] = round(evals.val_loss(model, val_loader, val_steps), 6)
                    if tc.hellaswag and root and (step % tc.hellaswag_every == 0 or step == tc.steps):
                        rec["hellaswag_acc_norm"] = evals.hellaswag(model, tc.hellaswag, tc.hellaswag_limit,
                                                                    tokenizer=tokenizer)["acc_norm"]
                    run.record(rec)
                    if tc.sample_every and step % tc.sample_every == 0 and step != tc.steps and samples:
                        run.print(f"--- sample at step {step} ---\n"
                                  f"{sample_text(model, tokenizer, tc.sample_tokens, step)}\n---")
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
                interrupted = stop.agreed(comm)
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == last or interrupted:
                    ckpt.save(out, step, model, optimizer, loader, comm, tc.to_dict(), tc.keep,
                              extra={"outliers": outliers.state_dict()}, files=tokenizer_files)
                    run.plot()
                if interrupted:
                    raise Interrupted(f"{stop.name} at step {step}: checkpoint {out / f'{ckpt.CKPT_PREFIX}{step:08d}'}"
                                      f" written; llmpy train --out {out} --resume continues",
                                      exit_code=128 + interrupted)
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
    if last == tc.steps and last > start and samples:
        text = sample_text(model, tokenizer, tc.sample_tokens * 2, tc.seed)
        print(f"--- sample after {last} steps ---\n{text}\n---", flush=True)
        summary["sample"] = text
    val = f"val loss {val_loss:.4f}" if math.isfinite(val_loss) else "no val loss in these steps"
    print(f"done: loss {loss:.4f}, {val}; log {out / 'log.jsonl'}, plot {out / 'loss.png'}", flush=True)
    return summary


def _plan_resume(tc: TrainConfig, given: set[str], out: Path, comm, say):
    """(this run's config, the checkpoint to resume from or None, the step a
    run with nothing left to do stands at (finished, or at --stop-at) or
    None). Rank 0 decides whether `out` may be used and which checkpoint
    continues, before anything is written; on resume the saved flags fill in
    those not given (TrainConfig.resumed)."""
    chosen = np.zeros(1, dtype=np.int64)                  # the step of the checkpoint to resume (0: none)
    if comm.rank == 0:
        path = ckpt.claim(out, tc.resume, tc.overwrite, say)
        chosen[0] = 0 if path is None else int(path.name[len(ckpt.CKPT_PREFIX):])
    comm.broadcast(chosen, root=0)
    if not chosen[0]:
        return tc, None, None
    resume_from = out / f"{ckpt.CKPT_PREFIX}{int(chosen[0]):08d}"
    saved = ckpt.read_train_state(resume_from / "train_state.json")
    was_steps = saved.get("train_config", {}).get("steps")
    tc, notes = tc.resumed(saved.get("train_config", {}), given)
    tc.check()
    for note in notes:
        say(note)
    if saved["step"] >= tc.steps or (tc.stop_at is not None and saved["step"] >= tc.stop_at):
        return tc, resume_from, saved["step"]
    if was_steps is not None and tc.steps != was_steps:
        # the schedule is a function of the total: recomputed over the new one
        lr_then = lr_at(saved["step"], tc.lr, was_steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_frac,
                        tc.decay_frac)
        say(f"resume: --steps {was_steps} -> {tc.steps}: the LR schedule is recomputed over {tc.steps} steps "
            f"(the next step's LR {lr_then:.3g} -> {_lr(tc, saved['step'] + 1):.3g})")
    return tc, resume_from, None


def _lr(tc: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (1, 2, ...)."""
    return lr_at(step - 1, tc.lr, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_frac, tc.decay_frac)


def _peak_flops(tc: TrainConfig) -> tuple[float | None, str]:
    """The FLOP/s MFU is measured against, and what it is: on the CPU the
    sgemm rate of this machine, measured now (three 2048^3 matmuls, the best);
    on the GPU a dense bf16 (or fp32) matmul measured now."""
    from .bench import cupy_matmul_tflops, sgemm_gflops
    if tc.device == "cpu":
        rate = sgemm_gflops(n=2048, reps=3, dtype=tc.dtype)
        how = "MKL's bf16 GEMM" if tc.dtype == "bf16" else "NumPy's BLAS"
        return rate * 1e9, f"the {'bf16 GEMM' if tc.dtype == 'bf16' else 'sgemm'} rate measured now " \
                           f"({rate:.0f} GFLOP/s, 2048^3 through {how})"
    try:
        tflops, how = cupy_matmul_tflops(tc.dtype)
    except ImportError as e:            # (the CPU tests' stand-in for CuPy has no matmul to time)
        return None, f"no matmul peak ({e}): no mfu"
    return (None, how) if tflops is None else (tflops * 1e12, f"{how}, measured now ({tflops:.0f} TFLOP/s)")


# ---------------------------------------------------------------------- stopping and skipping


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption, Slurm before its time
    limit) while training: the current optimizer step finishes, a checkpoint
    is written and the run exits 130 / 143. A second SIGINT aborts at once;
    checkpoints are written under a temporary name and renamed when complete,
    so an abort never leaves one that looks valid."""

    def __init__(self):
        self.signum = 0
        self._saved = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():    # handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt                 # the second Ctrl-C: stop now
        self.signum = signum
        print(f"llmpy train: {signal.Signals(signum).name}: finishing this step, then a checkpoint "
              "(Ctrl-C again aborts without one)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return "interrupted (SIGINT)" if self.signum == signal.SIGINT else "terminated (SIGTERM)"

    def agreed(self, comm) -> int:
        """The signal to stop for, the same on every rank (0: go on): a signal
        that reached any rank stops them all after the same step."""
        if comm.world_size > 1:
            anyone = comm.all_reduce_scalar(float(self.signum))
            if anyone and not self.signum:
                self.signum = signal.SIGTERM
        return self.signum


class Outliers:
    """llm.c's outlier skipping (-sl, -sg): the update of a step whose loss or
    gradient norm lies more than z standard deviations above the mean of the
    last WINDOW accepted values is skipped (0: off). Only once the window is
    full: a mean of a few values says little."""
    WINDOW = 128

    def __init__(self, loss_z: float, norm_z: float):
        self.limits = {"loss": loss_z, "norm": norm_z}
        self.history = {"loss": [], "norm": []}
        self.last_reason = ""

    @property
    def active(self) -> bool:
        return any(self.limits.values())

    def accept(self, loss: float, norm: float) -> bool:
        for name, x in (("loss", loss), ("norm", norm)):
            z_max, past = self.limits[name], self.history[name]
            if z_max and len(past) >= self.WINDOW:
                mean = sum(past) / len(past)
                std = math.sqrt(sum((v - mean) ** 2 for v in past) / len(past))
                if std > 0 and (x - mean) / std > z_max:
                    self.last_reason = f"{name} {x:.4g} is {(x - mean) / std:.1f} std above its running mean"
                    return False
        for name, x in (("loss", loss), ("norm", norm)):
            self.history[name] = (self.history[name] + [x])[-self.WINDOW:]
        return True

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.history.items()}

    def load_state_dict(self, state: dict | None):
        if state:
            self.history = {k: [float(x) for x in state.get(k, [])][-self.WINDOW:] for k in self.history}


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


def run_tokenizer(tc: TrainConfig, model, resume_from: Path | None):
    """(the tokenizer of this run's samples or None, {name: bytes} of its
    files for every checkpoint, the line that says which): --tokenizer, else
    the tokenizer.json of the directory the weights come from (--model DIR;
    on resume the checkpoint, which holds the run's copy), else GPT-2's for
    GPT-2's vocabulary (hf_tokenizer.model_tokenizer). Read once: a
    checkpoint never depends on a file that may have moved since the start."""
    from .data.hf_tokenizer import model_tokenizer
    source = resume_from if resume_from is not None else families.build_dir(tc.model)
    tokenizer, what = model_tokenizer(model.config.vocab_size, tc.tokenizer, source)
    if tokenizer is None:
        return None, {}, (f"samples: none ({what}; --tokenizer TOK, the tokenizer.json the data was prepared "
                          "with, decodes them)")
    files = {name: path.read_bytes() for name, path in tokenizer.files().items()}
    return tokenizer, files, f"samples: decoded with {what}"


def sample_text(model, tokenizer, n_tokens: int, seed: int) -> str:
    """A sample from the start of a document (the tokenizer's end-of-text
    token, as the shards separate documents) to the model's end of text."""
    from .data.hf_tokenizer import decode_sampled
    from .inference import end_ids, generate
    ids = generate(model, [tokenizer.eot], n_tokens, temperature=1.0, top_k=40, seed=seed,
                   eot=end_ids(model.config, tokenizer))
    return decode_sampled(tokenizer, ids)


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
