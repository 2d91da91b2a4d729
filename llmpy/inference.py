"""Inference: the KV-cache forward pass, sampling and text generation.

KV cache. To sample token n+1, forward() recomputes all n positions, but with
causal attention the keys and values of positions < n never change once
computed (position s only sees positions <= s). Keeping them per layer turns
each new token into O(n) attention work plus one row of every matmul, instead
of n rows. forward_cached runs the model's own blocks (the family's
block_forward) on the new tokens only, with an attention that appends their
keys and values to the cache and attends over everything cached. Per family:

    GPT-2     NH key/value heads of C / NH; positions enter at the embedding
              (wpe rows [pos, pos + t)); memory 2 L B NH max_T hs = 2 L B max_T C
    Llama 3   NKV key/value heads of hs (grouped-query: each read by NH / NKV
              query heads, so the cache is NH / NKV times smaller); the keys
              are cached rotated (RoPE at their absolute positions), and the
              new tokens' q and k are rotated at positions [pos, pos + t)

Past the context. The model reads at most block_size tokens, and the cache
cannot slide by one: when the window moves, its first token leaves the
context of every later position, so every hidden state and therefore every
key and value above the first layer changes (and GPT-2's positions are
absolute, wpe, so even the first layer's do). Refilling the whole window for
every token makes each token cost a block_size-token forward. Instead, when
the window is full, generate() keeps its last half, refills the cache with
those block_size/2 tokens once (one batched forward, "prefill"), and goes on
one token at a time until the window is full again:

    window of the next token = ctx[start:],   start fixed while len(ctx) - start <= block_size,
                               then start = len(ctx) - block_size // 2
    cost: one refill of block_size/2 tokens per block_size/2 new tokens,
          i.e. per token about the cost of a token inside the context.

The trade-off: once past the context, the model sees between block_size/2
and block_size tokens of context (a sliding window would always give it
block_size, at block_size times the cost). A prompt longer than block_size
starts from its last block_size tokens.

Sampling one token from the model's logits z (a vector over the vocabulary):
    p = softmax(z / temperature)        temperature < 1 sharpens, > 1 flattens;
                                        temperature 0 means argmax (greedy)
    top-k: keep the k largest p, zero the rest
    top-p: keep the smallest set of most likely tokens whose mass is >= p
then renormalize and draw. Both filters remove the long tail of unlikely
tokens that, summed over a long sample, would otherwise derail it.

Decoding. With use_cache=True (the default) the prompt is run once (the
"prefill") and each new token then costs one position. use_cache=False
recomputes the whole window every token: the same windows, the same numbers,
kept as the reference.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import LlmpyError
from .formats.hf import GPT2_EOT_ID, GPT2_VOCAB_SIZE
from .llama import Llama
from .model import GPT
from .ops.shared import gqa_heads, split_heads

# ---------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of the positions seen so far: k, v (L, B, H, max_T, hs),
    for B sequences of up to max_T (<= block_size) positions; H and hs are the
    family's key/value heads and their size (GPT-2: NH of C / NH; Llama: NKV of hs)."""

    def __init__(self, model, B: int = 1, max_T: int | None = None):
        cfg = model.config
        max_T = cfg.block_size if max_T is None else max_T
        if not 0 < max_T <= cfg.block_size:
            raise LlmpyError(f"KV cache length {max_T} must be in [1, block_size={cfg.block_size}]")
        kv_heads, _ = _family(model)
        H, hs = kv_heads(cfg)
        shape = (cfg.n_layer, B, H, max_T, hs)
        self.k = model.xp.zeros(shape, dtype=model.storage)
        self.v = model.xp.zeros(shape, dtype=model.storage)
        self.B, self.max_T = B, max_T
        self.pos = 0                 # positions filled: the next token's position

    def reset(self):
        """Forget everything (the arrays are reused)."""
        self.pos = 0


