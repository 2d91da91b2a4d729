"""Model families: which model class to build, from a preset name or from a file.

A family is one architecture and everything that knows its shape. There is
one today, GPT-2:

    config       config.GPTConfig, config.preset (d2 ... d48, gpt2 ...)
    model        model.GPT
    layout       gpt2_layout.parameter_shapes: the flat buffer's tensors
    file names   formats/hf.py: config.json fields and the HF tensor names
                 (_hf_names, to_hf, from_hf); formats/llmc.py: llm.c files

A second family (Llama 3 is next) adds its own four: a config class, a model
class, a layout module, a config.json reader and HF name mapping in formats/;
`load` then picks the family by config.json's model_type, which today's
reader refuses unless it is "gpt2", and `build` by the preset's name.
Writing a model is formats.save_model, for any family.
"""
from __future__ import annotations

from pathlib import Path

from .config import PRESETS, preset
from .errors import LlmpyError
from .formats import hf, llmc
from .model import GPT


def build(spec: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0, seq_len: int = 1024):
    """The model `llmpy train --model SPEC` starts from: a preset with a random
    init from `seed` (its context: GPT-2's 1024 positions, or seq_len if
    longer), or a model directory / file loaded by `load`, whose context
    must hold seq_len."""
    if spec in PRESETS:
        return GPT(preset(spec, block_size=max(seq_len, 1024)), device=device, seed=seed, dtype=dtype)
    if not Path(spec).exists():
        raise LlmpyError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    model = load(spec, device=device, dtype=dtype)
    if seq_len > model.config.block_size:
        raise LlmpyError(f"--seq-len {seq_len} exceeds {spec}'s block_size {model.config.block_size}")
    return model


def load(path, device: str = "cpu", dtype: str = "fp32"):
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors,
    or pytorch_model.bin when torch is installed), an llm.c model file, or a
    Hugging Face hub name such as "gpt2" (downloaded when online). Every file
    is checked against the config before the model is allocated."""
    spec = str(path)
    path = Path(path)
    if not path.exists():
        if not hf.is_hub_name(spec):
            raise LlmpyError(f"{path}: no such model directory or file; pass a directory with config.json + "
                             f"model.safetensors, an llm.c .bin file, or a hub name ({', '.join(hf.HF_HUB_NAMES)})")
        path = hf.from_hub(spec)
    if path.is_file():
        cfg, flat = llmc.read_model(path)
        model = GPT(cfg, device=device, init=False, dtype=dtype)
        model.params.flat[:] = model.xp.asarray(flat)
        model.params_updated()
        return model
    cfg = hf.read_hf_config(path / "config.json")
    weights, sd = hf.read_weights(path)
    hf.check_shapes(sd, cfg, weights)
    model = GPT(cfg, device=device, init=False, dtype=dtype)
    model.load_state_dict(sd, source=str(weights))
    return model
