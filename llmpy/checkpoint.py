"""Model and training-state files.

A checkpoint directory is a Hugging Face GPT-2 directory (config.json +
model.safetensors, HF names and layouts, tied LM head), so
`transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it as it is. Beside
it, a training checkpoint keeps what an exact resume needs: AdamW's m and v
(optimizer.safetensors) and train_state.json (step, data position, flags), and
a manifest.json, written last, with the size and sha256 of every file.

Every write is atomic: files are written under a temporary name, fsynced and
renamed; a checkpoint directory is built under a temporary name and renamed
into place, so a crash never leaves something that looks finished. Deleting
an old checkpoint (--keep) renames it to a hidden name first, so a crash never
leaves a half-deleted one either; `--resume` clears such leftovers.

`load` also reads pytorch_model.bin (when torch is installed), bfloat16
safetensors, llm.c model files (llmc.py) and Hugging Face hub names.
Every reader checks what it reads against the file and against the config
before it allocates anything, and fails with one LlmpyError line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import GPTConfig
from .errors import LlmpyError
from .fileio import atomic_write_json, fsync_dir, sha256_file, slow_write_hook

# ---------------------------------------------------------------------- JSON


def read_json_object(path: Path, missing: str, fix: str) -> dict:
    """A JSON object from `path`, or one LlmpyError line: `missing` when there
    is no file, `fix` appended when it is not a JSON object."""
    try:
        d = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise LlmpyError(f"{path}: {missing}") from None
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LlmpyError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"{fix}") from None
    if not isinstance(d, dict):
        raise LlmpyError(f"{path}: expected a JSON object; {fix}")
    return d


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


def save_model(model, path, format: str = "hf", dtype: str = "fp32"):
    """Write a model: format "hf" is a Hugging Face directory (config.json +
    model.safetensors, fp32); format "llmc" is one llm.c model file (fp32 or bf16)."""
    if format == "llmc":
        from .llmc import write_model
        write_model(path, model.config, _host_flat(model), dtype=dtype)
        return
    if format != "hf":
        raise LlmpyError(f"unknown model format {format!r}; use 'hf' (a directory) or 'llmc' (an llm.c .bin file)")
    if dtype != "fp32":
        raise LlmpyError(f"Hugging Face directories are written in fp32, not {dtype}")
    from safetensors.numpy import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".model.safetensors.tmp"
    save_file(model.state_dict(), str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path / "model.safetensors")
    slow_write_hook()
    atomic_write_json(path / "config.json", hf_config(model.config))


def _host_flat(model) -> np.ndarray:
    flat = model.params.flat
    return flat if model.xp is np else model.xp.asnumpy(flat)


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
    from .llmc import bf16_bits_to_fp32
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


def _check_float_tensors(sd: dict, source):
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


# Hugging Face hub names llmpy knows the shape of; any "owner/name" also tries the hub.
HF_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _from_hub(name: str) -> Path:
    """Download (or find in the local cache) a GPT-2 model from the Hugging Face hub."""
    need_local = (f"{name}: not a local model; pass a directory with config.json + model.safetensors "
                  f"(or an llm.c .bin file)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LlmpyError(f"{need_local}; downloading {name!r} from the hub needs `pip install huggingface_hub`") from None
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:          # older huggingface_hub: no specific reasons, only the generic one
        LocalEntryNotFoundError = RepositoryNotFoundError = ()
    try:
        return Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except LocalEntryNotFoundError:
        raise LlmpyError(f"{need_local}; the Hugging Face hub is not reachable (offline, or HF_HUB_OFFLINE is "
                         f"set) and {name!r} is not in the local cache") from None
    except RepositoryNotFoundError:
        raise LlmpyError(f"{need_local}; the Hugging Face hub has no model {name!r}") from None
    except Exception as e:      # network trouble of any kind: one line for the user
        why = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0]
        raise LlmpyError(f"{need_local}; fetching it from the Hugging Face hub failed ({why[:160]})") from None


def load(path, device: str = "cpu", dtype: str = "fp32"):
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors,
    or pytorch_model.bin when torch is installed), an llm.c model file, or a
    Hugging Face hub name such as "gpt2" (downloaded when online)."""
    from .model import GPT
    spec = str(path)
    path = Path(path)
    if not path.exists():
        if spec in HF_HUB_NAMES or ("/" in spec and _REPO_ID.match(spec)):
            path = _from_hub(spec)
        else:
            raise LlmpyError(f"{path}: no such model directory or file; pass a directory with config.json + "
                             f"model.safetensors, an llm.c .bin file, or a hub name ({', '.join(HF_HUB_NAMES)})")
    if path.is_file():
        from .llmc import read_model
        cfg, flat = read_model(path)
        model = GPT(cfg, device=device, init=False, dtype=dtype)
        model.params.flat[:] = model.xp.asarray(flat)
        model.params_updated()
        return model
    cfg = read_hf_config(path / "config.json")
    if (path / "model.safetensors").exists():
        weights = path / "model.safetensors"
        sd = read_safetensors(weights)
    elif (path / "pytorch_model.bin").exists():
        weights = path / "pytorch_model.bin"
        sd = read_pytorch_bin(weights)
    else:
        raise LlmpyError(f"{path}: no model.safetensors (or pytorch_model.bin) in this directory")
    _check_float_tensors(sd, weights)
    check_shapes(sd, cfg, weights)
    model = GPT(cfg, device=device, init=False, dtype=dtype)
    model.load_state_dict(sd, source=str(weights))
    return model