def forward_cached(model, ids, cache: KVCache, all_logits: bool = False):
    """Logits of t new tokens at positions [cache.pos, cache.pos + t), for
    either family.

    ids (B, t) ints. Their keys and values are appended to `cache`, and
    attention looks at every cached position before them, so a prompt fed
    in one call (the "prefill") and then one token per call gives the same
    logits as forward() on the whole sequence. Returns a new array: the
    logits of the last new position (B, V), or of all of them (B, t, V).
    """
    ops, cfg, xp = model.ops, model.config, model.xp
    ids = model._check_ids(ids, "ids")
    B, t = ids.shape
    pos = cache.pos
    if B != cache.B:
        raise LlmpyError(f"ids have batch {B} but the KV cache was made for batch {cache.B}")
    if pos + t > cache.max_T:
        raise LlmpyError(f"KV cache holds {cache.max_T} positions, {pos} used: no room for {t} more; "
                         "start a new cache with the last block_size tokens")
    _, new_tokens = _family(model)
    y = xp.empty((B, cfg.n_head, t, cache.k.shape[-1]), dtype=model.storage)

    def attend(l, atty, q, k, v):
        # q (B, NH, t, hs), k, v (B, H, t, hs) of the new tokens: k, v go into
        # the cache, q attends over it; atty (B t, NH hs) gets the heads merged
        cache.k[l, :, :, pos:pos + t] = k
        cache.v[l, :, :, pos:pos + t] = v
        ops.attention_forward_cached(y, q, cache.k[l, :, :, :pos + t], cache.v[l, :, :, :pos + t], pos)
        atty.reshape(B, t, cfg.n_head, -1)[...] = y.transpose(0, 2, 1, 3)

    lnf, head = new_tokens(model, ids, pos, attend)
    cache.pos = pos + t

    # Only the rows we return go through the LM head (the largest matmul: V x C per row).
    C = cfg.n_embd
    rows = lnf if all_logits else xp.ascontiguousarray(lnf.reshape(B, t, C)[:, -1])
    logits = xp.empty((rows.shape[0], cfg.vocab_size), dtype=model.storage)
    ops.matmul_forward(logits, rows, head[:cfg.vocab_size], None)
    return logits.reshape(B, t, cfg.vocab_size) if all_logits else logits


# Each family's forward over t new tokens at positions [pos, pos + t): its
# embedding, its own block_forward on one block's buffers for the t rows
# (reused by every block), its final norm. attend(l, atty, q, k, v) is block
# l's attention (forward_cached's). Returns (final norm (B t, C), LM head).

def _rows(model, N, stats, **widths):
    """One block's buffers for N rows: (N, width) of the storage type per
    keyword, (N,) float32 per name in stats (norm statistics stay float32)."""
    xp = model.xp
    return SimpleNamespace(**{name: xp.empty((N, w), dtype=model.storage) for name, w in widths.items()},
                           **{name: xp.empty(N, dtype=np.float32) for name in stats})


def _gpt_new_tokens(model, ids, pos, attend):
    ops, cfg, p = model.ops, model.config, model.compute_params
    B, t = ids.shape
    C, NH = cfg.n_embd, cfg.n_head
    a = _rows(model, B * t, ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd"),
              x=C, ln1=C, qkv=3 * C, atty=C, residual2=C, ln2=C, fch=4 * C, fch_gelu=4 * C, residual3=C, lnf=C)

    def attention(atty, qkv, l):      # (N, 3C) -> q, k, v each (B, NH, t, hs)
        attend(l, atty, *split_heads(qkv.reshape(B, t, 3 * C), B, t, NH))

    x = a.x
    ops.encoder_forward(x.reshape(B, t, C), ids, p.wte, p.wpe[pos:pos + t])   # absolute positions of the new tokens

    def next_ln(l):   # the layernorm after block l writes into the one set of buffers
        if l + 1 < cfg.n_layer:
            return a.ln1, a.ln1_mean, a.ln1_rstd, p.ln1w[l + 1], p.ln1b[l + 1]
        return a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb
    out, mean, rstd, w, b = next_ln(-1)
    ops.layernorm_forward(out, mean, rstd, x, w, b)
    for l in range(cfg.n_layer):
        x = model.block_forward(l, x, a, next_ln(l), lambda atty, qkv, l=l: attention(atty, qkv, l))
    return a.lnf, p.wte                                       # the head is tied to wte


