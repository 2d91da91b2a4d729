"""Model and training-state files.

A checkpoint directory is a Hugging Face GPT-2 directory (config.json +
model.safetensors, HF names and layouts, tied LM head), so
`transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it as it is. Beside
it, a training checkpoint keeps what an exact resume needs: AdamW's m and v
(optimizer.safetensors) and train_state.json (step, data position, flags), and
a manifest.json, written last, with the size and sha256 of every file.

Every write is atomic: files are written under a temporary name, fsynced and
renamed; a checkpoint directory is built under a temporary name and renamed
into place, so a crash never leaves something that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import GPTConfig
from .errors import LlmpyError

# ---------------------------------------------------------------------- atomic files


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- HF directories


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
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlmpyError(f"{path}: no config.json; a model directory needs config.json + model.safetensors") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmpyError(f"{path}: not valid JSON ({e}); re-save the model") from None
    if not isinstance(d, dict):
        raise LlmpyError(f"{path}: expected a JSON object")
    if d.get("model_type", "gpt2") != "gpt2":
        raise LlmpyError(f"{path}: model_type is {d.get('model_type')!r}, llmpy loads GPT-2 models only")
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LlmpyError(f"{path}: activation_function {d.get('activation_function')!r} is not GPT-2's tanh GELU")
    if d.get("n_inner") not in (None, 4 * d.get("n_embd", 768)):
        raise LlmpyError(f"{path}: n_inner={d.get('n_inner')} is not 4 * n_embd; llmpy supports GPT-2's MLP width")
    try:
        return GPTConfig(block_size=d.get("n_positions", 1024), vocab_size=d.get("vocab_size", 50257),
                         n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=d.get("n_embd", 768))
    except LlmpyError as e:
        raise LlmpyError(f"{path}: {e}") from None


def save_model(model, path, format: str = "hf"):
    if format != "hf":
        raise LlmpyError(f"unknown model format {format!r}; only 'hf' is written so far")
    from safetensors.numpy import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".model.safetensors.tmp"
    save_file(model.state_dict(), str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path / "model.safetensors")
    atomic_write_json(path / "config.json", hf_config(model.config))


def read_safetensors(path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise LlmpyError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmpyError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                         "re-save or re-download it") from None


def load(path, device: str = "cpu"):
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    from .model import GPT
    path = Path(path)
    if not path.exists():
        raise LlmpyError(f"{path}: no such model directory; pass a directory with config.json + model.safetensors")
    if path.is_dir():
        cfg = read_hf_config(path / "config.json")
        weights = path / "model.safetensors"
        if not weights.exists():
            raise LlmpyError(f"{path}: no model.safetensors in this directory")
    else:
        raise LlmpyError(f"{path}: expected a model directory (config.json + model.safetensors)")
    sd = read_safetensors(weights)
    model = GPT(cfg, device=device, init=False)
    model.load_state_dict(sd, source=str(weights))
    return model


# ---------------------------------------------------------------------- training checkpoints

CKPT_PREFIX = "ckpt_"


def save_training_checkpoint(out_dir, step: int, model, optimizer, train_state: dict, keep: int = 0) -> Path:
    """out_dir/ckpt_<step>/ with the model (HF), optimizer state, train_state.json
    and manifest.json. Built under a temporary name and renamed into place."""
    from safetensors.numpy import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_model(model, tmp)
        xp = model.xp
        host = (lambda a: a) if xp is np else xp.asnumpy
        save_file({"m": host(optimizer.m), "v": host(optimizer.v)}, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "train_state.json", dict(train_state, step=step, adam_step=optimizer.step_count))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files}
        atomic_write_json(tmp / "manifest.json", {"step": step, "files": manifest})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep and keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir) -> list[Path]:
    """Finished checkpoint directories, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit():
            found.append((int(p.name[len(CKPT_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path) -> str | None:
    """None if the manifest verifies, else the reason it does not."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta.get("bytes"):
            return f"{name} has the wrong size"
        if _sha256(f) != meta.get("sha256"):
            return f"{name} fails its sha256 check"
    return None


def load_training_checkpoint(path, model, optimizer) -> dict:
    """Restore model weights and optimizer state in place; returns train_state."""
    path = Path(path)
    sd = read_safetensors(path / "model.safetensors")
    model.load_state_dict(sd, source=str(path / "model.safetensors"))
    opt = read_safetensors(path / "optimizer.safetensors")
    for k in ("m", "v"):
        if k not in opt or opt[k].shape != optimizer.m.shape:
            raise LlmpyError(f"{path / 'optimizer.safetensors'}: optimizer state {k!r} does not match this model")
    try:
        state = json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError) as e:
        raise LlmpyError(f"{path / 'train_state.json'}: unreadable ({e})") from None
    optimizer.load_state_dict({"m": model.xp.asarray(opt["m"]), "v": model.xp.asarray(opt["v"]),
                               "step": state["adam_step"]})
    return state
