"""Hugging Face Llama directories: config.json, the weights, and the names
and layouts of LlamaForCausalLM's tensors against llmpy's Llama flat buffer.

HF keeps q_proj, k_proj, v_proj and gate_proj, up_proj as separate (out, in)
matrices; llmpy stacks each group into one matrix (llama_layout.py), so a
name here is a row slice of one of our tensors, never a transpose. A tied
head (tie_word_embeddings) has no lm_head.weight of its own: it is left out
of what we write and ignored in what we read, as HF's own files do.

Written: config.json and one fp32 model.safetensors, each atomically
(fileio.py). Read: model.safetensors, a sharded checkpoint (what
save_pretrained writes past max_shard_size: model.safetensors.index.json
and the shards it names), pytorch_model.bin; fp32, fp16 or bf16 (widened
to fp32 by hf.py's readers). As for GPT-2 (hf.py), every tensor is checked
against config.json before the model is allocated, and every failure is
one LlmpyError line naming the file.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import LlmpyError
from ..fileio import atomic_write_json, atomic_write_safetensors, read_json_object, slow_write_hook
from ..llama_layout import LlamaConfig, parameter_shapes
from ..tensors import FlatTensors
from . import hf

# ---------------------------------------------------------------------- config.json

# the keys of Llama 3.1's rope scaling (rope_type "llama3"), as LlamaConfig.rope_scaling holds them
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_config(cfg: LlamaConfig) -> dict:
    """config.json of a Hugging Face LlamaForCausalLM of this shape. The rope
    is written as Meta's files and transformers 4 spell it (rope_theta, and
    rope_scaling of rope_type "llama3"), which transformers 5 reads too."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # the ids of the config.json the model came from; null (not known)
        # keeps transformers from claiming its defaults (1 and 2, Llama 2's
        # ids) for this vocabulary
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "torch_dtype": "float32",
    }
    if cfg.head_dim:
        d["head_dim"] = cfg.head_dim
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    return d


# (our field, config.json's key, transformers' default when the key is absent:
# the model it builds; None: required, there being no sensible shape to assume)
_INT_FIELDS = (("vocab_size", "vocab_size", None), ("n_embd", "hidden_size", None),
               ("intermediate_size", "intermediate_size", None), ("n_layer", "num_hidden_layers", None),
               ("n_head", "num_attention_heads", None), ("block_size", "max_position_embeddings", 2048))


def read_hf_config(path) -> LlamaConfig:
    """LlamaConfig of a Hugging Face Llama config.json, either spelling of
    the rope (transformers 5's rope_parameters, or rope_theta + rope_scaling);
    an absent optional key means transformers' default (bos/eos_token_id:
    not known). Anything llmpy's
    Llama cannot run (biases, another activation or rope type) is refused."""
    path = Path(path)
    d = read_json_object(path, missing="no config.json; a model directory needs config.json + model.safetensors",
                         fix="re-save the model")
    if d.get("model_type") != "llama":
        raise LlmpyError(f"{path}: model_type is {d.get('model_type')!r}, expected 'llama' for a Llama model")
    if d.get("hidden_act", "silu") != "silu":
        raise LlmpyError(f"{path}: hidden_act {d.get('hidden_act')!r} is not Llama's SiLU; llmpy runs SwiGLU only")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key, False) is not False:
            raise LlmpyError(f"{path}: {key} is {json.dumps(d.get(key))}; llmpy's Llama has no biases (false only)")
    values = {}
    for ours, theirs, default in _INT_FIELDS:
        values[ours] = _number(path, d, theirs, default, int)
    values["n_kv_head"] = _number(path, d, "num_key_value_heads", values["n_head"], int)
    if d.get("head_dim") is not None:          # transformers 5 writes it always, older ones never
        values["head_dim"] = _number(path, d, "head_dim", None, int)
    values["rms_norm_eps"] = _number(path, d, "rms_norm_eps", 1e-6, float)
    values["rope_theta"], values["rope_scaling"] = _rope(path, d)
    tied = d.get("tie_word_embeddings", False)
    if type(tied) is not bool:
        raise LlmpyError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")
    values["tie_word_embeddings"] = tied
    # absent: not known, rather than transformers' defaults 1 and 2 (Llama 2's
    # ids, a word piece in another vocabulary: generation must not stop there)
    values["bos_token_id"], values["eos_token_id"] = d.get("bos_token_id"), d.get("eos_token_id")
    try:
        return LlamaConfig(**values)
    except LlmpyError as e:
        raise LlmpyError(f"{path}: {e}") from None


