"""Hugging Face GPT-2 directories: config.json + model.safetensors; and hub downloads (any family).

Such a directory is what `transformers.GPT2LMHeadModel.save_pretrained` writes
and `from_pretrained` reads: config.json holds the shape, model.safetensors
the tensors under HF's names. Their layouts differ from llmpy's in one way:
HF's GPT-2 uses Conv1D layers, which store a weight as W^T (in, out), where
llmpy stores W (out, in); the LM head is tied to wte, so there is no
lm_head.weight to write. Written here: fp32 safetensors and config.json and,
for a model over GPT-2's vocabulary, the tokenizer files and
generation_config.json (so that `AutoTokenizer.from_pretrained(dir)` and
`pipeline("text-generation", model=dir)` work on the directory as it is),
each atomically (fileio.py). Read here besides: bfloat16 safetensors (by the
file's format, NumPy having no bfloat16), pytorch_model.bin (with torch
installed); and hub names of either family, downloaded (or found in the
local cache) by huggingface_hub: config.json, the weights in one file or
sharded, the tokenizer files (HUB_FILES).

Every reader checks what it reads against the file and against the config
before anything of the config's size is allocated, and fails with one
LlmpyError line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..errors import LlmpyError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_safetensors, read_json_object, slow_write_hook
from ..gpt2_layout import parameter_shapes
from ..tensors import FlatTensors
from .llmc import bf16_bits_to_fp32

# ---------------------------------------------------------------------- config.json


def hf_config(cfg: GPTConfig) -> dict:
    """config.json of a Hugging Face GPT-2 model of this shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def read_hf_config(path) -> GPTConfig:
    """GPTConfig of a Hugging Face GPT-2 config.json; anything that is not a
    GPT-2 llmpy can run (another model type, MLP width, activation) is refused."""
    path = Path(path)
    d = read_json_object(path, missing="no config.json; a model directory needs config.json + model.safetensors",
                         fix="re-save the model")
    if d.get("model_type", "gpt2") != "gpt2":
        raise LlmpyError(f"{path}: model_type is {d.get('model_type')!r}, llmpy loads GPT-2 models only")
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LlmpyError(f"{path}: activation_function {d.get('activation_function')!r} is not GPT-2's tanh GELU")
    fields = {"block_size": "n_positions", "vocab_size": "vocab_size", "n_layer": "n_layer",
              "n_head": "n_head", "n_embd": "n_embd"}
    defaults = GPTConfig()
    values = {}
    for ours, theirs in fields.items():
        v = d.get(theirs, getattr(defaults, ours))
        if type(v) is not int or v <= 0:      # not bool, not float, not a string
            raise LlmpyError(f"{path}: {theirs} must be a positive integer, got {v!r}")
        values[ours] = v
    if d.get("n_inner") not in (None, 4 * values["n_embd"]):
        raise LlmpyError(f"{path}: n_inner={d.get('n_inner')!r} is not 4 * n_embd; llmpy supports GPT-2's MLP width")
    try:
        return GPTConfig(**values)
    except LlmpyError as e:
        raise LlmpyError(f"{path}: {e}") from None


# ---------------------------------------------------------------------- HF names and layouts


def _hf_names(cfg: GPTConfig):
    """(hf name, our tensor, layer or None, transposed?) for every tensor."""
    out = [("transformer.wte.weight", "wte", None, False),
           ("transformer.wpe.weight", "wpe", None, False)]
    for l in range(cfg.n_layer):
        h = f"transformer.h.{l}."
        out += [(h + "ln_1.weight", "ln1w", l, False), (h + "ln_1.bias", "ln1b", l, False),
                (h + "attn.c_attn.weight", "qkvw", l, True), (h + "attn.c_attn.bias", "qkvb", l, False),
                (h + "attn.c_proj.weight", "attprojw", l, True), (h + "attn.c_proj.bias", "attprojb", l, False),
                (h + "ln_2.weight", "ln2w", l, False), (h + "ln_2.bias", "ln2b", l, False),
                (h + "mlp.c_fc.weight", "fcw", l, True), (h + "mlp.c_fc.bias", "fcb", l, False),
                (h + "mlp.c_proj.weight", "fcprojw", l, True), (h + "mlp.c_proj.bias", "fcprojb", l, False)]
    out += [("transformer.ln_f.weight", "lnfw", None, False), ("transformer.ln_f.bias", "lnfb", None, False)]
    return out


