"""Model file formats, read and written without the model class.

    hf.py        Hugging Face GPT-2 directories: config.json, model.safetensors
                 (fp32 written; fp32/fp16/bf16 read), the tokenizer files and
                 generation_config.json (written), pytorch_model.bin (read,
                 with torch), hub names (downloaded), and the HF tensor names
                 and layouts (to_hf / from_hf)
    hf_llama.py  Hugging Face Llama directories: config.json, model.safetensors
                 (fp32 written; sharded checkpoints and fp16/bf16 read, with
                 hf.py's readers), and the HF tensor names (to_hf / from_hf)
    llmc.py      llm.c's GPT-2 files: model weights (.bin, fp32 v3 / bf16 v5),
                 the tokenizer file, and the header of a token shard

Each works on its family's config (GPTConfig, LlamaConfig) and flat host
arrays in its layout (gpt2_layout.py, llama_layout.py). save_model below
writes a model object into them (it reads the model's config, state_dict()
and flat parameters, and imports no model class); families.py builds models
from what the readers return.
"""
from __future__ import annotations

from ..errors import LlmpyError
from ..llama_layout import LlamaConfig
from . import hf, hf_llama, llmc


def save_model(model, path, format: str = "hf", dtype: str = "fp32"):
    """Write a model: format "hf" is a Hugging Face directory (config.json +
    model.safetensors, fp32, and for a GPT-2 over GPT-2's vocabulary the
    tokenizer files and generation_config.json: a text model transformers
    loads as it is); format "llmc" is one llm.c model file (fp32 or bf16),
    GPT-2 only."""
    llama = isinstance(model.config, LlamaConfig)
    if format == "llmc":
        if llama:
            raise LlmpyError("llm.c's model file format (format 'llmc') holds GPT-2 models only; "
                             "save a Llama with format 'hf', a Hugging Face directory")
        llmc.write_model(path, model.config, model.ops.to_host(model.params.flat), dtype=dtype)
        return
    if format != "hf":
        raise LlmpyError(f"unknown model format {format!r}; use 'hf' (a directory) or 'llmc' (an llm.c .bin file)")
    if dtype != "fp32":
        raise LlmpyError(f"Hugging Face directories are written in fp32, not {dtype}")
    (hf_llama if llama else hf).save(path, model.config, model.state_dict())

