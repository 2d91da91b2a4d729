"""Llama 3's shape: its config (LlamaConfig, the presets) and its parameter layout.

The flat buffer (parameters, gradients, AdamW's m and v) holds, in order:

    wte       (Vp, C)                    model.embed_tokens (rows >= V: padding, as GPT-2's)
    ln1w      (L, C)                     input_layernorm
    qkvw      (L, (NH + 2 NKV) hs, C)    q_proj, k_proj, v_proj stacked: one matmul
    attprojw  (L, C, NH hs)              o_proj
    ln2w      (L, C)                     post_attention_layernorm
    fcw       (L, 2 I, C)                gate_proj, up_proj stacked: one matmul
    fcprojw   (L, C, I)                  down_proj
    lnfw      (C,)                       model.norm
    lm_head   (Vp, C)                    only when the head is untied

Weights stored (out, in), as HF's nn.Linear does (so q_proj is a row slice
of qkvw, no transpose). No biases anywhere. This module knows no model class
and no backend, so formats/ can size and check a file with it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import LlmpyError


@dataclass(frozen=True)
class LlamaConfig:
    block_size: int = 1024          # max_position_embeddings: the longest sequence the rope table covers
    vocab_size: int = 50257
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 4              # num_key_value_heads: each serves n_head / n_kv_head query heads
    n_embd: int = 256
    intermediate_size: int = 768    # the SwiGLU MLP's width I
    head_dim: int = 0               # 0: n_embd // n_head (HF's default)
    rope_theta: float = 500000.0
    # Llama 3.1's rope_scaling of type "llama3": None, or a dict with factor,
    # low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # config.json's bos_token_id and eos_token_id (an id, or several: Llama 3
    # Instruct ends a turn at any of three), kept so that a fine-tune's
    # checkpoint says what the model it came from said; None: not known
    # (a random init: the tokenizer the data was made with decides)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def hs(self) -> int:
        """The head size (HF's head_dim)."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def qkv_size(self) -> int:
        """Width of the fused q, k, v projection: (NH + 2 NKV) hs."""
        return (self.n_head + 2 * self.n_kv_head) * self.hs

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a text, per config.json (none when not known)."""
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else eos

    @property
    def padded_vocab_size(self) -> int:
        # as GPT-2's: rows padded to a multiple of 128 (128256 already is one)
        return (self.vocab_size + 127) // 128 * 128

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise LlmpyError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
        if self.n_head % self.n_kv_head:
            raise LlmpyError(f"LlamaConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}; "
                             "each key/value head must serve the same number of query heads")
        if not self.head_dim and self.n_embd % self.n_head:
            raise LlmpyError(f"LlamaConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             "give head_dim, or pick n_embd as a multiple of n_head")
        if self.hs % 2:
            raise LlmpyError(f"LlamaConfig: head size {self.hs} is odd; rotary embeddings rotate pairs of channels")
        if isinstance(self.eos_token_id, list):       # config.json's list, kept immutable as a tuple
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name, several in (("bos_token_id", False), ("eos_token_id", True)):
            if not _token_ids_ok(getattr(self, name), several):
                raise LlmpyError(f"LlamaConfig.{name} must be a token id (an integer >= 0)"
                                 f"{', a non-empty list of them' if several else ''} or null, "
                                 f"got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            want = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            missing = want - set(self.rope_scaling)
            if missing:
                raise LlmpyError(f"LlamaConfig.rope_scaling lacks {sorted(missing)}: llama3 scaling needs {sorted(want)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _token_ids_ok(value, several: bool) -> bool:
    """None, an id (an int >= 0, not a bool), or (several) a non-empty tuple of ids."""
    ids = value if several and isinstance(value, tuple) and value else (value,)
    return value is None or all(type(i) is int and i >= 0 for i in ids)


# Llama 3.1 / 3.2's rope scaling (their config.json's rope_scaling).
def _llama3_scaling(factor: float) -> dict:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


# name -> config. llama3-tiny is CPU-sized (about 16M parameters, 12.9M of
# them the GPT-2-vocabulary embedding: it trains on the GPT-2 shards); the
# others are Meta's shapes (their config.json), for memory_estimate and the GPU.
PRESETS = {
    "llama3-tiny": LlamaConfig(),
    "llama3.2-1b": LlamaConfig(block_size=131072, vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8,
                               n_embd=2048, intermediate_size=8192, head_dim=64,
                               rope_scaling=_llama3_scaling(32.0), tie_word_embeddings=True),
    "llama3.2-3b": LlamaConfig(block_size=131072, vocab_size=128256, n_layer=28, n_head=24, n_kv_head=8,
                               n_embd=3072, intermediate_size=8192, head_dim=128,
                               rope_scaling=_llama3_scaling(32.0), tie_word_embeddings=True),
    "llama3.1-8b": LlamaConfig(block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8,
                               n_embd=4096, intermediate_size=14336, head_dim=128,
                               rope_scaling=_llama3_scaling(8.0), tie_word_embeddings=False),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset(name: str, seq_len: int = 0, **overrides) -> LlamaConfig:
    """The config of preset `name`, its context at least seq_len, with any field overridden."""
    if name not in PRESETS:
        raise LlmpyError(f"unknown Llama preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], **overrides)
    return replace(cfg, block_size=seq_len) if seq_len > cfg.block_size else cfg


def parameter_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every parameter tensor, in the flat buffer's order."""
    Vp, C, L, I = cfg.padded_vocab_size, cfg.n_embd, cfg.n_layer, cfg.intermediate_size
    shapes = [
        ("wte", (Vp, C)),
        ("ln1w", (L, C)),
        ("qkvw", (L, cfg.qkv_size, C)),
        ("attprojw", (L, C, cfg.n_head * cfg.hs)),
        ("ln2w", (L, C)),
        ("fcw", (L, 2 * I, C)),
        ("fcprojw", (L, C, I)),
        ("lnfw", (C,)),
    ]
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head", (Vp, C)))
    return shapes


# The matrices get weight decay; the RMSNorm gains do not (llm.c's
# train_llama3.py: every parameter of two or more dimensions).
DECAYED = {"wte", "qkvw", "attprojw", "fcw", "fcprojw", "lm_head"}