def to_hf(flat: np.ndarray, cfg: GPTConfig) -> dict:
    """A flat buffer in llmpy's layout (parameters or gradients, on the host)
    -> float32 tensors under HF's names and layouts (no padded vocabulary rows)."""
    host = FlatTensors(parameter_shapes(cfg), np, flat=np.asarray(flat, dtype=np.float32))
    sd = {}
    for hf, ours, layer, transposed in _hf_names(cfg):
        t = host.views[ours] if layer is None else host.views[ours][layer]
        if ours == "wte":
            t = t[:cfg.vocab_size]
        sd[hf] = np.ascontiguousarray(t.T if transposed else t)
    return sd


def from_hf(sd: dict, cfg: GPTConfig, source: str = "state dict") -> FlatTensors:
    """Hugging Face-named tensors -> a host FlatTensors. Accepts names with or
    without the `transformer.` prefix; ignores HF's non-parameter buffers
    (attn.bias, attn.masked_bias) and the tied lm_head.weight."""
    sd = {(k if k.startswith("transformer.") or k.startswith("lm_head") else "transformer." + k): v
          for k, v in sd.items()}
    host = FlatTensors(parameter_shapes(cfg), np)
    for hf, ours, layer, transposed in _hf_names(cfg):
        if hf not in sd:
            raise LlmpyError(f"{source}: missing tensor {hf!r}; is this a GPT-2 checkpoint of this shape?")
        t = np.asarray(sd[hf])
        dst = host.views[ours] if layer is None else host.views[ours][layer]
        if ours == "wte":
            dst = dst[:cfg.vocab_size]
        want = dst.T.shape if transposed else dst.shape
        if tuple(t.shape) != tuple(want):
            raise LlmpyError(f"{source}: tensor {hf!r} has shape {tuple(t.shape)}, expected {tuple(want)} "
                             "for this config")
        dst[...] = t.T if transposed else t
    return host


# ---------------------------------------------------------------------- writing


def save(path, cfg: GPTConfig, sd: dict):
    """Write a Hugging Face directory: model.safetensors (the tensors `sd`, HF
    names, fp32), the tokenizer files and generation_config.json (a model
    over GPT-2's vocabulary), then config.json; each file appears whole or
    not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(path / "model.safetensors", sd, metadata={"format": "pt"})
    slow_write_hook()
    if cfg.vocab_size == GPT2_VOCAB_SIZE:
        for name, data in text_model_files(cfg).items():
            atomic_write_bytes(path / name, data)
    atomic_write_json(path / "config.json", hf_config(cfg))


# ---------------------------------------------------------------------- tokenizer and generation config

# GPT-2's vocabulary: 50257 ids, the last one <|endoftext|>, which is GPT-2's
# only special token and serves as beginning, end and padding alike.
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
GPT2_EOT_TEXT = "<|endoftext|>"


def text_model_files(cfg: GPTConfig) -> dict[str, bytes]:
    """file name -> bytes of what turns a GPT-2 weights directory into a text
    model for transformers, as the hub's gpt2 repository has them:

        vocab.json, merges.txt   OpenAI's encoder.json and vocab.bpe, byte for
                                 byte (the files llmpy tokenizes with,
                                 sha256-checked by data/tokenizer.py); from
                                 them AutoTokenizer builds its fast (Rust)
                                 tokenizer itself, so no tokenizer.json is
                                 written (it would need the `tokenizers`
                                 package here, and 1.5 MB per checkpoint)
        tokenizer_config.json,   which class reads them; <|endoftext|> as bos,
        special_tokens_map.json  eos and unk; no space added before the text
                                 and none removed when decoding (so decode
                                 gives back the text, as llmpy's does)
        generation_config.json   bos/eos/pad = 50256: generation stops at
                                 <|endoftext|>, greedy unless asked otherwise
    """
    from ..data.tokenizer import vocabulary_files
    encoder_json, vocab_bpe = vocabulary_files()
    special = {"bos_token": GPT2_EOT_TEXT, "eos_token": GPT2_EOT_TEXT, "unk_token": GPT2_EOT_TEXT}
    tokenizer_config = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=cfg.block_size,
                            add_prefix_space=False, add_bos_token=False, clean_up_tokenization_spaces=False,
                            errors="replace")
    generation_config = {"bos_token_id": GPT2_EOT_ID, "eos_token_id": GPT2_EOT_ID, "pad_token_id": GPT2_EOT_ID}

    def as_json(obj) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return {"vocab.json": encoder_json, "merges.txt": vocab_bpe,
            "tokenizer_config.json": as_json(tokenizer_config),
            "special_tokens_map.json": as_json(special),
            "generation_config.json": as_json(generation_config)}


# ---------------------------------------------------------------------- reading


def read_weights(path: Path) -> tuple[Path, dict]:
    """(the file, its tensors) of a Hugging Face directory: model.safetensors,
    else pytorch_model.bin; every parameter checked to be floating point."""
    if (path / "model.safetensors").exists():
        weights = path / "model.safetensors"
        sd = read_safetensors(weights)
    elif (path / "pytorch_model.bin").exists():
        weights = path / "pytorch_model.bin"
        sd = read_pytorch_bin(weights)
    else:
        raise LlmpyError(f"{path}: no model.safetensors (or pytorch_model.bin) in this directory")
    check_float_tensors(sd, weights)
    return weights, sd


def read_safetensors(path) -> dict:
    """All tensors of a safetensors file as NumPy arrays; any damage is an LlmpyError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise LlmpyError(f"{path}: file not found")
    try:
        sd = load_file(str(path))
        # with ml_dtypes installed, safetensors returns bf16 tensors as its
        # bfloat16 dtype, which NumPy does not count as floating: upcast (exact)
        return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in sd.items()}
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, OverflowError, MemoryError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "bfloat16" in why:       # NumPy has no bfloat16: read the file ourselves, upcasting
            return _read_safetensors_by_format(path)
        raise LlmpyError(f"{path}: not a readable safetensors file ({why}); re-save or re-download it") from None