def _llama_new_tokens(model, ids, pos, attend):
    ops, cfg, p = model.ops, model.config, model.compute_params
    B, t = ids.shape
    C, NH, NKV, hs, I = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.hs, cfg.intermediate_size
    a = _rows(model, B * t, ("ln1_rstd", "ln2_rstd", "lnf_rstd"), x=C, ln1=C, qkv=cfg.qkv_size, atty=NH * hs,
              residual2=C, ln2=C, fch=2 * I, fch_swiglu=I, residual3=C, lnf=C)
    cos, sin = (c[pos:] for c in model.rope(pos + t))        # the angles of positions [pos, pos + t)

    def attention(atty, qkv, l):
        # rotate q, k in place, then the GQA layout: NH query heads, NKV key heads, NKV value heads
        model._rotate_qk(qkv, B, t, cos, sin)
        attend(l, atty, *gqa_heads(qkv.reshape(B, t, -1), B, t, NH, NKV))

    x = a.x
    ops.embedding_forward(x.reshape(B, t, C), ids, p.wte)    # no positions here: RoPE carries them

    def next_norm(l):   # the RMSNorm after block l writes into the one set of buffers
        if l + 1 < cfg.n_layer:
            return a.ln1, a.ln1_rstd, p.ln1w[l + 1], cfg.rms_norm_eps
        return a.lnf, a.lnf_rstd, p.lnfw, cfg.rms_norm_eps
    ops.rmsnorm_forward(*next_norm(-1)[:2], x, *next_norm(-1)[2:])
    for l in range(cfg.n_layer):
        x = model.block_forward(l, x, a, next_norm(l), lambda atty, qkv, l=l: attention(atty, qkv, l))
    return a.lnf, p.views[model.head]


