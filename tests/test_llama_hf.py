"""Llama as a Hugging Face directory, both ways, offline, on small random models.

    llmpy -> transformers   formats.save_model writes config.json + model.safetensors;
                            LlamaForCausalLM.from_pretrained loads it with no missing or
                            unexpected tensor and gives our logits
    transformers -> llmpy   save_pretrained's directories (sharded with an index; bfloat16)
                            through families.load give transformers' logits
    config.json             ours -> transformers -> ours, transformers' own spelling
                            (rope_parameters), Meta's Llama 3.2 1B file
    bad input               one LlmpyError line naming the file (and the field or shard)

Logits agree within 1e-4 relative (L2), as tests/test_llama_vs_transformers.py:
the reference runs in float64 on the same weights, llmpy in float32.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from llmpy import families, formats
from llmpy.errors import LlmpyError
from llmpy.formats import hf_llama
from llmpy.llama import Llama
from llmpy.llama_layout import PRESETS, LlamaConfig, preset

RTOL = 1e-4
# llama3 scaling whose three frequency bands all show at head size 8, theta 1e4
# (as in test_llama_vs_transformers.py)
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
# grouped-query attention (n_kv_head < n_head) throughout; one head size other than n_embd / n_head
CASES = {
    "tied-llama3rope": LlamaConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                   intermediate_size=48, rope_theta=10000.0, rope_scaling=SCALING),
    "untied-headdim16": LlamaConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
                                    intermediate_size=40, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2, 3)),
}


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_llama(cfg, seed=0):
    """A Llama of cfg whose weights are all far from their init (random RMSNorm
    gains too), so that a tensor in the wrong place shows in the logits."""
    model = Llama(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    sd = {k: (1 + 0.2 * rng.standard_normal(v.shape) if k.endswith("norm.weight")
              else 0.15 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model


def random_hf(cfg, seed=0):
    """transformers' LlamaForCausalLM of the shape of our cfg (its own config,
    not through the config.json we write), with perturbed fp32 weights."""
    hcfg = HFLlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, head_dim=cfg.hs, max_position_embeddings=cfg.block_size,
                         rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                         rope_scaling=None if cfg.rope_scaling is None else {"rope_type": "llama3", **cfg.rope_scaling},
                         tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    torch.manual_seed(seed)
    hm = LlamaForCausalLM(hcfg).float().eval()
    with torch.no_grad():
        for name, p in hm.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return hm


def hf_logits(hm, ids):
    """transformers' logits in float64, on hm's weights as they are."""
    with torch.no_grad():
        return hm.double()(input_ids=torch.tensor(ids)).logits.numpy()


def ids_for(cfg, B=2, T=24, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------- llmpy -> transformers


@pytest.mark.parametrize("case", list(CASES))
def test_save_model_loads_in_transformers(tmp_path, case):
    cfg = CASES[case]
    model = random_llama(cfg)
    formats.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    hm, info = LlamaForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager",
                                                output_loading_info=True)
    assert not any(info.values()), info                 # no missing, unexpected or mismatched tensor
    assert hm.config.num_key_value_heads == cfg.n_kv_head < hm.config.num_attention_heads
    assert hm.config.tie_word_embeddings == cfg.tie_word_embeddings
    ids = ids_for(cfg)
    got, _ = model.forward(ids)
    assert rel_err(got, hf_logits(hm, ids)) < RTOL
    # and back: our own directory through families.load, bit for bit
    back = families.load(tmp_path / "m")
    assert isinstance(back, Llama) and back.config == cfg
    np.testing.assert_array_equal(back.params.flat, model.params.flat)


def test_save_model_refuses_llmc_for_llama(tmp_path):
    with pytest.raises(LlmpyError) as e:
        formats.save_model(random_llama(CASES["tied-llama3rope"]), tmp_path / "m.bin", format="llmc")
    assert "GPT-2" in one_line(e) and "'hf'" in str(e.value)
    assert not (tmp_path / "m.bin").exists()


# ---------------------------------------------------------------------------- transformers -> llmpy


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_transformers_checkpoint_loads(tmp_path, case):
    cfg = CASES[case]
    hm = random_hf(cfg)
    hm.save_pretrained(tmp_path / "m", safe_serialization=True, max_shard_size="20KB")
    index = json.loads((tmp_path / "m" / hf_llama.SHARD_INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "m" / "model.safetensors").exists()
    model = families.load(tmp_path / "m")
    assert isinstance(model, Llama)
    ids = ids_for(cfg)
    got, _ = model.forward(ids)
    assert rel_err(got, hf_logits(hm, ids)) < RTOL


def test_bf16_transformers_checkpoint_loads_widened(tmp_path):
    """bfloat16 weights are widened to fp32 exactly: llmpy matches transformers
    run in float64 on the same bf16-rounded weights. (Not on the bf16 model
    itself: .to(bfloat16) rounds transformers' rotary inv_freq buffer too.)"""
    cfg = CASES["untied-headdim16"]
    hm = random_hf(cfg)
    with torch.no_grad():
        for p in hm.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(hm).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    assert "BF16" in (tmp_path / "m" / "model.safetensors").read_bytes()[:4096].decode(errors="replace")
    model = families.load(tmp_path / "m")
    sd = model.state_dict()
    for name, p in hm.state_dict().items():
        np.testing.assert_array_equal(sd[name], p.numpy())    # widened exactly
    ids = ids_for(cfg)
    got, _ = model.forward(ids)
    assert rel_err(got, hf_logits(hm, ids)) < RTOL


# ---------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("cfg", [*CASES.values(), *PRESETS.values()], ids=[*CASES, *PRESETS])
def test_config_json_round_trip(tmp_path, cfg):
    """ours -> config.json -> ours is the identity; transformers reads the same model from it."""
    (tmp_path / "config.json").write_text(json.dumps(hf_llama.hf_config(cfg)))
    assert hf_llama.read_hf_config(tmp_path / "config.json") == cfg
    h = HFLlamaConfig.from_pretrained(tmp_path)
    assert (h.vocab_size, h.hidden_size, h.intermediate_size, h.num_hidden_layers, h.num_attention_heads,
            h.num_key_value_heads, h.head_dim, h.max_position_embeddings, h.rms_norm_eps, h.tie_word_embeddings) == \
           (cfg.vocab_size, cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.n_head,
            cfg.n_kv_head, cfg.hs, cfg.block_size, cfg.rms_norm_eps, cfg.tie_word_embeddings)
    rope = dict(getattr(h, "rope_parameters", None) or {"rope_theta": h.rope_theta, **(h.rope_scaling or {})})
    assert rope.pop("rope_theta") == cfg.rope_theta
    assert rope.pop("rope_type", rope.pop("type", "default")) == ("default" if cfg.rope_scaling is None else "llama3")
    assert rope == (cfg.rope_scaling or {})
    # and what transformers writes of it (transformers 5: rope_parameters) reads back the same
    h.save_pretrained(tmp_path / "theirs")
    assert hf_llama.read_hf_config(tmp_path / "theirs" / "config.json") == \
           (cfg if cfg.head_dim else LlamaConfig(**{**cfg.to_dict(), "head_dim": cfg.hs}))


def test_meta_llama32_1b_config_json_is_the_preset(tmp_path):
    """meta-llama/Llama-3.2-1B's config.json (the hub's file, as Meta wrote it)."""
    meta = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    cfg = hf_llama.read_hf_config(tmp_path / "config.json")
    # the shape is the preset's; the token ids are the file's (a random preset knows none)
    assert cfg == dataclasses.replace(preset("llama3.2-1b"), bos_token_id=128000, eos_token_id=128001)
    assert cfg.eos_ids == (128001,) and preset("llama3.2-1b").eos_ids == ()


def test_build_llama_preset():
    model, where = families.build("llama3-tiny", seed=3, seq_len=2048)
    assert isinstance(model, Llama) and where == "random (seed 3)"
    assert model.config == preset("llama3-tiny", 2048) and model.config.block_size == 2048
    again, _ = families.build("llama3-tiny", seed=3, seq_len=2048)
    np.testing.assert_array_equal(again.params.flat, model.params.flat)


# ---------------------------------------------------------------------------- bad input


def write_config(path, **change):
    """A saved tiny Llama directory whose config.json has `change` applied (None: key removed)."""
    formats.save_model(random_llama(CASES["tied-llama3rope"]), path)
    d = json.loads((path / "config.json").read_text())
    d.update(change)
    (path / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))


