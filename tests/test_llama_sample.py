"""Sampling a Llama with the KV cache: against full recomputation and against transformers.

The models are test_llama_vs_transformers' small random pairs (an HF
LlamaForCausalLM in float64 and the llmpy Llama holding the same weights,
0.15-scaled so that the next token moves with the context), for multi-head,
grouped-query and multi-query attention. The references: llmpy's forward()
over the whole sequence (checked against transformers there), generate with
use_cache=False (the whole window recomputed per token), and transformers'
own greedy generate and its own KV cache (rotated keys, NKV heads).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_llama_vs_transformers import CASES, SCALING, make_pair, rel_err

from llmpy.inference import KVCache, forward_cached, generate
from llmpy.llama import Llama

RTOL = 1e-5


@pytest.fixture(scope="module")
def pairs():
    made = {}

    def get(heads, tied=True, scaling=None):
        key = (heads, tied, scaling is not None)
        if key not in made:
            made[key] = make_pair(**CASES[heads], tied=tied, scaling=scaling)
        return made[key]
    return get


def with_block(model, block):
    """The same weights in a model of context `block` (RoPE has no table of weights to cut)."""
    small = Llama(replace(model.config, block_size=block), init=False)
    small.set_params(model.ops.to_host(model.params.flat))
    return small


@pytest.mark.parametrize("heads,tied,scaling", [(h, tied, None) for h in CASES for tied in (True, False)]
                         + [("gqa", False, SCALING)],
                         ids=[f"{h}-{'tied' if tied else 'untied'}" for h in CASES for tied in (True, False)]
                         + ["gqa-untied-llama3-rope"])
def test_prefill_then_one_token_per_call_matches_forward(pairs, heads, tied, scaling):
    """Prefill 5 tokens, then one per call: the logits at every position, and
    the default last-position logits, equal forward() on the whole sequence."""
    model, _ = pairs(heads, tied, scaling)
    V = model.config.vocab_size
    ids = np.random.default_rng(3).integers(0, V, size=(2, 24))
    full = model.forward(ids)[0].copy()
    cache = KVCache(model, B=2)
    parts = [forward_cached(model, ids[:, :5], cache, all_logits=True)]
    parts += [forward_cached(model, ids[:, s:s + 1], cache, all_logits=True) for s in range(5, 24)]
    cached = np.concatenate(parts, axis=1)
    assert cache.pos == 24 and cached.shape == full.shape
    errs = [rel_err(cached[:, s], full[:, s]) for s in range(24)]
    assert max(errs) < RTOL, f"positions off: {[s for s, e in enumerate(errs) if not e < RTOL]}"
    for t in (1, 13):
        cache.reset()
        last = forward_cached(model, ids[:, :t], cache)
        assert last.shape == (2, V)
        assert rel_err(last, full[:, t - 1]) < RTOL


def test_several_tokens_per_call_after_the_prefill(pairs):
    """Chunks of new tokens: the causal mask inside the new block, for GQA."""
    model, _ = pairs("gqa")
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, size=(1, 20))
    full = model.forward(ids)[0].copy()
    cache = KVCache(model)
    parts = [forward_cached(model, ids[:, a:b], cache, all_logits=True) for a, b in ((0, 3), (3, 11), (11, 20))]
    assert rel_err(np.concatenate(parts, axis=1), full) < RTOL


@pytest.mark.parametrize("heads", list(CASES))
@pytest.mark.parametrize("prompt_len,n_new", [(1, 40), (6, 40), (25, 12)])
def test_greedy_cached_equals_recompute_past_the_context(pairs, heads, prompt_len, n_new):
    """Token for token with a context of 16: 40 new tokens move the window
    (generate's half-window refill) several times; a 25-token prompt starts
    from its last 16."""
    model = with_block(pairs(heads)[0], 16)
    prompt = np.random.default_rng(prompt_len).integers(0, model.config.vocab_size, size=prompt_len).tolist()
    with_cache = generate(model, prompt, n_new, temperature=0, stop_at_eot=False, use_cache=True)
    without = generate(model, prompt, n_new, temperature=0, stop_at_eot=False, use_cache=False)
    assert len(with_cache) == n_new
    assert with_cache == without
    assert len(set(with_cache)) > 3, "degenerate model: the test would prove little"


def test_sampled_cached_equals_recompute(pairs):
    model = with_block(pairs("mqa")[0], 16)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7, stop_at_eot=False)
    assert generate(model, [5, 17, 42], 30, **kw) == generate(model, [5, 17, 42], 30, use_cache=False, **kw)


@pytest.mark.parametrize("heads,tied,scaling", [("mha", True, None), ("gqa", False, None), ("mqa", True, None),
                                                ("gqa", True, SCALING)],
                         ids=["mha-tied", "gqa-untied", "mqa-tied", "gqa-tied-llama3-rope"])
def test_greedy_generate_matches_transformers(pairs, heads, tied, scaling):
    """transformers' greedy generate (float64, its own KV cache) on the same
    weights: the same 20 new tokens."""
    model, hm = pairs(heads, tied, scaling)
    prompt = np.random.default_rng(5).integers(0, model.config.vocab_size, size=7).tolist()
    ids = torch.tensor([prompt])
    hf = hm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                     do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = generate(model, prompt, 20, temperature=0, stop_at_eot=False)
    assert len(hf) == 20
    assert ours == hf
    assert len(set(ours)) > 3, "degenerate model: the test would prove little"


@pytest.mark.parametrize("heads", list(CASES))
def test_cache_holds_nkv_rotated_heads_like_transformers(pairs, heads):
    """k, v (L, B, NKV, max_T, hs): NKV heads, not NH; after a prefill each
    layer's keys (RoPE at their absolute positions) and values equal those in
    transformers' own cache."""
    model, hm = pairs(heads)
    cfg = model.config
    cache = KVCache(model, B=2, max_T=12)
    assert cache.k.shape == cache.v.shape == (cfg.n_layer, 2, cfg.n_kv_head, 12, cfg.hs)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 9))
    forward_cached(model, ids[:, :4], cache)
    forward_cached(model, ids[:, 4:], cache)
    out = hm(input_ids=torch.tensor(ids), use_cache=True)
    hf_cache = out["cache"] if "cache" in out else out["past_key_values"]
    for l in range(cfg.n_layer):
        assert rel_err(cache.k[l, :, :, :9], hf_cache.layers[l].keys.detach().numpy()) < 1e-4
        assert rel_err(cache.v[l, :, :, :9], hf_cache.layers[l].values.detach().numpy()) < 1e-4


def test_head_dim_apart_from_embedding_width(pairs):
    """head_dim 12 with n_embd 32, 4 query and 2 key/value heads: the cache's
    heads are head_dim wide, and the cached logits still equal forward()."""
    cfg = replace(pairs("gqa")[0].config, head_dim=12)
    model = Llama(cfg, seed=3)
    cache = KVCache(model)
    assert cache.k.shape[2:] == (2, cfg.block_size, 12)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(1, 10))
    full = model.forward(ids)[0].copy()
    parts = [forward_cached(model, ids[:, :4], cache, all_logits=True)]
    parts += [forward_cached(model, ids[:, s:s + 1], cache, all_logits=True) for s in range(4, 10)]
    assert rel_err(np.concatenate(parts, axis=1), full) < RTOL
