"""Text generation: temperature, top-k and top-p (nucleus) sampling, with a KV cache.

Sampling one token from the model's logits z (a vector over the vocabulary):
    p = softmax(z / temperature)        temperature < 1 sharpens, > 1 flattens;
                                        temperature 0 means argmax (greedy)
    top-k: keep the k largest p, zero the rest
    top-p: keep the smallest set of most likely tokens whose mass is >= p
then renormalize and draw. Both filters remove the long tail of unlikely
tokens that, summed over a long sample, would otherwise derail it.

Decoding. With use_cache=True (the default) the prompt is run once (the
"prefill") and each new token then costs one position: the keys and values of
earlier positions are kept in a KV cache (model.py). use_cache=False recomputes
the whole context every token: the same numbers, kept as the reference and for
backends without cached attention. When the context outgrows block_size, both
look at the last block_size tokens only; the cache has to be refilled then,
because GPT-2's positions are absolute and sliding the window changes them all.
"""
from __future__ import annotations

import numpy as np

from .errors import LlmpyError


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """The distribution sample_next draws from: float64 (V,), zeros where filtered.
    temperature <= 0 gives a one-hot on the argmax."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        probs = np.zeros_like(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[0]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)   # ties with the k-th survive
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs, kind="stable")
        # keep token i (in descending order) while the mass BEFORE it is < top_p:
        # the smallest prefix whose mass reaches top_p
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None) -> int:
    """One token id from a (V,) vector of logits."""
    if temperature <= 0:
        return int(np.argmax(np.asarray(logits)))
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return int(rng.choice(probs.shape[0], p=probs))


def _host(x):
    return x if isinstance(x, np.ndarray) else x.get()   # CuPy arrays -> NumPy


class _FullRecompute:
    """Last-position logits by a forward() over the whole (windowed) context.
    The context is laid into a fixed (1, window) buffer so the model's
    activations are allocated once; causal attention makes the padding after
    the last real token irrelevant."""

    def __init__(self, model, window):
        self.model = model
        self.buf = np.zeros((1, window), dtype=np.int64)

    def __call__(self, ctx):
        tail = ctx[-self.buf.shape[1]:]
        self.buf[0, :len(tail)] = tail
        logits, _ = self.model.forward(self.buf)
        return _host(logits[0, len(tail) - 1])


class _Cached:
    """Last-position logits with a KV cache: only tokens not yet in the cache
    are run. If the context no longer fits, the cache is refilled with the
    last max_T tokens (the same window _FullRecompute sees)."""

    def __init__(self, model, window):
        self.model = model
        self.cache = model.new_kv_cache(1, window)

    def __call__(self, ctx):
        if len(ctx) <= self.cache.max_T:
            new = ctx[self.cache.pos:]               # the prompt once, then one token a step
        else:
            self.cache.reset()
            new = ctx[-self.cache.max_T:]
        logits = self.model.forward_cached(np.asarray([new], dtype=np.int64), self.cache)
        return _host(logits[0])


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             seed=0, eot=50256, stop_at_eot=True, use_cache=True) -> list[int]:
    """Token ids that continue prompt_ids (the prompt not included). Stops after
    max_new_tokens, or before an <|endoftext|> (eot) when stop_at_eot. An
    empty prompt starts from <|endoftext|>, as GPT-2 was trained."""
    if max_new_tokens < 0:
        raise LlmpyError(f"number of tokens to sample must be >= 0, got {max_new_tokens}")
    rng = np.random.default_rng(seed)
    ctx = list(prompt_ids) or [eot]
    out = []
    if max_new_tokens == 0:
        return out
    # the longest context we will ever look at
    window = min(model.config.block_size, len(ctx) + max_new_tokens - 1)
    last_logits = (_Cached if use_cache else _FullRecompute)(model, window)
    for _ in range(max_new_tokens):
        tok = sample_next(last_logits(ctx), rng, temperature, top_k, top_p)
        if stop_at_eot and tok == eot:
            break
        ctx.append(tok)
        out.append(tok)
    return out