# (what config.json gets, the file the message must name, words it must hold)
BAD_CONFIGS = {
    "mistral": (dict(model_type="mistral"), "config.json", ["model_type", "'mistral'", "'llama'"]),
    "no-hidden-size": (dict(hidden_size=None), "config.json", ["missing hidden_size"]),
    "kv-heads-0": (dict(num_key_value_heads=0), "config.json", ["num_key_value_heads", "positive integer"]),
    "heads-float": (dict(num_attention_heads=4.0), "config.json", ["num_attention_heads", "positive integer"]),
    "kv-heads-3": (dict(num_key_value_heads=3), "config.json", ["n_kv_head=3"]),
    "theta-string": (dict(rope_theta="big"), "config.json", ["rope_theta", "positive number"]),
    "yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "config.json", ["rope_scaling", "'yarn'"]),
    "llama3-incomplete": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "config.json",
                          ["rope_scaling.low_freq_factor"]),
    "biases": (dict(attention_bias=True), "config.json", ["attention_bias"]),
    "tie-string": (dict(tie_word_embeddings="yes"), "config.json", ["tie_word_embeddings"]),
    "eos-string": (dict(eos_token_id="</s>"), "config.json", ["eos_token_id", "'</s>'"]),
    "eos-empty-list": (dict(eos_token_id=[]), "config.json", ["eos_token_id", "non-empty list"]),
    "eos-negative": (dict(eos_token_id=[2, -1]), "config.json", ["eos_token_id", "-1"]),
    "bos-list": (dict(bos_token_id=[1, 2]), "config.json", ["bos_token_id"]),
    # the config against the weights, before the model is allocated
    "more-layers": (dict(num_hidden_layers=3), "model.safetensors", ["missing tensor", "model.layers.2."]),
    "fewer-layers": (dict(num_hidden_layers=1), "model.safetensors", ["model.layers.1", "num_hidden_layers 1"]),
    "wider": (dict(hidden_size=64), "model.safetensors", ["model.embed_tokens.weight", "(300, 32)"]),
}