# ---------------------------------------------------------------------- training checkpoints

CKPT_PREFIX = "ckpt_"


def save_training_checkpoint(out_dir, step: int, model, optimizer, train_state: dict, keep: int = 0,
                             comm=None) -> Path:
    """out_dir/ckpt_<step>/ with the model (HF), optimizer state, train_state.json
    and manifest.json. Built under a temporary name and renamed into place.

    With a communicator and a sharded optimizer (ZeRO-1) every rank calls this:
    each rank writes its own slice of AdamW's state (optimizer.rank<r>.safetensors),
    rank 0 the model and train_state.json, which lists the slices. Otherwise
    only rank 0 calls it and optimizer.safetensors holds all of m and v."""
    from safetensors.numpy import save_file
    out_dir = Path(out_dir)
    final = out_dir / f"{CKPT_PREFIX}{step:08d}"
    sharded = comm is not None and optimizer.shard is not None
    rank = comm.rank if sharded else 0
    xp = model.xp
    host = (lambda a: a) if xp is np else xp.asnumpy
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not np.isfinite(_host_flat(model)).all():
            raise LlmpyError(f"step {step}: the weights contain NaN or inf; not writing a checkpoint of them")
    if not sharded:
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{final.name}.", suffix=".tmp"))
    else:
        # every rank must find the directory: a fixed name, made by rank 0
        tmp = out_dir / f".{final.name}.ranks.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        comm.barrier()
    try:
        if sharded:
            name = f"optimizer.rank{rank:05d}.safetensors"
            # (no safetensors metadata: its key order is not stable, and the
            # bounds are in train_state.json)
            save_file({"m": host(optimizer.m), "v": host(optimizer.v)}, str(tmp / name))
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            comm.barrier()                      # every slice is on disk
            if rank != 0:
                comm.barrier()                  # wait until rank 0 has published the checkpoint
                return final
            n = model.params.flat.size
            from .dist import shard_bounds
            train_state = dict(train_state, optimizer_shards=[
                {"file": f"optimizer.rank{r:05d}.safetensors", "start": a, "stop": b}
                for r in range(comm.world_size) for a, b in [shard_bounds(n, r, comm.world_size)]])
        else:
            save_file({"m": host(optimizer.m), "v": host(optimizer.v)}, str(tmp / "optimizer.safetensors"))
        save_model(model, tmp)
        slow_write_hook()
        atomic_write_json(tmp / "train_state.json", dict(train_state, step=step, adam_step=optimizer.step_count))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files}
        atomic_write_json(tmp / "manifest.json", {"step": step, "files": manifest})
        fsync_dir(tmp)
        if final.exists():
            _remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    slow_write_hook()
    if keep and keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            _remove_checkpoint(old)
    if sharded:
        comm.barrier()
    return final


