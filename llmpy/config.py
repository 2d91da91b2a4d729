"""Model configuration (GPTConfig) and the presets from DESIGN.md."""
from __future__ import annotations

from dataclasses import asdict, dataclass

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


@dataclass
class TrainConfig:
    """Every `llmpy train` flag, in one place (the CLI maps onto this 1:1)."""
    data: str | None = None             # glob of train shards; None: the embedded pydoc corpus
    val_data: str | None = None         # glob of val shards; None: pydoc's val split (with default data)
    model: str = "d4"                   # preset name or a model directory to start from
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 8                 # B: sequences per micro-step
    seq_len: int = 128                  # T
    total_batch_size: int | None = None  # tokens per optimizer step; None: B * T (no accumulation)
    lr: float = 1e-3
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    steps: int = 400                    # total optimizer steps
    stop_at: int | None = None          # stop (with a checkpoint) after this step; resume later
    val_every: int = 50
    val_steps: int = 10                 # val batches per evaluation
    sample_every: int = 200
    sample_tokens: int = 48
    checkpoint_every: int = 200
    keep: int = 2                       # keep the newest N checkpoints (0: all)
    out: str = "out"
    resume: bool = False
    skip_nonfinite: bool = False        # skip a step whose loss or gradient norm is NaN/inf instead of stopping
    cuda_graphs: bool = True            # cuda, one process, no accumulation: replay the step as a CUDA graph
    seed: int = 0
    progress: bool = True               # progress bar (off: one line per val/sample)
    zero_stage: int = 0                 # multi-process: 0 replicates AdamW state, 1 shards it over the ranks
    dist: str = "auto"                  # communicator: auto (MPI/NCCL under mpirun, else none), mpi, nccl
    dist_timeout: float = 1800.0        # seconds one collective may wait for the other ranks (0: for ever)

    def to_dict(self) -> dict:
        return asdict(self)
