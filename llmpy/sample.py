"""Text generation: temperature, top-k and top-p (nucleus) sampling.

Full recomputation each token (a KV cache is future work): the context is laid
into a fixed (1, T) window so the model's activations are allocated once;
causal attention makes the padding after the last real token irrelevant.
"""
from __future__ import annotations

import numpy as np


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None) -> int:
    """One token id from a (V,) vector of logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[0]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p   # smallest set with mass >= top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             seed=0, eot=50256, stop_at_eot=True) -> list[int]:
    """Token ids that continue prompt_ids (the prompt not included)."""
    rng = np.random.default_rng(seed)
    block = model.config.block_size
    ctx = list(prompt_ids) or [eot]
    window = min(block, len(ctx) + max_new_tokens)
    buf = np.zeros((1, window), dtype=np.int64)
    out = []
    for _ in range(max_new_tokens):
        tail = ctx[-window:]
        buf[0, :len(tail)] = tail
        logits, _ = model.forward(buf)
        last = logits[0, len(tail) - 1]
        last = last if isinstance(last, np.ndarray) else model.xp.asnumpy(last)
        tok = sample_next(last, rng, temperature, top_k, top_p)
        if stop_at_eot and tok == eot:
            break
        ctx.append(tok)
        out.append(tok)
    return out