def _number(path, d: dict, key: str, default, kind, where: str = ""):
    """d[key], a positive int (kind int: not a bool, not a float) or a finite
    positive number (kind float: returned as a float); `default` when absent,
    an error when that is None. `where` prefixes the key in messages."""
    name = where + key
    if key not in d:
        if default is None:
            raise LlmpyError(f"{path}: missing {name}; a Llama config.json needs it")
        return default
    v = d[key]
    ok = type(v) is int if kind is int else type(v) in (int, float) and math.isfinite(v)
    if not ok or v <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise LlmpyError(f"{path}: {name} must be {what}, got {v!r}")
    return v if kind is int else float(v)


def _rope(path, d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or
    from rope_theta and rope_scaling (Meta's files, transformers 4; its
    older files say "type" for "rope_type")."""
    key = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    scaling = {} if d.get(key) is None else d[key]
    if not isinstance(scaling, dict):
        raise LlmpyError(f"{path}: {key} must be an object, got {scaling!r}")
    in_params = key == "rope_parameters" and "rope_theta" in scaling
    theta = _number(path, scaling if in_params else d, "rope_theta", 10000.0, float,
                    where=f"{key}." if in_params else "")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise LlmpyError(f"{path}: {key} has rope_type {kind!r}; llmpy runs plain RoPE and Llama 3's 'llama3' "
                         "scaling only")
    return theta, {k: _number(path, scaling, k, None, int if k.startswith("original") else float, where=f"{key}.")
                   for k in _LLAMA3_ROPE_KEYS}


# ---------------------------------------------------------------------- HF names and layouts


def hf_names(cfg: LlamaConfig):
    """(hf name, our tensor, layer or None, rows (start, stop) or None) for every HF tensor."""
    NH, NKV, hs, I = cfg.n_head, cfg.n_kv_head, cfg.hs, cfg.intermediate_size
    q, k = NH * hs, NKV * hs
    out = [("model.embed_tokens.weight", "wte", None, (0, cfg.vocab_size))]
    for l in range(cfg.n_layer):
        h = f"model.layers.{l}."
        out += [(h + "input_layernorm.weight", "ln1w", l, None),
                (h + "self_attn.q_proj.weight", "qkvw", l, (0, q)),
                (h + "self_attn.k_proj.weight", "qkvw", l, (q, q + k)),
                (h + "self_attn.v_proj.weight", "qkvw", l, (q + k, q + 2 * k)),
                (h + "self_attn.o_proj.weight", "attprojw", l, None),
                (h + "post_attention_layernorm.weight", "ln2w", l, None),
                (h + "mlp.gate_proj.weight", "fcw", l, (0, I)),
                (h + "mlp.up_proj.weight", "fcw", l, (I, 2 * I)),
                (h + "mlp.down_proj.weight", "fcprojw", l, None)]
    out.append(("model.norm.weight", "lnfw", None, None))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", "lm_head", None, (0, cfg.vocab_size)))
    return out


def _view(host: FlatTensors, ours, layer, rows):
    t = host.views[ours] if layer is None else host.views[ours][layer]
    return t if rows is None else t[rows[0]:rows[1]]


def to_hf(flat: np.ndarray, cfg: LlamaConfig) -> dict:
    """A flat buffer in llmpy's Llama layout (parameters or gradients, on the
    host) -> float32 tensors under HF's names (no padded vocabulary rows)."""
    host = FlatTensors(parameter_shapes(cfg), np, flat=np.asarray(flat, dtype=np.float32))
    return {hf: np.ascontiguousarray(_view(host, ours, layer, rows)) for hf, ours, layer, rows in hf_names(cfg)}