def _remove_checkpoint(path: Path):
    """Delete a checkpoint so that a crash midway never leaves a half-deleted
    ckpt_* behind: first rename it to a hidden name (atomic), then delete that."""
    trash = path.with_name(f".{path.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(out_dir) -> list[Path]:
    """Delete what a crashed run left behind: half-built (.ckpt_*.tmp) and
    half-deleted (.ckpt_*.old) checkpoint directories. Returns what it removed."""
    out_dir = Path(out_dir)
    stale = [p for p in out_dir.glob(f".{CKPT_PREFIX}*") if p.name.endswith((".tmp", ".old"))] \
        if out_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


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
        manifest = json.loads((path / "manifest.json").read_bytes())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "manifest.json is unreadable"
    if not isinstance(files, dict) or not files:
        return "manifest.json lists no files"
    for name in ("model.safetensors", "train_state.json"):
        if name not in files:
            return f"manifest.json does not list {name}"
    if "optimizer.safetensors" not in files and not any(_SHARD_FILE.match(name) for name in files):
        return "manifest.json lists no optimizer state (optimizer.safetensors or optimizer.rank*.safetensors)"
    for name, meta in files.items():
        if not isinstance(meta, dict) or "/" in name or "\\" in name or name in ("", ".", ".."):
            return f"manifest.json has a malformed entry {name!r}"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta.get("bytes"):
            return f"{name} has the wrong size"
        if sha256_file(f) != meta.get("sha256"):
            return f"{name} fails its sha256 check"
    return None


def load_training_checkpoint(path, model, optimizer) -> dict:
    """Restore model weights and optimizer state in place; returns train_state.
    Everything is checked before anything is changed.

    The optimizer gets the part of m and v it keeps: all of it, or its slice
    (ZeRO-1), read from optimizer.safetensors or from the slices a sharded
    run wrote, whatever the world size was: state saved by 4 ranks loads into
    2 or 1 and the other way round."""
    path = Path(path)
    sd = read_safetensors(path / "model.safetensors")
    _check_float_tensors(sd, path / "model.safetensors")
    from .model import from_hf
    host = from_hf(sd, model.config, source=str(path / "model.safetensors"))
    state = read_train_state(path / "train_state.json")
    n = model.params.flat.size
    lo, hi = optimizer.shard or (0, n)
    m, v = (_read_optimizer_slice(path, state, n, lo, hi, k) for k in ("m", "v"))
    model.params.flat[:] = model.xp.asarray(host.flat)
    model.params_updated()
    optimizer.load_state_dict({"m": model.xp.asarray(m), "v": model.xp.asarray(v), "step": state["adam_step"]})
    return state


_SHARD_FILE = re.compile(r"^optimizer\.rank\d+\.safetensors$")


def _read_optimizer_slice(path: Path, state: dict, n: int, lo: int, hi: int, key: str) -> np.ndarray:
    """Values [lo, hi) of optimizer state `key` ("m" or "v"), from optimizer.safetensors
    or from the slices listed in train_state.json, reading only what is needed."""
    from safetensors import SafetensorError, safe_open
    pieces = state.get("optimizer_shards") or [{"file": "optimizer.safetensors", "start": 0, "stop": n}]
    if pieces[-1]["stop"] != n:
        raise LlmpyError(f"{path / 'train_state.json'}: the optimizer state covers {pieces[-1]['stop']} values, "
                         f"this model has {n}; was it saved for another model?")
    out = np.empty(hi - lo, dtype=np.float32)
    for piece in pieces:
        a, b = max(lo, piece["start"]), min(hi, piece["stop"])
        if a >= b:
            continue
        f = path / piece["file"]
        try:
            with safe_open(str(f), framework="numpy") as st:
                t = st.get_slice(key)
                size = t.get_shape()
                if size != [piece["stop"] - piece["start"]] or t.get_dtype() != "F32":
                    raise LlmpyError(f"{f}: optimizer state {key!r} is {t.get_dtype()} of shape {size}, expected "
                                     f"F32 of [{piece['stop'] - piece['start']}]; the checkpoint is corrupt")
                out[a - lo:b - lo] = t[a - piece["start"]:b - piece["start"]]
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LlmpyError(f"{f}: optimizer state {key!r} is missing or unreadable ({why}); "
                             f"the checkpoint is incomplete") from None
    return out


def read_train_state(path) -> dict:
    """train_state.json, with the fields a resume relies on checked."""
    path = Path(path)
    state = read_json_object(path, missing="missing; the checkpoint is incomplete", fix="the checkpoint is corrupt")
    for key in ("step", "adam_step"):
        if type(state.get(key)) is not int or state[key] < 0:
            raise LlmpyError(f"{path}: {key!r} must be a non-negative integer, got {state.get(key)!r}")
    shards = state.get("optimizer_shards")
    if shards is not None:
        ok = isinstance(shards, list) and shards and all(
            isinstance(p, dict) and isinstance(p.get("file"), str) and _SHARD_FILE.match(p["file"])
            and type(p.get("start")) is int and type(p.get("stop")) is int for p in shards)
        if not ok or shards[0]["start"] != 0 or any(a["stop"] != b["start"] for a, b in zip(shards, shards[1:])):
            raise LlmpyError(f"{path}: 'optimizer_shards' must list optimizer.rank*.safetensors files with "
                             f"contiguous start/stop; the checkpoint is corrupt")
    loader = state.get("loader")
    if not isinstance(loader, dict) or any(type(loader.get(k)) is not int for k in ("epoch", "position")):
        raise LlmpyError(f"{path}: 'loader' (the data position: epoch, position) is missing or malformed")
    return state
