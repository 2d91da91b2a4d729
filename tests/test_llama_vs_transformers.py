"""llmpy.llama.Llama against transformers' LlamaForCausalLM (offline, random small configs).

The reference runs in float64 with perturbed weights (random RMSNorm gains
too, so a gain applied in the wrong place shows); llmpy loads the same
weights through its HF names (state_dict / load_state_dict) and runs in
float32. Logits, the mean cross-entropy and every parameter's gradient must
agree within 1e-4 relative (L2), for multi-head and grouped-query
attention, tied and untied heads, with and without Llama 3.1's rope scaling.
Then llmpy's AdamW against torch.optim.AdamW over 5 steps, within 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from llmpy.llama import Llama, rope_inv_freq
from llmpy.llama_layout import LlamaConfig, preset
from llmpy.optim import AdamW

RTOL = 1e-4
STEP_RTOL = 1e-5

# llama3 scaling whose three frequency bands are all present at head size 8
# with theta 1e4 (wavelengths 6.3, 63, 628, 6283 against bounds 128/4 and 128/1)
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.linalg.norm(b) > 0
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_pair(n_head=4, n_kv_head=2, tied=True, scaling=None, seed=0, vocab=300, dtype=torch.float64):
    """An HF LlamaForCausalLM with perturbed weights and the llmpy Llama holding the same ones."""
    cfg = LlamaConfig(block_size=256, vocab_size=vocab, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=32,
                      intermediate_size=48, rope_theta=10000.0, rope_scaling=scaling, rms_norm_eps=1e-5,
                      tie_word_embeddings=tied)
    hcfg = HFLlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=256,
                         rope_theta=10000.0, rope_scaling=None if scaling is None else {"rope_type": "llama3", **scaling},
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, attn_implementation="eager")
    torch.manual_seed(seed)
    hm = LlamaForCausalLM(hcfg).to(dtype)
    with torch.no_grad():
        for name, p in hm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model = Llama(cfg, init=False)
    model.load_state_dict({k: v.detach().numpy() for k, v in hm.state_dict().items()})
    return model, hm


def batch(rng, B, T, V):
    ids = rng.integers(0, V, size=(B, T))
    return ids, rng.integers(0, V, size=(B, T))


def hf_loss(hm, ids, targets):
    logits = hm(input_ids=torch.tensor(ids)).logits
    return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1))


@pytest.fixture
def rng():
    return np.random.default_rng(99)


CASES = {"mha": dict(n_head=4, n_kv_head=4), "gqa": dict(n_head=4, n_kv_head=2), "mqa": dict(n_head=4, n_kv_head=1)}


@pytest.mark.parametrize("scaling", [None, SCALING], ids=["plain-rope", "llama3-rope"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("heads", list(CASES))
def test_logits_loss_and_grads_match_transformers(rng, heads, tied, scaling):
    model, hm = make_pair(**CASES[heads], tied=tied, scaling=scaling)
    ids, targets = batch(rng, 2, 16, model.config.vocab_size)
    logits, loss = model.forward(ids, targets)
    hlogits, hloss = hf_loss(hm, ids, targets)
    assert rel_err(logits, hlogits.detach().numpy()) < RTOL
    assert abs(loss - hloss.item()) / hloss.item() < RTOL
    model.zero_grad()
    model.backward()
    hloss.backward()
    grads = model.grads_dict()
    hgrads = {n: p.grad.numpy() for n, p in hm.named_parameters()}
    assert set(grads) == set(hgrads)                         # every parameter, under HF's names
    assert ("lm_head.weight" in grads) == (not tied)
    errs = {n: rel_err(grads[n], hgrads[n]) for n in hgrads}
    bad = {n: e for n, e in errs.items() if not e < RTOL}
    assert not bad, f"gradients off: {bad}"


def test_forward_without_targets_and_padded_vocabulary(rng):
    model, hm = make_pair()
    assert model.config.padded_vocab_size == 384 > model.config.vocab_size
    ids, _ = batch(rng, 3, 7, model.config.vocab_size)
    logits, loss = model.forward(ids)
    assert loss is None and logits.shape == (3, 7, 300)
    assert rel_err(logits, hm(input_ids=torch.tensor(ids)).logits.detach().numpy()) < RTOL


def test_state_dict_round_trips_hf_names():
    model, hm = make_pair(tied=False)
    sd = model.state_dict()
    assert "model.layers.1.self_attn.k_proj.weight" in sd
    hsd = hm.state_dict()
    for name, t in sd.items():
        np.testing.assert_allclose(t, hsd[name].numpy(), rtol=1e-7)      # float64 -> float32 rounding only


def test_rope_frequencies_match_hf_llama3_rule():
    # Llama 3.2 1B's own rope parameters, through HF's init function
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = preset("llama3.2-1b")
    hcfg = HFLlamaConfig(hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head, head_dim=cfg.hs,
                         max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta,
                         rope_scaling={"rope_type": "llama3", **cfg.rope_scaling})
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](hcfg, "cpu")
    assert scale == 1.0
    ours = rope_inv_freq(cfg)
    assert rel_err(ours, inv_freq.double().numpy()) < 1e-6
    plain = rope_inv_freq(LlamaConfig(n_embd=2048, n_head=32, rope_theta=cfg.rope_theta))
    assert np.sum(ours < plain * 0.99) > 0 and np.sum(ours == plain) > 0   # some scaled, some kept


# ---------------------------------------------------------------------------- AdamW

def five_steps_match_torch(model, hm, rng, start):
    """llmpy AdamW over the flat buffer (decay on model.decayed: the matrices)
    vs torch.optim.AdamW (decay on the 2-D parameters), both from the same
    weights (`start`: the state dict they began from): the loss of every step
    and the weights after 5 steps within 1e-5."""
    lr, betas, eps, wd = 1e-3, (0.9, 0.95), 1e-8, 0.1
    opt = AdamW(model, betas=betas, eps=eps, weight_decay=wd)
    decay = [p for p in hm.parameters() if p.ndim >= 2]
    no_decay = [p for p in hm.parameters() if p.ndim < 2]
    hopt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)
    losses = []
    ids, targets = batch(rng, 2, 16, model.config.vocab_size)     # one batch: the loss must fall
    for t in range(1, 6):
        model.zero_grad()
        _, loss = model.forward(ids, targets)
        model.backward()
        opt.step(lr, t)
        hopt.zero_grad()
        _, hloss = hf_loss(hm, ids, targets)
        hloss.backward()
        hopt.step()
        losses.append(hloss.item())
        assert abs(loss - hloss.item()) / hloss.item() < STEP_RTOL, f"step {t}: {loss} vs {hloss.item()}"
    assert losses[-1] < losses[0]
    sd, hsd = model.state_dict(), hm.state_dict()
    moved = rel_err(sd["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert moved > 10 * STEP_RTOL                              # the weights did move
    bad = {n: e for n in sd if not (e := rel_err(sd[n], hsd[n].numpy())) < STEP_RTOL}
    assert not bad, f"weights after 5 steps off: {bad}"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_adamw_five_steps_match_torch(rng, tied):
    model, hm = make_pair(tied=tied, scaling=SCALING, dtype=torch.float32)
    five_steps_match_torch(model, hm, rng, {k: v.copy() for k, v in model.state_dict().items()})


def test_finetuning_a_saved_directory_matches_torch(rng, tmp_path):
    # fine-tuning as a user does it: transformers writes a (sharded) Llama
    # directory, llmpy loads it (families.load, by config.json's model_type),
    # and both train from there
    from llmpy import families
    from llmpy.llama import Llama
    _, hm = make_pair(n_head=4, n_kv_head=2, tied=False, scaling=SCALING, dtype=torch.float32)
    hm.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = families.load(tmp_path)
    assert isinstance(model, Llama)
    five_steps_match_torch(model, hm, rng, {k: v.copy() for k, v in model.state_dict().items()})
