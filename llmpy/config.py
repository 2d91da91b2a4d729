"""Configuration: the model's shape (GPTConfig, presets) and every `llmpy train`
flag (TrainConfig).

TrainConfig is the one place a training flag is declared: its name, type,
default, allowed values and help text sit in the field, and `llmpy train`'s
command line is built from the fields (add_arguments), so the CLI, the
checkpoints' train_state.json and the Python API cannot disagree.
`TrainConfig.check()` validates a configuration in one place.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields

from .errors import LlmpyError


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024          # max sequence length (rows of wpe)
    vocab_size: int = 50257         # GPT-2 BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    @property
    def padded_vocab_size(self) -> int:
        # wte has its rows padded up to a multiple of 128 (50257 -> 50304) as in
        # llm.c: friendlier matmul shapes; the padded rows never reach the softmax.
        return (self.vocab_size + 127) // 128 * 128

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise LlmpyError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise LlmpyError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick n_embd as a multiple of n_head")

    def to_dict(self) -> dict:
        return asdict(self)


# name -> (n_layer, n_head, n_embd). d12..d48 are GPT-2 124M/350M/774M/1558M.
_SHAPES = {
    "d2": (2, 2, 128),
    "d4": (4, 4, 256),
    "d6": (6, 6, 384),
    "d12": (12, 12, 768),
    "d24": (24, 16, 1024),
    "d36": (36, 20, 1280),
    "d48": (48, 25, 1600),
}
_HF_NAMES = {"gpt2": "d12", "gpt2-medium": "d24", "gpt2-large": "d36", "gpt2-xl": "d48"}
PRESETS = tuple(_SHAPES) + tuple(_HF_NAMES)


def preset(name: str, **overrides) -> GPTConfig:
    """GPTConfig for a preset name (d2, d4, d6, d12, d24, d36, d48, gpt2, gpt2-medium, ...)."""
    key = _HF_NAMES.get(name, name)
    if key not in _SHAPES:
        raise LlmpyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    n_layer, n_head, n_embd = _SHAPES[key]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


LR_SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")


def _flag(default, help: str, *, choices=None, short: str | None = None, group: str | None = None,
          default_text: str | None = None, metavar: str | None = None):
    """A TrainConfig field with what the command line needs to know about it.
    default_text: how --help names a default that is not a plain value (None)."""
    return field(default=default, metadata={"help": help, "choices": choices, "short": short, "group": group,
                                            "default_text": default_text, "metavar": metavar})


_METAVARS = {int: "N", float: "X", str: "VALUE"}
_DIST = "multi-process training (start with mpirun -np N llmpy train ...)"


@dataclass
class TrainConfig:
    """Every `llmpy train` flag (the command line is built from these fields)."""
    data: str | None = _flag(None, "glob of train shards", default_text="the embedded pydoc corpus",
                             metavar="PATTERN")
    val_data: str | None = _flag(None, "glob of val shards", default_text="pydoc's val split with the default "
                                 "data, else no validation", metavar="PATTERN")
    model: str = _flag("d4", f"preset ({', '.join(PRESETS)}) or a model directory to start from",
                       metavar="PRESET|DIR")
    device: str = _flag("cpu", "where the step runs", choices=DEVICES)
    dtype: str = _flag("fp32", "fp32, or bf16 mixed precision (fp32 master weights; needs --device cuda)",
                       choices=DTYPES)
    batch_size: int = _flag(8, "B: sequences per micro-step", short="-B")
    seq_len: int = _flag(128, "T: tokens per sequence", short="-T")
    total_batch_size: int | None = _flag(None, "tokens per optimizer step (gradient accumulation when larger "
                                         "than B x T x ranks)", default_text="B x T x ranks")
    lr: float = _flag(1e-3, "peak learning rate")
    warmup_steps: int = _flag(20, "linear warmup steps")
    lr_schedule: str = _flag("cosine", "decay after the warmup", choices=LR_SCHEDULES)
    min_lr_frac: float = _flag(0.1, "the schedule ends at this fraction of --lr")
    weight_decay: float = _flag(0.1, "AdamW weight decay (2-D weight matrices only)")
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0: off)")
    steps: int = _flag(400, "total optimizer steps (fixes the LR schedule)")
    stop_at: int | None = _flag(None, "stop after this step with a checkpoint (continue later with --resume)",
                                default_text="run all --steps")
    val_every: int = _flag(50, "measure the val loss every N steps (0: never)")
    val_steps: int = _flag(10, "val batches per measurement")
    sample_every: int = _flag(200, "print a sample every N steps (0: never)")
    sample_tokens: int = _flag(48, "tokens per sample")
    checkpoint_every: int = _flag(200, "write a checkpoint every N steps (and always at the end)")
    keep: int = _flag(2, "keep the newest N checkpoints (0: all)")
    out: str = _flag("out", "output directory: log.jsonl, loss.png, ckpt_*/", metavar="DIR")
    resume: bool = _flag(False, "continue from the newest checkpoint in --out that verifies")
    skip_nonfinite: bool = _flag(False, "skip a step whose loss or gradient norm is NaN/inf instead of stopping")
    cuda_graphs: bool = _flag(True, "on cuda, one process: replay the step as CUDA graphs")
    seed: int = _flag(0, "seed of the weight init and of the data order")
    progress: bool = _flag(True, "a progress bar (off: one line per validation)")
    zero_stage: int = _flag(0, "0: every rank keeps all of AdamW's state; 1: each rank keeps (and updates) one "
                            "slice", choices=(0, 1), group=_DIST)
    dist: str = _flag("auto", "communicator: auto = MPI on CPU ranks / NCCL on GPUs when started by mpirun or "
                      "srun", choices=("auto", "mpi", "nccl"), group=_DIST)
    dist_timeout: float = _flag(1800.0, "seconds a rank waits for the others in one collective before it gives "
                                "up (0: no limit)", group=_DIST)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self):
        """Raise LlmpyError naming the first flag whose value cannot work."""
        for name in ("batch_size", "seq_len", "steps"):
            if getattr(self, name) <= 0:
                raise LlmpyError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise LlmpyError(f"--lr must be a positive number, got {self.lr}")
        for f in fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise LlmpyError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: use one of "
                                 f"{', '.join(map(str, allowed))}")
        if self.dtype == "bf16" and self.device != "cuda":
            raise LlmpyError("--dtype bf16 needs --device cuda; the NumPy backend computes in fp32")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser):
        """One command-line flag per field: --name-with-dashes, its type from
        the default, its help with the real default. A True default becomes
        --X / --no-X, a False one a plain switch."""
        groups = {}
        for f in fields(cls):
            meta, flag = f.metadata, "--" + f.name.replace("_", "-")
            where = parser
            if meta["group"]:
                where = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                       parser.add_argument_group(meta["group"]))
            names = [flag] + ([meta["short"]] if meta["short"] else [])
            if isinstance(f.default, bool):
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                where.add_argument(*names, dest=f.name, action=action, default=f.default,
                                   help=f"{meta['help']} (default: {'on' if f.default else 'off'})")
                continue
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            default = meta["default_text"] if f.default is None else f.default
            where.add_argument(*names, dest=f.name, type=kind, default=f.default, choices=meta["choices"],
                               metavar=None if meta["choices"] else meta["metavar"] or _METAVARS[kind],
                               help=f"{meta['help']} (default: {default})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
