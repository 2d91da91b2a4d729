"""Model families: which model class to build, from a preset name or from a file.

A family is one architecture and everything that knows its shape. There are
two, GPT-2 and Llama 3:

                 GPT-2                              Llama 3
    config       config.GPTConfig, config.preset    llama_layout.LlamaConfig, llama_layout.preset
                 (d2 ... d48; gpt2 ... as shapes)   (llama3-tiny; Meta's 3.2 1B, 3B, 3.1 8B shapes)
    model        model.GPT                          llama.Llama
    layout       gpt2_layout.parameter_shapes       llama_layout.parameter_shapes: the flat buffer
    file names   formats/hf.py (config.json, HF     formats/hf_llama.py (config.json, HF names,
                 names); formats/llmc.py (llm.c)    sharded checkpoints); no llm.c files

`load` picks the family of a Hugging Face directory by config.json's
model_type ("gpt2", or absent as in old GPT-2 exports; "llama"), `build` by
the preset's name (the two families' names are disjoint). A third family
adds the same four and a row in _HF_FAMILIES. Writing a model is
formats.save_model, for any family.
"""
from __future__ import annotations

from pathlib import Path

from . import llama_layout
from .config import PRESET_FORMS, is_preset, preset
from .errors import LlmpyError
from .fileio import read_json_object
from .formats import hf, hf_llama, llmc
from .llama import Llama
from .model import GPT

# config.json's model_type -> the family's Hugging Face reader (read_hf_config,
# read_weights, check_shapes) and its model class
_HF_FAMILIES = {"gpt2": (hf, GPT), "llama": (hf_llama, Llama)}


def build(spec: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0, seq_len: int = 1024):
    """(model, where its weights come from) for `llmpy train --model SPEC`.
    One rule, the one `llmpy train --help` states:

        d2 ... d48        a random init from `seed`; its context is GPT-2's
                          1024 positions, or seq_len if longer
        llama3-tiny, llama3.2-1b, llama3.2-3b, llama3.1-8b (llama_layout.PRESETS)
                          a random Llama 3 from `seed`: llama3-tiny is
                          CPU-sized over GPT-2's vocabulary, the others
                          Meta's shapes; context as the preset's, or
                          seq_len if longer
        gpt2, gpt2-medium, gpt2-large, gpt2-xl (hf.HF_HUB_NAMES)
                          OpenAI's pretrained weights, downloaded from the
                          Hugging Face hub by huggingface_hub into its cache
                          (HF_HUB_CACHE) once, read from there afterwards
        a path            a Hugging Face GPT-2 or Llama directory, or an
                          llm.c .bin model file (GPT-2): its weights

    config.preset also reads the hub names, as shapes (d12 ... d48) for
    `preset()`; here a hub name always means its weights: d12 is the random
    GPT-2 124M. A loaded model's context must hold seq_len."""
    if spec in hf.HF_HUB_NAMES:
        snapshot = hf.from_hub(spec)
        where = f"{spec} (Hugging Face hub, cached in {snapshot})"
        model = _read(snapshot, device, dtype)
    elif is_preset(spec):
        model = GPT(preset(spec, seq_len), device=device, seed=seed, dtype=dtype)
        return model, f"random (seed {seed})"
    elif llama_layout.is_preset(spec):
        model = Llama(llama_layout.preset(spec, seq_len), device=device, seed=seed, dtype=dtype)
        return model, f"random (seed {seed})"
    elif Path(spec).exists():
        where = f"{spec} ({'llm.c model file' if Path(spec).is_file() else 'Hugging Face directory'})"
        model = _read(Path(spec), device, dtype)
    else:
        raise LlmpyError(f"--model {spec}: no such file or directory; --model takes a model descriptor "
                         f"({PRESET_FORMS}: random init), a Llama 3 preset "
                         f"({', '.join(llama_layout.PRESETS)}: random init), "
                         f"a pretrained GPT-2 ({', '.join(hf.HF_HUB_NAMES)}), or the path of a Hugging Face "
                         "model directory or an llm.c .bin model")
    if seq_len > model.config.block_size:
        raise LlmpyError(f"--seq-len {seq_len} exceeds {spec}'s context (block_size: config.json's "
                         "n_positions or max_position_embeddings) "
                         f"{model.config.block_size}")
    return model, f"pretrained weights from {where}"


def build_dir(spec: str) -> Path | None:
    """The directory build(spec) reads its weights from (a Hugging Face
    directory; its tokenizer.json is the model's); None for a preset, a hub
    name or an llm.c file, whatever the working directory holds."""
    if spec in hf.HF_HUB_NAMES or is_preset(spec) or llama_layout.is_preset(spec) or not Path(spec).is_dir():
        return None
    return Path(spec)


def load(path, device: str = "cpu", dtype: str = "fp32"):
    """A model from a Hugging Face directory (config.json + model.safetensors,
    a sharded checkpoint (Llama), or pytorch_model.bin when torch is
    installed): a GPT or a Llama by config.json's model_type; an llm.c model
    file (a GPT); or a Hugging Face hub name such as "gpt2" (downloaded when
    online). Every file is checked against the config before the model is
    allocated."""
    return _read(locate(path), device, dtype)


def locate(spec) -> Path:
    """The local file or directory of a model: `spec` itself, or the snapshot
    of a hub name (downloaded when online), where its tokenizer.json is too."""
    path = Path(spec)
    if path.exists():
        return path
    if not hf.is_hub_name(str(spec)):
        raise LlmpyError(f"{path}: no such model directory or file; pass a directory with config.json + "
                         f"model.safetensors, an llm.c .bin file, or a hub name ({', '.join(hf.HF_HUB_NAMES)}, or "
                         "OWNER/NAME such as meta-llama/Llama-3.2-1B)")
    return hf.from_hub(str(spec))


def _read(path: Path, device: str, dtype: str):
    """The model in a local file (llm.c) or directory (Hugging Face)."""
    if path.is_file():
        cfg, flat = llmc.read_model(path)
        model = GPT(cfg, device=device, init=False, dtype=dtype)
        model.set_params(flat)
        return model
    reader, family = _HF_FAMILIES[_model_type(path / "config.json")]
    cfg = reader.read_hf_config(path / "config.json")
    weights, sd = reader.read_weights(path)
    reader.check_shapes(sd, cfg, weights)
    model = family(cfg, device=device, init=False, dtype=dtype)
    model.load_state_dict(sd, source=str(weights))
    return model


def _model_type(config_json: Path) -> str:
    """config.json's model_type, one of _HF_FAMILIES; GPT-2 where it is
    absent (GPT-2's reader has always taken such files as GPT-2's)."""
    d = read_json_object(config_json, missing="no config.json; a model directory needs config.json + "
                         "model.safetensors", fix="re-save the model")
    model_type = d.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in _HF_FAMILIES:     # any JSON value may be there
        raise LlmpyError(f"{config_json}: model_type {model_type!r} is not a family llmpy runs; it loads "
                         f"{' and '.join(repr(t) for t in _HF_FAMILIES)} models")
    return model_type