def check_shapes(sd: dict, cfg: LlamaConfig, source="state dict"):
    """Every tensor of this config present in `sd` with its shape, and no
    layer beyond num_hidden_layers, checked from the shapes alone: a config
    claiming a huge model next to small weights fails here, before anything
    of the config's size is allocated."""
    shapes = dict(parameter_shapes(cfg))
    for hf, ours, layer, rows in hf_names(cfg):
        if hf not in sd:
            raise LlmpyError(f"{source}: missing tensor {hf!r}; is this a Llama checkpoint of this shape?")
        want = shapes[ours] if layer is None else shapes[ours][1:]
        if rows is not None:
            want = (rows[1] - rows[0], *want[1:])
        if tuple(np.shape(sd[hf])) != tuple(want):
            raise LlmpyError(f"{source}: tensor {hf!r} has shape {tuple(np.shape(sd[hf]))}, expected {tuple(want)} "
                             "for this config")
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))]
    if layers and max(layers) >= cfg.n_layer:
        raise LlmpyError(f"{source}: holds model.layers.{max(layers)}, but the config has num_hidden_layers "
                         f"{cfg.n_layer}; is this a Llama checkpoint of this shape?")


def from_hf(sd: dict, cfg: LlamaConfig, source: str = "state dict") -> FlatTensors:
    """HF-named tensors -> a host FlatTensors (padded rows zero), after
    check_shapes. Ignores the rotary buffers some exports carry and a tied
    head's lm_head.weight."""
    check_shapes(sd, cfg, source)
    host = FlatTensors(parameter_shapes(cfg), np)
    for hf, ours, layer, rows in hf_names(cfg):
        _view(host, ours, layer, rows)[...] = np.asarray(sd[hf])
    return host


# ---------------------------------------------------------------------- writing


def save(path, cfg: LlamaConfig, sd: dict):
    """Write a Hugging Face directory: model.safetensors (the tensors `sd`, HF
    names, fp32), then config.json, which makes the directory a model; each
    file appears whole or not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(path / "model.safetensors", sd, metadata={"format": "pt"})
    slow_write_hook()
    atomic_write_json(path / "config.json", hf_config(cfg))


# ---------------------------------------------------------------------- reading

SHARD_INDEX = "model.safetensors.index.json"


def read_weights(path) -> tuple[Path, dict]:
    """(the file to name in messages, its tensors) of a Hugging Face directory,
    in transformers' order of preference: model.safetensors, the sharded
    safetensors of model.safetensors.index.json, pytorch_model.bin."""
    path = Path(path)
    if not (path / "model.safetensors").exists() and (path / SHARD_INDEX).exists():
        return path / SHARD_INDEX, read_sharded(path / SHARD_INDEX)
    return hf.read_weights(path)


def read_sharded(index) -> dict:
    """The tensors of a sharded checkpoint: the index's weight_map names, for
    every tensor, the shard (a file beside the index) that holds it. Every
    shard must exist and hold the tensors the index places in it."""
    index = Path(index)
    d = read_json_object(index, missing="file not found", fix="re-save or re-download the checkpoint")
    weight_map = d.get("weight_map")
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())):
        raise LlmpyError(f"{index}: no weight_map of tensor name -> shard file; re-save or re-download the checkpoint")
    sd = {}
    for shard in sorted(set(weight_map.values())):
        # a bare file name only: an index must not reach outside its directory
        if shard in ("", ".", "..") or Path(shard).name != shard:
            raise LlmpyError(f"{index}: shard {shard!r} is not a file name in this directory")
        file = index.parent / shard
        if not file.is_file():
            raise LlmpyError(f"{file}: shard not found, though {index.name} lists it; copy or download the "
                             "whole checkpoint")
        tensors = hf.read_safetensors(file)
        listed = sorted(k for k, v in weight_map.items() if v == shard)
        absent = [k for k in listed if k not in tensors]
        if absent:
            raise LlmpyError(f"{file}: lacks tensor {absent[0]!r}, which {index.name} places in it; "
                             "re-download the checkpoint")
        sd.update((k, tensors[k]) for k in listed)
    hf.check_float_tensors(sd, index)
    return sd
