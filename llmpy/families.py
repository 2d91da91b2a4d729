"""Model families: which model class to build, from a preset name or from a file.

A family is one architecture and everything that knows its shape. There is
one today, GPT-2:

    config       config.GPTConfig, config.preset (d2 ... d48; gpt2 ... as shapes)
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

from .config import PRESET_FORMS, is_preset, preset
from .errors import LlmpyError
from .formats import hf, llmc
from .model import GPT


def build(spec: str, device: str = "cpu", dtype: str = "fp32", seed: int = 0, seq_len: int = 1024):
    """(model, where its weights come from) for `llmpy train --model SPEC`.
    One rule, the one `llmpy train --help` states:

        d2 ... d48        a random init from `seed`; its context is GPT-2's
                          1024 positions, or seq_len if longer
        gpt2, gpt2-medium, gpt2-large, gpt2-xl (hf.HF_HUB_NAMES)
                          OpenAI's pretrained weights, downloaded from the
                          Hugging Face hub by huggingface_hub into its cache
                          (HF_HUB_CACHE) once, read from there afterwards
        a path            a Hugging Face GPT-2 directory or an llm.c .bin
                          model file: its weights

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
    elif Path(spec).exists():
        where = f"{spec} ({'llm.c model file' if Path(spec).is_file() else 'Hugging Face directory'})"
        model = _read(Path(spec), device, dtype)
    else:
        raise LlmpyError(f"--model {spec}: no such file or directory; --model takes a model descriptor "
                         f"({PRESET_FORMS}: random init), "
                         f"a pretrained GPT-2 ({', '.join(hf.HF_HUB_NAMES)}), or the path of a Hugging Face "
                         "model directory or an llm.c .bin model")
    if seq_len > model.config.block_size:
        raise LlmpyError(f"--seq-len {seq_len} exceeds {spec}'s context (n_positions / block_size) "
                         f"{model.config.block_size}")
    return model, f"pretrained weights from {where}"


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
    return _read(path, device, dtype)


def _read(path: Path, device: str, dtype: str):
    """The GPT in a local file (llm.c) or directory (Hugging Face)."""
    if path.is_file():
        cfg, flat = llmc.read_model(path)
        model = GPT(cfg, device=device, init=False, dtype=dtype)
        model.set_params(flat)
        return model
    cfg = hf.read_hf_config(path / "config.json")
    weights, sd = hf.read_weights(path)
    hf.check_shapes(sd, cfg, weights)
    model = GPT(cfg, device=device, init=False, dtype=dtype)
    model.load_state_dict(sd, source=str(weights))
    return model
