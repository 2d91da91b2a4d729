"""Sampling: the KV cache against full recomputation, and the sampling filters.

The model is tiny and random, with weights scaled up from GPT-2's 0.02 init so
that the next-token distribution is far from uniform and changes with the
context: a cache that attended to the wrong positions would change the greedy
tokens within a few steps.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import llmpy
from llmpy.errors import LlmpyError
from llmpy.inference import KVCache, forward_cached, generate, next_token_probs, sample_next

VOCAB = 100
BLOCK = 32


def make_model(seed=0, block=BLOCK, n_layer=2, n_head=4, n_embd=64):
    cfg = llmpy.GPTConfig(block_size=block, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = llmpy.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    C = n_embd
    # wpe large (the prediction moves with the position) and the attention/MLP
    # projections large (it depends on the context too): greedy decoding then
    # wanders over many tokens instead of repeating the last one (the LM head
    # is tied to wte, so a weak random model just copies its input).
    for name, std in (("wte", 0.3), ("wpe", 1.0), ("qkvw", 1.0 / math.sqrt(C)), ("fcw", 1.0 / math.sqrt(C)),
                      ("attprojw", 3.0 / math.sqrt(C)), ("fcprojw", 3.0 / math.sqrt(4 * C))):
        v = model.params.views[name]
        v = v[:VOCAB] if name == "wte" else v
        v[...] = std * rng.standard_normal(v.shape, dtype=np.float32)
    for name in ("qkvb", "fcb", "ln1b", "ln2b", "lnfb"):
        v = model.params.views[name]
        v[...] = 0.1 * rng.standard_normal(v.shape, dtype=np.float32)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------- KV cache

def test_cached_logits_match_full_forward(model):
    """Prefill 5 tokens, then one token per call: every position's logits, and
    the default last-position logits, equal forward() on the whole sequence."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(2, 24))
    full, _ = model.forward(ids)
    full = full.copy()
    cache = KVCache(model, B=2)
    parts = [forward_cached(model, ids[:, :5], cache, all_logits=True)]
    for t in range(5, 24):
        parts.append(forward_cached(model, ids[:, t:t + 1], cache, all_logits=True))
    assert cache.pos == 24
    assert rel(np.concatenate(parts, axis=1), full) < 1e-5
    for t in (1, 9, 24):
        cache.reset()
        last = forward_cached(model, ids[:, :t], cache)
        assert last.shape == (2, VOCAB)
        assert rel(last, full[:, t - 1]) < 1e-5


def test_cached_forward_in_chunks(model):
    """Several tokens per call after the prefill (a mask inside the new block)."""
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(1, 20))
    full, _ = model.forward(ids)
    full = full.copy()
    cache = KVCache(model)
    parts = [forward_cached(model, ids[:, a:b], cache, all_logits=True) for a, b in ((0, 3), (3, 11), (11, 20))]
    assert rel(np.concatenate(parts, axis=1), full) < 1e-5


def test_cache_overflow_is_an_error(model):
    cache = KVCache(model, max_T=4)
    forward_cached(model, np.zeros((1, 4), dtype=np.int64), cache)
    with pytest.raises(LlmpyError, match="no room"):
        forward_cached(model, np.zeros((1, 1), dtype=np.int64), cache)
    with pytest.raises(LlmpyError, match="block_size"):
        KVCache(model, max_T=BLOCK + 1)


@pytest.mark.parametrize("prompt_len,n_new", [(1, 20), (6, 20), (20, 30), (40, 8)])
def test_greedy_cached_equals_recompute(model, prompt_len, n_new):
    """Token for token, including contexts that outgrow block_size (32): the
    cache is refilled from the window exactly when full recomputation moves it."""
    prompt = np.random.default_rng(prompt_len).integers(0, VOCAB, size=prompt_len).tolist()
    with_cache = generate(model, prompt, n_new, temperature=0, stop_at_eot=False, use_cache=True)
    without = generate(model, prompt, n_new, temperature=0, stop_at_eot=False, use_cache=False)
    assert len(with_cache) == n_new
    assert with_cache == without
    if n_new >= 20:
        assert len(set(with_cache)) > 3, "degenerate model: the test would prove little"


def test_sampled_cached_equals_recompute(model):
    prompt = [5, 17, 42]
    a = generate(model, prompt, 25, temperature=0.9, top_k=20, top_p=0.95, seed=7, stop_at_eot=False)
    b = generate(model, prompt, 25, temperature=0.9, top_k=20, top_p=0.95, seed=7, stop_at_eot=False,
                 use_cache=False)
    assert a == b


# ---------------------------------------------------------------------------- sampling

def test_top_k_1_is_greedy(model):
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(model, prompt, 15, temperature=0, stop_at_eot=False)
    for seed in (0, 1):
        assert generate(model, prompt, 15, temperature=1.5, top_k=1, seed=seed, stop_at_eot=False) == greedy


def test_seed_reproduces(model):
    run = lambda seed: generate(model, [9, 9], 20, temperature=1.0, seed=seed, stop_at_eot=False)  # noqa: E731
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_top_p_keeps_smallest_set_with_mass_p():
    probs = np.array([0.05, 0.4, 0.3, 0.15, 0.1])
    logits = np.log(probs)
    # descending: 0.4, 0.3, 0.15, 0.1, 0.05; cumulative 0.4, 0.7, 0.85, 0.95, 1.0
    for p, kept in ((0.3, {1}), (0.4, {1}), (0.41, {1, 2}), (0.7, {1, 2}), (0.8, {1, 2, 3}), (0.9, {1, 2, 3, 4})):
        q = next_token_probs(logits, top_p=p)
        assert set(np.flatnonzero(q)) == kept, p
        np.testing.assert_allclose(q[list(kept)], probs[list(kept)] / probs[list(kept)].sum())
    rng = np.random.default_rng(0)
    draws = {sample_next(logits, rng, top_p=0.7) for _ in range(200)}
    assert draws == {1, 2}


