"""Hugging Face LlamaForCausalLM names and layouts for llmpy's Llama flat buffer.

HF keeps q_proj, k_proj, v_proj and gate_proj, up_proj as separate (out, in)
matrices; llmpy stacks each group into one matrix (llama_layout.py), so a
name here is a row slice of one of our tensors, never a transpose. A tied
head (tie_word_embeddings) has no lm_head.weight of its own: it is left out
of what we write and ignored in what we read, as HF's own files do.
"""
from __future__ import annotations

import numpy as np

from ..errors import LlmpyError
from ..llama_layout import LlamaConfig, parameter_shapes
from ..tensors import FlatTensors


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


def from_hf(sd: dict, cfg: LlamaConfig, source: str = "state dict") -> FlatTensors:
    """HF-named tensors -> a host FlatTensors (padded rows zero). Ignores the
    rotary buffers some exports carry and a tied head's lm_head.weight."""
    host = FlatTensors(parameter_shapes(cfg), np)
    for hf, ours, layer, rows in hf_names(cfg):
        if hf not in sd:
            raise LlmpyError(f"{source}: missing tensor {hf!r}; is this a Llama checkpoint of this shape?")
        t = np.asarray(sd[hf])
        dst = _view(host, ours, layer, rows)
        if tuple(t.shape) != tuple(dst.shape):
            raise LlmpyError(f"{source}: tensor {hf!r} has shape {tuple(t.shape)}, expected {tuple(dst.shape)} "
                             "for this config")
        dst[...] = t
    return host
