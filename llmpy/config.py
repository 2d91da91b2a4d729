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
import re
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import LlmpyError
from .llama_layout import PRESETS as LLAMA_PRESETS


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


# Model descriptors, as llm.c's train_gpt2.cu reads them.
# name -> (n_layer, n_head, n_embd). d12..d48 are GPT-2 124M/350M/774M/1558M;
# d60..d84 continue llm.c's table past GPT-2's sizes.
_SHAPES = {
    "d2": (2, 2, 128),
    "d4": (4, 4, 256),
    "d6": (6, 6, 384),
    "d12": (12, 12, 768),
    "d24": (24, 16, 1024),
    "d36": (36, 20, 1280),
    "d48": (48, 25, 1600),
    "d60": (60, 30, 1920),
    "d72": (72, 30, 2880),
    "d84": (84, 36, 3456),
}
_HF_NAMES = {"gpt2": "d12", "gpt2-medium": "d24", "gpt2-large": "d36", "gpt2-xl": "d48"}
PRESETS = tuple(_SHAPES) + tuple(_HF_NAMES)
# gpt3:cN, the GPT-3 paper's shapes by width: channels -> (depth, head size),
# context 2048. (The paper's 13B row says 5140 channels but 40 heads of 128:
# 5120, which is what c5140 means here.)
_GPT3 = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128), 2560: (32, 80),
         4096: (32, 128), 5120: (40, 128), 12288: (96, 128)}
MAX_DEPTH = 128         # dN beyond this (C = 8192, ~100B parameters) is a typo, not a model
PRESET_FORMS = (f"{', '.join(_SHAPES)}, dN for any other depth N <= {MAX_DEPTH} (head size 64, C = 64 N), "
                f"gpt3:cN with N in {', '.join(str(c) for c in _GPT3)} (context 2048)")


def _shape(name: str) -> tuple[int, int, int, int] | None:
    """(n_layer, n_head, n_embd, context) of a model descriptor, None if `name` is none."""
    key = _HF_NAMES.get(name, name)
    if key in _SHAPES:
        return (*_SHAPES[key], 1024)
    m = re.fullmatch(r"gpt3:c(\d+)", key)
    if m:
        channels = 5120 if int(m.group(1)) == 5140 else int(m.group(1))
        if channels not in _GPT3:
            return None
        depth, head_size = _GPT3[channels]
        return depth, channels // head_size, channels, 2048
    m = re.fullmatch(r"d([1-9]\d*)", key)
    if m and int(m.group(1)) <= MAX_DEPTH:
        depth = int(m.group(1))
        return depth, depth, 64 * depth, 1024
    return None


def is_preset(name: str) -> bool:
    return _shape(name) is not None


def preset(name: str, seq_len: int = 0, **overrides) -> GPTConfig:
    """GPTConfig of a model descriptor (PRESET_FORMS; and gpt2, gpt2-medium, ...
    as their shapes), its context GPT-2's 1024 positions (GPT-3's 2048), or
    seq_len if that is longer."""
    shape = _shape(name)
    if shape is None:
        raise LlmpyError(f"unknown model {name!r}; a model is one of {PRESET_FORMS}")
    n_layer, n_head, n_embd, context = shape
    overrides.setdefault("block_size", max(seq_len, context))
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)


LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")
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
    model: str = _flag("d4", f"{PRESET_FORMS}: random init from --seed; {', '.join(LLAMA_PRESETS)}: a random "
                       f"Llama 3 from --seed; {', '.join(_HF_NAMES)}: "
                       "OpenAI's pretrained weights (downloaded once by huggingface_hub, then read from its "
                       "cache, HF_HUB_CACHE); a path: the weights of a Hugging Face model directory (GPT-2 or "
                       "Llama) or an llm.c .bin model (fine-tuning)", metavar="NAME|PATH")
    tokenizer: str | None = _flag(None, "the tokenizer.json (or a directory holding one) that turns the model's ids "
                                  "into text: the periodic samples, and a copy in every checkpoint; the one the "
                                  "data was prepared with (llmpy prepare --tokenizer)",
                                  default_text="the --model directory's tokenizer.json, else GPT-2's for GPT-2's "
                                  "vocabulary, else none and no samples", metavar="TOK")
    device: str = _flag("cpu", "where the step runs", choices=DEVICES)
    dtype: str = _flag("fp32", "fp32, or bf16 mixed precision (fp32 master weights; on the CPU bf16 matmul "
                       "inputs through Intel MKL: pip install 'llmpy[cpu-bf16]', pays with AMX)",
                       choices=DTYPES)
    tf32: bool = _flag(False, "fp32 on cuda: matmuls on TF32 tensor cores (inputs rounded to 10 mantissa bits, "
                       "fp32 sums; several times faster, no longer equal to the CPU reference to 1e-6)")
    batch_size: int = _flag(8, "B: sequences per micro-step", short="-B")
    seq_len: int = _flag(128, "T: tokens per sequence", short="-T")
    total_batch_size: int | None = _flag(None, "tokens per optimizer step (gradient accumulation when larger "
                                         "than B x T x ranks)", default_text="B x T x ranks")
    lr: float = _flag(1e-3, "peak learning rate")
    warmup_steps: int = _flag(20, "linear warmup steps")
    lr_schedule: str = _flag("cosine", "decay after the warmup (wsd: warmup, stable, then a linear decay over "
                             "the last --decay-frac of the steps)", choices=LR_SCHEDULES)
    decay_frac: float = _flag(0.2, "wsd: the fraction of the steps, at the end, over which the LR decays")
    min_lr_frac: float = _flag(0.1, "the schedule ends at this fraction of --lr")
    weight_decay: float = _flag(0.1, "AdamW weight decay (2-D weight matrices only)")
    grad_clip: float = _flag(1.0, "clip the global gradient norm to this (0: off)")
    steps: int = _flag(400, "total optimizer steps (fixes the LR schedule)")
    stop_at: int | None = _flag(None, "stop after this step with a checkpoint (continue later with --resume)",
                                default_text="run all --steps")
    val_every: int = _flag(50, "measure the val loss every N steps (0: never)")
    val_steps: int = _flag(10, "val batches per measurement (-1: one whole pass over the val data)")
    hellaswag: str | None = _flag(None, "a HellaSwag file (.jsonl, or llm.c's hellaswag_val.bin) to score during "
                                  "training", default_text="none", metavar="FILE")
    hellaswag_every: int = _flag(0, "score --hellaswag every N steps and at the end: acc_norm in log.jsonl (0: never)")
    hellaswag_limit: int | None = _flag(None, "score only the first N HellaSwag examples",
                                        default_text="all of them")
    sample_every: int = _flag(200, "print a sample every N steps (0: never)")
    sample_tokens: int = _flag(48, "tokens per sample")
    checkpoint_every: int = _flag(200, "write a checkpoint every N steps (and always at the end)")
    keep: int = _flag(2, "keep the newest N checkpoints (0: all)")
    out: str = _flag("out", "output directory: log.jsonl, loss.png, ckpt_*/", metavar="DIR")
    resume: bool = _flag(False, "continue the run in --out from its newest checkpoint that verifies, with its "
                         "saved flags unless given again")
    overwrite: bool = _flag(False, "start over in an --out that holds a run (its checkpoints and log are deleted)")
    skip_nonfinite: bool = _flag(False, "skip a step whose loss or gradient norm is NaN/inf instead of stopping")
    cuda_graphs: bool = _flag(True, "on cuda, one process: replay the step as CUDA graphs")
    seed: int = _flag(0, "seed of the weight init and of the data order")
    progress: bool = _flag(True, "a progress bar on a terminal (off, or not a terminal: plain lines)")
    log_every: int | None = _flag(None, "plain lines: one every N steps", default_text="steps / 20")
    skip_loss_z: float = _flag(0.0, "skip the update when the loss is more than Z standard deviations above its "
                               "running mean (0: off; llm.c -sl)")
    skip_norm_z: float = _flag(0.0, "skip the update when the gradient norm is more than Z standard deviations "
                               "above its running mean (0: off; llm.c -sg)")
    overfit_batch: bool = _flag(False, "train on the first batch over and over (a correctness check; llm.c -a)")
    zero_stage: int = _flag(0, "0: every rank keeps all of AdamW's state; 1: each rank keeps (and updates) one "
                            "slice", choices=(0, 1), group=_DIST)
    dist: str = _flag("auto", "communicator: auto = MPI on CPU ranks / NCCL on GPUs when started by mpirun or "
                      "srun", choices=("auto", "mpi", "nccl"), group=_DIST)
    dist_timeout: float = _flag(1800.0, "seconds a rank waits for the others in one collective before it gives "
                                "up (0: no limit)", group=_DIST)

    def to_dict(self) -> dict:
        return asdict(self)

    # numeric flags that must be > 0 (None, where allowed, means "not set") and >= 0
    POSITIVE = frozenset({"batch_size", "seq_len", "total_batch_size", "lr", "steps", "stop_at", "log_every",
                          "hellaswag_limit"})
    NON_NEGATIVE = frozenset({"warmup_steps", "min_lr_frac", "weight_decay", "grad_clip", "val_every",
                              "sample_every", "sample_tokens", "checkpoint_every", "keep", "seed", "dist_timeout",
                              "hellaswag_every",
                              "skip_loss_z", "skip_norm_z"})

    def check(self):
        """Raise LlmpyError naming the first flag whose value cannot work."""
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.name in self.POSITIVE and value is not None and not (math.isfinite(value) and value > 0):
                raise LlmpyError(f"{flag} must be positive, got {value}")
            if f.name in self.NON_NEGATIVE and not (math.isfinite(value) and value >= 0):
                raise LlmpyError(f"{flag} must be >= 0, got {value}")
        for f in fields(self):
            allowed = f.metadata["choices"]
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise LlmpyError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: use one of "
                                 f"{', '.join(map(str, allowed))}")
        if self.resume and self.overwrite:
            raise LlmpyError("--resume continues the run in --out, --overwrite deletes it: choose one")
        if self.val_steps == 0 or self.val_steps < -1:
            raise LlmpyError(f"--val-steps must be positive, or -1 for a whole pass, got {self.val_steps}")
        if not 0 < self.decay_frac <= 1:
            raise LlmpyError(f"--decay-frac must be in (0, 1], got {self.decay_frac}")
        if self.min_lr_frac > 1:
            raise LlmpyError(f"--min-lr-frac is a fraction of --lr, at most 1, got {self.min_lr_frac}")
        if self.stop_at is not None and self.stop_at > self.steps:
            raise LlmpyError(f"--stop-at {self.stop_at} is past --steps {self.steps}")
        if bool(self.hellaswag) != bool(self.hellaswag_every):
            raise LlmpyError("--hellaswag FILE and --hellaswag-every N go together (one names the file, the other "
                             "how often)")
        if self.tf32 and (self.device, self.dtype) != ("cuda", "fp32"):
            raise LlmpyError("--tf32 is for fp32 matmuls on a GPU: --device cuda --dtype fp32")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser):
        """One command-line flag per field: --name-with-dashes, its type from
        the default, its help with the real default. A True default becomes
        --X / --no-X, a False one a plain switch. A flag not given leaves no
        attribute (argparse.SUPPRESS), so given_flags() can tell what the
        user typed: --resume keeps the saved value of every flag not given."""
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
                where.add_argument(*names, dest=f.name, action=action, default=argparse.SUPPRESS,
                                   help=f"{meta['help']} (default: {'on' if f.default else 'off'})")
                continue
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            default = meta["default_text"] if f.default is None else f.default
            where.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS, choices=meta["choices"],
                               metavar=None if meta["choices"] else meta["metavar"] or _METAVARS[kind],
                               help=f"{meta['help']} (default: {default})")

    @classmethod
    def given_flags(cls, args: argparse.Namespace) -> set[str]:
        """The fields the command line set (see add_arguments)."""
        return {f.name for f in fields(cls) if hasattr(args, f.name)}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The flags given, the defaults for the rest."""
        return cls(**{name: getattr(args, name) for name in cls.given_flags(args)})

    # --resume: flags a run does not remember (where it is, how it is shown,
    # when this invocation stops, how this invocation's ranks share the work:
    # a resume with another world re-cuts the state, see checkpoint.restore;
    # the tokenizer: every checkpoint holds a copy of it, read on resume),
    # and flags whose change makes the resumed run differ from one that never
    # stopped (the batches it sees)
    NOT_REMEMBERED = frozenset({"resume", "overwrite", "out", "stop_at", "progress", "log_every", "zero_stage",
                                "dist", "dist_timeout", "tokenizer"})
    BITWISE = frozenset({"batch_size", "seq_len", "total_batch_size", "data", "seed", "overfit_batch"})

    def resumed(self, saved: dict, given: set[str]) -> tuple["TrainConfig", list[str]]:
        """This run's configuration when it resumes a run saved with `saved`:
        the saved value of every flag not given on the command line, the given
        value of the others; and the lines that tell the user what changed."""
        names = {f.name for f in fields(self)}
        kept = {k: v for k, v in saved.items() if k in names and k not in given | self.NOT_REMEMBERED}
        tc = replace(self, **kept)
        changed = sorted(n for n in given - self.NOT_REMEMBERED if n in saved and saved[n] != getattr(tc, n))
        notes = []
        if changed:
            notes.append("resume: " + ", ".join(f"--{n.replace('_', '-')} {saved[n]} -> {getattr(tc, n)}"
                                                for n in changed))
        breaking = [n for n in changed if n in self.BITWISE]
        if breaking:
            notes.append(f"resume: {', '.join('--' + n.replace('_', '-') for n in breaking)} changed: training "
                         "goes on, but on other batches than the saved run would have seen (not bitwise)")
        if "model" in changed:
            notes.append("resume: --model is ignored: the weights and their shape come from the checkpoint")
        return tc, notes