def test_top_k_and_temperature():
    logits = np.array([1.0, 3.0, 2.0, 0.0])
    q = next_token_probs(logits, top_k=2)
    assert set(np.flatnonzero(q)) == {1, 2}
    # temperature divides the logits: T=0.5 doubles the log-odds
    q = next_token_probs(logits, temperature=0.5)
    np.testing.assert_allclose(np.log(q[1] / q[2]), 2 * (3.0 - 2.0))
    assert sample_next(logits, np.random.default_rng(0), temperature=0) == 1


def test_eot_stops_generation(model):
    """Make token 7 the argmax everywhere by boosting its LM-head row along the
    final layernorm's bias; with eot=7 greedy generation stops at once, and with
    stop_at_eot=False it produces 7s."""
    m = make_model(seed=2)
    m.params.lnfw[...] = 0.0                 # final hidden state = lnfb for every position
    m.params.lnfb[...] = 1.0
    m.params.wte[7] = 5.0                    # logit of 7 = 5 C, the largest
    for use_cache in (True, False):
        assert generate(m, [1, 2, 3], 10, temperature=0, eot=7, use_cache=use_cache) == []
        assert generate(m, [1, 2, 3], 3, temperature=0, eot=7, stop_at_eot=False, use_cache=use_cache) == [7, 7, 7]


# ---------------------------------------------------------------------------- past the context

def window_rule(prompt_len, n_new, block):
    """The windows the module docstring promises, written out independently:
    ctx[start:] for each new token, start moving to len(ctx) - block // 2
    whenever the window would exceed block tokens."""
    start, length, starts = max(0, prompt_len - block), prompt_len, []
    for _ in range(n_new):
        if length - start > block:
            start = length - block // 2
        starts.append(start)
        length += 1
    return starts


def test_past_the_context_uses_the_documented_windows():
    """Greedy tokens past block_size (16) are the argmax of forward() on exactly
    the windows of the docstring's rule, for the cache and for full recompute;
    the model sees between block/2 and block tokens."""
    block = 16
    m = make_model(seed=3, block=block)
    prompt = [4, 8, 15, 16, 23]
    n_new = 60
    starts = window_rule(len(prompt), n_new, block)
    assert all(block // 2 <= len(prompt) + i - s <= block for i, s in enumerate(starts) if len(prompt) + i >= block)
    ctx, want = list(prompt), []
    for s in starts:
        logits, _ = m.forward(np.asarray([ctx[s:]]))
        want.append(int(np.argmax(logits[0, -1])))
        ctx.append(want[-1])
    assert len(set(want[block:])) > 3, "degenerate model: the test would prove little"
    for use_cache in (True, False):
        assert generate(m, prompt, n_new, temperature=0, stop_at_eot=False, use_cache=use_cache) == want


def test_long_prompt_starts_from_its_last_block_tokens():
    block = 16
    m = make_model(seed=4, block=block)
    prompt = np.random.default_rng(5).integers(0, VOCAB, size=40).tolist()
    logits, _ = m.forward(np.asarray([prompt[-block:]]))
    assert generate(m, prompt, 1, temperature=0, stop_at_eot=False) == [int(np.argmax(logits[0, -1]))]


def test_refills_are_amortised(monkeypatch):
    """Past the context the cache is refilled once per block/2 new tokens, not
    once per token: count the multi-token calls of forward_cached."""
    import llmpy.inference as inference
    block, n_new = 32, 200
    m = make_model(seed=6, block=block)
    calls = []
    real = inference.forward_cached
    monkeypatch.setattr(inference, "forward_cached",
                        lambda model, ids, cache, **kw: calls.append(ids.shape[1]) or real(model, ids, cache, **kw))
    out = generate(m, [1, 2, 3], n_new, temperature=0, stop_at_eot=False)
    assert len(out) == n_new == len(calls)
    refills = sum(t > 1 for t in calls[1:])         # calls[0] is the prompt's prefill
    past = 3 + n_new - 1 - block                     # tokens sampled past the context: 170
    assert refills == len(set(window_rule(3, n_new, block))) - 1 == 10
    assert refills <= past / (block // 2)            # (refilling every token: 170)
    assert all(t == block // 2 for t in calls[1:] if t > 1)


@pytest.mark.parametrize("kwargs,flag", [({"temperature": -1.0}, "--temperature"), ({"temperature": float("nan")},
                         "--temperature"), ({"temperature": float("inf")}, "--temperature"),
                         ({"top_k": 0}, "--top-k"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
                         ({"top_p": float("nan")}, "--top-p")])
def test_sampling_settings_are_checked(model, kwargs, flag):
    with pytest.raises(LlmpyError, match=flag):
        generate(model, [1], 3, **kwargs)
    with pytest.raises(LlmpyError, match="--tokens"):
        generate(model, [1], -1)
    assert len(generate(model, [1], 3, top_p=1.0, top_k=1, stop_at_eot=False)) == 3     # the bounds themselves
