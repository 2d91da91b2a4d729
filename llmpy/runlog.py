"""What a training run shows and keeps: progress on the terminal, log.jsonl, loss.png.

On a terminal (and without --no-progress) a progress bar; otherwise (a batch
job, `| tee`, a file) one plain line every `log_every` steps, and one for
every validation: step, loss, lr, grad norm, tokens/s, MFU, ETA.
log.jsonl has one JSON object per optimizer step (step, loss, lr, grad_norm,
ms, tokens_per_s, mfu, and val_loss when measured); a resumed run keeps the
lines up to its starting step and appends. loss.png plots train and val loss.
Only rank 0 writes or prints (quiet=True on the others).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, out: Path, start: int, stop: int, total: int, progress: bool, log_every: int,
                 quiet: bool = False):
        """Steps start+1 .. stop of a run of `total` steps."""
        self.out, self.quiet, self.total, self.stop, self.log_every = Path(out), quiet, total, stop, log_every
        self.records, self.file, self.bar = [], None, None
        self.t0, self.start, self.lines = time.perf_counter(), start, 0
        if quiet:
            return
        self.records = read_log(self.out / "log.jsonl", start)
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(self.out / "log.jsonl", "a")
        if progress and stop > start and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)

    def print(self, text: str):
        """A line for the user, above the progress bar if there is one."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, rec: dict):
        """Log one finished step."""
        if self.quiet:
            return
        self.records.append(rec)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        val = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
        mfu = f" mfu {rec['mfu']:.1%}" if "mfu" in rec else ""
        if "hellaswag_acc_norm" in rec:
            val += f" hellaswag {rec['hellaswag_acc_norm']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {rec['loss']:.4f}{val} lr {rec['lr']:.2e} "
                                     f"{rec['tokens_per_s']:.0f} tok/s{mfu}", refresh=False)
            self.bar.update(1)
            return
        step = rec["step"]
        if val or self.lines == 0 or step % self.log_every == 0 or step == self.stop:
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / done * (self.stop - step)
            print(f"step {step}/{self.total} loss {rec['loss']:.4f}{val} lr {rec['lr']:.2e} "
                  f"norm {rec['grad_norm']:.3f} {rec['tokens_per_s']:.0f} tok/s{mfu} eta {_duration(eta)}",
                  flush=True)
            self.lines += 1

    def skipped(self):
        """A step that made no update (and has no log line) still moves the bar."""
        if self.bar is not None:
            self.bar.update(1)

    def plot(self):
        if not self.quiet and self.records:
            plot_losses(self.records, self.out / "loss.png")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def read_log(path: Path, upto_step: int) -> list[dict]:
    """The records of log.jsonl up to step upto_step (a line cut short by a crash is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("step", 0) <= upto_step:
            records.append(r)
    return records


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