# model class -> (its cache's key/value heads and their size, its forward over new tokens)
_FAMILIES = {GPT: (lambda cfg: (cfg.n_head, cfg.n_embd // cfg.n_head), _gpt_new_tokens),
             Llama: (lambda cfg: (cfg.n_kv_head, cfg.hs), _llama_new_tokens)}


def _family(model):
    for cls, family in _FAMILIES.items():
        if isinstance(model, cls):
            return family
    raise LlmpyError(f"{type(model).__name__} has no KV-cache forward (llmpy/inference.py _FAMILIES); "
                     "sample with use_cache=False")


# ---------------------------------------------------------------------- sampling and generation


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


class _FullRecompute:
    """Last-position logits by a forward() over the whole window ctx[start:].
    The window is laid into a fixed (1, max_T) buffer so the model's
    activations are allocated once; causal attention makes the padding after
    the last real token irrelevant."""

    def __init__(self, model, max_T):
        self.model = model
        self.buf = np.zeros((1, max_T), dtype=np.int64)

    def __call__(self, ctx, start):
        window = ctx[start:]
        self.buf[0, :len(window)] = window
        logits, _ = self.model.forward(self.buf)
        return self.model.ops.to_host(logits[0, len(window) - 1])


class _Cached:
    """Last-position logits of the window ctx[start:] with a KV cache: only the
    window's tokens not yet in the cache are run. A new start (the window
    moved) empties the cache, and the next call refills it from the window."""

    def __init__(self, model, max_T):
        self.model = model
        self.cache = KVCache(model, 1, max_T)
        self.start = 0

    def __call__(self, ctx, start):
        if start != self.start:
            self.cache.reset()
            self.start = start
        new = ctx[start + self.cache.pos:]          # a whole window once, then one token a call
        logits = forward_cached(self.model, np.asarray([new], dtype=np.int64), self.cache)
        return self.model.ops.to_host(logits[0])


def check_sampling(temperature, top_k, top_p, max_new_tokens):
    """One LlmpyError line naming the first setting out of its range."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise LlmpyError(f"--temperature {temperature}: must be a finite number >= 0 (0: greedy)")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 1):
        raise LlmpyError(f"--top-k {top_k}: must be an integer >= 1 (leave it out for no top-k filter)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise LlmpyError(f"--top-p {top_p}: must be in (0, 1] (1: no top-p filter)")
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0):
        raise LlmpyError(f"--tokens {max_new_tokens}: the number of tokens to sample must be an integer >= 0")


def end_ids(config, tokenizer=None) -> tuple[int, ...]:
    """The ids that end a text for a model of this config: its config.json's
    eos_token_id (a Llama's: one id or several), else the end-of-text token
    of the tokenizer its data was made with, else GPT-2's <|endoftext|> for
    GPT-2's vocabulary (either family); () when none is known."""
    ids = getattr(config, "eos_ids", ())         # (GPTConfig has none: GPT-2's is fixed)
    if ids:
        return ids
    if tokenizer is not None:
        return (tokenizer.eot,)
    return (GPT2_EOT_ID,) if config.vocab_size == GPT2_VOCAB_SIZE else ()


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             seed=0, eot=None, stop_at_eot=True, use_cache=True, progress=None) -> list[int]:
    """Token ids that continue prompt_ids (the prompt not included). Stops after
    max_new_tokens, or before an end-of-text token when stop_at_eot: eot is
    one id or several, None the model's own (end_ids: config.json's
    eos_token_id; GPT-2's <|endoftext|>, 50256, for GPT-2's vocabulary). An
    empty prompt starts from the (first) end-of-text token, as GPT-2 was
    trained and as llmpy's shards separate documents. Past the context the
    window moves by half of it (module docstring). progress, if given, is
    called with no argument after each new token."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if eot is None:
        ends = end_ids(model.config)
    else:
        ends = (int(eot),) if np.ndim(eot) == 0 else tuple(map(int, eot))
    ctx = list(prompt_ids)
    if not ctx:
        if not ends:
            raise LlmpyError(f"an empty prompt starts from the end-of-text token, but none is known for this "
                             f"model's vocabulary of {model.config.vocab_size:,} ids; give a prompt, or eot=")
        ctx = [ends[0]]
    rng = np.random.default_rng(seed)
    out = []
    if max_new_tokens == 0:
        return out
    block = model.config.block_size
    keep = max(1, block // 2)                       # the window's tokens kept when it moves
    start = max(0, len(ctx) - block)                # a long prompt: its last block_size tokens
    # the longest window we will ever look at: the cache's (and the buffer's) length
    max_T = min(block, len(ctx) + max_new_tokens - 1)
    cached = use_cache and model.has_kv_cache
    last_logits = (_Cached if cached else _FullRecompute)(model, max_T)
    for _ in range(max_new_tokens):
        if len(ctx) - start > block:                # the window is full: keep its last half
            start = len(ctx) - keep
        tok = sample_next(last_logits(ctx, start), rng, temperature, top_k, top_p)
        if stop_at_eot and tok in ends:
            break
        ctx.append(tok)
        out.append(tok)
        if progress is not None:
            progress()
    return out


# ---------------------------------------------------------------------- which model: a run directory or a model


def resolve_model(spec, say) -> tuple[str, Path | None]:
    """(what families.load reads, the training checkpoint directory or None)
    for `llmpy sample/eval SPEC`. A run directory of `llmpy train` (no
    config.json, ckpt_* inside) means its newest checkpoint that verifies
    (checkpoint.verify_checkpoint, read-only); say(text) tells which, and
    which newer ones it skipped and why. A checkpoint directory, any model
    directory, an llm.c .bin or a hub name is passed on as it is."""
    from .checkpoint import list_checkpoints, newest_verified
    path = Path(spec)
    if not path.is_dir() or (path / "config.json").exists():
        is_ckpt = path.is_dir() and (path / "train_state.json").is_file()
        return str(spec), (path if is_ckpt else None)
    found = list_checkpoints(path)
    if not found:
        raise LlmpyError(f"{path}: no config.json and no ckpt_* checkpoints in it; pass a run directory of "
                         "`llmpy train` (its --out), a checkpoint ckpt_NNNNNNNN, a Hugging Face model directory, "
                         "an llm.c .bin or a hub name such as gpt2")
    ckpt, problems = newest_verified(path)
    if ckpt is not None:
        for name, why in problems:
            say(f"skipping {path / name}: {why}")
        say(f"using {ckpt} (the newest checkpoint that verifies)")
        return str(ckpt), ckpt
    raise LlmpyError(f"{path}: no checkpoint verifies ({'; '.join(f'{n}: {why}' for n, why in problems)}); "
                     "name a model directory, or train again")
