"""GPT-2's parameter layout: the name and shape of every tensor, in order.

This is the layout of the model's flat parameter buffer (llm.c's order, W
stored as (out, in)), of its gradients and of AdamW's m and v, and so also
of an llm.c model file. It lives apart from model.py so that the file
formats (formats/) can size and check what they read without importing
the model class.
"""
from __future__ import annotations

from .config import GPTConfig


def parameter_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every parameter tensor, in llm.c's order."""
    Vp, C, L, maxT = cfg.padded_vocab_size, cfg.n_embd, cfg.n_layer, cfg.block_size
    return [
        ("wte", (Vp, C)),            # token embedding; also the LM head (tied)
        ("wpe", (maxT, C)),          # position embedding
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


# 2-D weight matrices get weight decay; biases and layernorm parameters do not.
DECAYED = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}