_ST_DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


def _read_safetensors_by_format(path) -> dict:
    """A safetensors file read by its format, for the bfloat16 files that
    safetensors.numpy cannot return (NumPy has no bfloat16); BF16 tensors are
    upcast to float32 exactly. The format: an 8-byte little-endian length N,
    N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}}
    (plus an optional "__metadata__"), then the data, offsets counted from
    its start. Every entry is checked against the file before it is read."""
    path = Path(path)

    def bad(what):
        return LlmpyError(f"{path}: not a readable safetensors file ({what}); re-save or re-download it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise bad(f"header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise bad("header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data_start, out = 8 + n, {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict) or meta.get("dtype") not in _ST_DTYPES:
                raise bad(f"tensor {name!r}: unsupported or missing dtype")
            shape, offsets = meta.get("shape"), meta.get("data_offsets")
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or not isinstance(offsets, list) or len(offsets) != 2
                    or not all(type(o) is int for o in offsets)):
                raise bad(f"tensor {name!r}: malformed shape or data_offsets")
            begin, end = offsets
            dtype, itemsize = _ST_DTYPES[meta["dtype"]]
            count = int(np.prod(shape, dtype=object)) if shape else 1
            if not 0 <= begin <= end <= size - data_start or end - begin != count * itemsize:
                raise bad(f"tensor {name!r}: data_offsets {offsets} do not match its shape and the file")
            f.seek(data_start + begin)
            arr = np.frombuffer(f.read(end - begin), dtype=dtype)
            out[name] = (bf16_bits_to_fp32(arr) if meta["dtype"] == "BF16" else arr).reshape(shape)
    return out


def read_pytorch_bin(path) -> dict:
    """The tensors of a pytorch_model.bin (needs torch; loaded with weights_only,
    so a hostile pickle cannot run code)."""
    try:
        import torch
    except ImportError:
        raise LlmpyError(f"{path}: reading pytorch_model.bin needs PyTorch (pip install torch), "
                         "or convert the model to model.safetensors") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types for a bad file; all mean the same here
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlmpyError(f"{path}: not a readable PyTorch checkpoint ({why[:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LlmpyError(f"{path}: expected a dict of tensors (a state dict)")
    return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def check_float_tensors(sd: dict, source):
    """Every parameter is floating point (HF's causal-mask buffers may be anything)."""
    for k, v in sd.items():
        if k.endswith(("attn.bias", "attn.masked_bias")):
            continue      # HF's causal-mask buffers, not parameters
        if not np.issubdtype(v.dtype, np.floating):
            raise LlmpyError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected floating point weights")


def check_shapes(sd: dict, cfg: GPTConfig, source):
    """Check config.json against the tensors' own shapes *before* a model of
    that config is allocated: a config claiming a huge model next to small
    weights must fail here, not in a giant allocation."""
    def get(name):
        t = sd.get(name, sd.get(name[len("transformer."):]))
        if t is None:
            raise LlmpyError(f"{source}: missing tensor {name!r}; is this a GPT-2 checkpoint?")
        return t
    wte, wpe = get("transformer.wte.weight"), get("transformer.wpe.weight")
    if tuple(wte.shape) != (cfg.vocab_size, cfg.n_embd):
        raise LlmpyError(f"{source}: wte has shape {tuple(wte.shape)}, but config.json says vocab_size "
                         f"{cfg.vocab_size} x n_embd {cfg.n_embd}")
    if tuple(wpe.shape) != (cfg.block_size, cfg.n_embd):
        raise LlmpyError(f"{source}: wpe has shape {tuple(wpe.shape)}, but config.json says n_positions "
                         f"{cfg.block_size} x n_embd {cfg.n_embd}")
    layers = {k.split(".")[k.split(".").index("h") + 1] for k in sd if ".h." in f".{k}"}
    if len(layers) != cfg.n_layer:
        raise LlmpyError(f"{source}: holds {len(layers)} transformer layers, but config.json says n_layer "
                         f"{cfg.n_layer}")


# ---------------------------------------------------------------------- the hub

# Hugging Face hub names llmpy knows the shape of; any "owner/name" also tries the hub.
HF_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_name(spec: str) -> bool:
    """Whether `spec` (not a local path) names a model on the Hugging Face hub."""
    return spec in HF_HUB_NAMES or ("/" in spec and bool(_REPO_ID.match(spec)))


# What from_hub fetches of a repository: the config; the weights as one file
# or as an index and its shards (what save_pretrained writes past
# max_shard_size: Llama 3.1 8B's four model-0000K-of-00004.safetensors); the
# tokenizer (a Llama's tokenizer.json, which `llmpy sample` then encodes and
# decodes with). Nothing else: no pytorch_model.bin, TF or Flax copies of the same
# weights, no Meta original/ checkpoint. (A repository holding both one file
# and shards, which transformers never writes, would bring both.)
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def from_hub(name: str) -> Path:
    """The local snapshot of a GPT-2 or Llama model on the Hugging Face hub
    (HUB_FILES of it), downloaded by huggingface_hub, or found in its cache."""
    need_local = (f"{name}: not a local model; pass a directory with config.json + model.safetensors "
                  f"(or an llm.c .bin file)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LlmpyError(f"{need_local}; downloading {name!r} from the hub needs `pip install huggingface_hub`") from None
    try:
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:          # older huggingface_hub: no specific reasons, only the generic one
        GatedRepoError = LocalEntryNotFoundError = RepositoryNotFoundError = ()
    from huggingface_hub import constants
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network, or the hub is down"
        raise LlmpyError(f"{name}: not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub is not "
                         f"reachable ({why}); run once with network and without HF_HUB_OFFLINE to download it, "
                         "point HF_HUB_CACHE (or HF_HOME) at a cache that has it, or pass a local model "
                         "directory or llm.c .bin file") from None
    except GatedRepoError:       # (a RepositoryNotFoundError too: first) Meta's Llama repositories are gated
        raise LlmpyError(f"{name}: the Hugging Face hub lets only approved users download it; accept its "
                         f"license at {constants.ENDPOINT}/{name}, log in (`hf auth login`, or set HF_TOKEN) "
                         "and run again, or pass a local model directory") from None
    except RepositoryNotFoundError:
        raise LlmpyError(f"{need_local}; the Hugging Face hub has no model {name!r}") from None
    except Exception as e:      # network trouble of any kind: one line for the user
        why = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0]
        raise LlmpyError(f"{need_local}; fetching it from the Hugging Face hub failed ({why[:160]})") from None