@pytest.mark.parametrize("bad", list(BAD_CONFIGS))
def test_bad_config_json_is_one_line_naming_the_file(tmp_path, bad):
    change, named, words = BAD_CONFIGS[bad]
    write_config(tmp_path / "m", **change)
    with pytest.raises(LlmpyError) as e:
        families.load(tmp_path / "m")
    msg = one_line(e)
    assert msg.startswith(f"{tmp_path / 'm' / named}: "), msg
    assert all(w in msg for w in words), msg


def test_missing_shard_is_one_line_naming_it(tmp_path):
    random_hf(CASES["tied-llama3rope"]).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LlmpyError) as e:
        families.load(tmp_path / "m")
    msg = one_line(e)
    assert msg.startswith(f"{shard}: ") and hf_llama.SHARD_INDEX in msg, msg


def test_model_safetensors_wins_over_a_stale_index(tmp_path):
    """save_model into a directory transformers once wrote sharded: the one
    file is read, as transformers prefers it too, not the old shards."""
    cfg = CASES["tied-llama3rope"]
    random_hf(cfg, seed=5).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    model = random_llama(cfg)
    formats.save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / hf_llama.SHARD_INDEX).exists()
    np.testing.assert_array_equal(families.load(tmp_path / "m").params.flat, model.params.flat)


def test_shard_outside_its_directory_is_refused(tmp_path):
    random_hf(CASES["tied-llama3rope"]).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = tmp_path / "m" / hf_llama.SHARD_INDEX
    d = json.loads(index.read_text())
    d["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(LlmpyError) as e:
        families.load(tmp_path / "m")
    assert one_line(e).startswith(f"{index}: ") and "elsewhere" in str(e.value)


def test_train_llama3_tiny_stop_and_resume_equals_one_run(tmp_path):
    # `llmpy train --model llama3-tiny`: a random Llama, checkpoints as HF Llama
    # directories, resumed through the family's own HF names: bitwise one run
    import json

    from llmpy.cli import main
    from llmpy.data.prepare import prepare_pydoc
    info = prepare_pydoc(tmp_path / "pydoc")
    args = ["train", "--model", "llama3-tiny", "--data", str(info["train"]), "--val-data", str(info["val"]),
            "-B", "2", "-T", "32", "--steps", "4", "--checkpoint-every", "2", "--val-every", "0",
            "--sample-every", "0", "--sample-tokens", "3", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--stop-at", "2"]) == 0
    assert main(args + ["--out", str(tmp_path / "a"), "--resume"]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    la, lb = ([json.loads(s)["loss"] for s in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab")
    assert len(la) == 4 and la == lb
    ckpt = [tmp_path / r / "ckpt_00000004" for r in "ab"]
    assert (ckpt[0] / "model.safetensors").read_bytes() == (ckpt[1] / "model.safetensors").read_bytes()
    assert json.loads((ckpt[0] / "config.json").read_text())["model_type"] == "llama"
