"""Training checkpoints: what an exact resume needs, written so a crash cannot lose it.

A checkpoint directory is a Hugging Face GPT-2 or Llama directory
(config.json + model.safetensors, written by formats.save_model; see
formats/hf.py, hf_llama.py), so transformers' `from_pretrained(dir)` loads it
as it is. Beside
it, a training checkpoint keeps what an exact resume needs: AdamW's m and v
(optimizer.safetensors) and train_state.json (step, data position, flags), a
copy of the run's tokenizer.json when it has one (a Llama's: so that `llmpy
sample` and `--resume` decode with it), and a manifest.json, written last,
with the size and sha256 of every file.

Every write is atomic: files are written under a temporary name, fsynced and
renamed; a checkpoint directory is built under a temporary name and renamed
into place, so a crash never leaves something that looks finished. Deleting
an old checkpoint (--keep) renames it to a hidden name first, so a crash never
leaves a half-deleted one either; `--resume` clears such leftovers.

Every reader checks what it reads against the file and against the model
before it changes anything, and fails with one LlmpyError line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .errors import LlmpyError
from .fileio import (atomic_write_bytes, atomic_write_json, atomic_write_safetensors, fsync_dir, make_temp_dir,
                     read_json_object, sha256_file, slow_write_hook)
from .formats import save_model
from .formats.hf import check_float_tensors, read_safetensors

CKPT_PREFIX = "ckpt_"

# ---------------------------------------------------------------------- what the training loop calls


def save(out, step: int, model, optimizer, loader, comm, train_config: dict, keep: int, extra: dict | None = None,
         files: dict | None = None):
    """The training loop's checkpoint after `step`: every rank calls this.
    train_state.json records the data position, the flags, the world and
    `extra` (the loop's own state); `files` (name -> bytes: the run's
    tokenizer) are written beside the model."""
    state = {"loader": loader.state_dict(), "train_config": train_config, "model_config": model.config.to_dict(),
             "world_size": comm.world_size, "zero_stage": 0 if optimizer.shard is None else 1, **(extra or {})}
    if optimizer.shard is not None:         # ZeRO-1: every rank writes its slice of AdamW's state
        save_training_checkpoint(out, step, model, optimizer, state, keep=keep, comm=comm, files=files)
    elif comm.rank == 0:                    # otherwise every rank holds the same state: rank 0 writes it
        save_training_checkpoint(out, step, model, optimizer, state, keep=keep, files=files)
    comm.barrier()


def claim(out: Path, resume: bool, overwrite: bool, log) -> Path | None:
    """Make `out` ready for this run (rank 0 calls this, before anything is
    written). A directory that holds a run (checkpoints or a log) is only
    used with --resume (continue it: returns the checkpoint to resume from)
    or --overwrite (start over: its checkpoints, log and plot are deleted);
    otherwise nothing is touched and the error says which to choose."""
    step = run_step(out)
    if step is None:
        if resume:
            log(f"resume: no checkpoint in {out} (no run there yet); starting from step 0")
        return None
    if overwrite:
        for path in list_checkpoints(out):
            _remove_checkpoint(path)
        remove_stale_temporaries(out)
        for name in ("log.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)
        log(f"overwrite: removed the run at step {step} in {out}")
        return None
    if not resume:
        raise LlmpyError(f"{out} holds a run at step {step}: --resume continues it, --overwrite starts over "
                         "(or choose another --out)")
    for p in remove_stale_temporaries(out):
        log(f"resume: removed {p}, left behind by an interrupted run")
    path, problems = newest_verified(out)
    if path is not None:
        for bad, why in problems:
            log(f"resume: skipping {bad}: {why}")
        return path
    if problems:
        raise LlmpyError(f"{out}: no checkpoint verifies ({'; '.join(f'{n}: {why}' for n, why in problems)}); "
                         "--overwrite starts over")
    log(f"resume: {out} has a log up to step {step} but no checkpoint; starting from step 0")
    return None


def newest_verified(out) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest checkpoint in `out` whose manifest verifies, or None;
    [(name, why)] of each newer one that does not, newest first)."""
    problems = []
    for path in reversed(list_checkpoints(out)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, problems
        problems.append((path.name, problem))
    return None, problems


def run_step(out: Path) -> int | None:
    """The step the run in `out` reached (its newest checkpoint's, or its
    log's last line's), or None if `out` holds no run."""
    out = Path(out)
    steps = [int(p.name[len(CKPT_PREFIX):]) for p in list_checkpoints(out)]
    log = out / "log.jsonl"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue       # a line cut short by a crash
    return max(steps) if steps else None


def restore(path: Path, model, optimizer, loader, comm, log) -> dict:
    """Load checkpoint `path` into the model, the optimizer (its slice, for
    ZeRO-1) and the loader; returns its train_state."""
    state = load_training_checkpoint(path, model, optimizer)
    try:
        loader.load_state_dict(state["loader"])
    except LlmpyError as e:
        raise LlmpyError(f"{path / 'train_state.json'}: {e}") from None
    was_world, was_zero = state.get("world_size", 1), state.get("zero_stage", 0)
    zero_stage = 0 if optimizer.shard is None else 1
    if (was_world, was_zero) != (comm.world_size, zero_stage):
        # The AdamW state is re-cut for the new slices (load_training_checkpoint
        # reads whatever slices the checkpoint has), and the data continues from
        # the same global position; but with another number of ranks the batches
        # group differently, so the run is no longer identical to one that was
        # never stopped.
        log(f"resume: {path} was written by {was_world} rank(s) with ZeRO-{was_zero}, this run has "
            f"{comm.world_size} with ZeRO-{zero_stage}: AdamW state re-sharded; training continues, "
            f"but not bitwise as an uninterrupted {was_world}-rank run would")
    log(f"resume: continuing from {path} (step {state['step']})")
    return state


# ---------------------------------------------------------------------- the pieces


def save_training_checkpoint(out_dir, step: int, model, optimizer, train_state: dict, keep: int = 0,
                             comm=None, files: dict | None = None) -> Path:
    """out_dir/ckpt_<step>/ with the model (HF), optimizer state, train_state.json
    and manifest.json, and `files` (name -> bytes). Built under a temporary
    name and renamed into place.

    With a communicator and a sharded optimizer (ZeRO-1) every rank calls this:
    each rank writes its own slice of AdamW's state (optimizer.rank<r>.safetensors),
    rank 0 the model and train_state.json, which lists the slices. Otherwise
    only rank 0 calls it and optimizer.safetensors holds all of m and v."""
    out_dir = Path(out_dir)
    final = out_dir / f"{CKPT_PREFIX}{step:08d}"
    sharded = comm is not None and optimizer.shard is not None
    rank = comm.rank if sharded else 0
    host = model.ops.to_host
    if sharded and model.compute_params is not model.params:
        # ZeRO-1 with a bf16 copy all-gathers only that copy each step
        # (step.HostStep): the fp32 master slices meet here, once per checkpoint
        comm.all_gather(model.params.flat)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not np.isfinite(host(model.params.flat)).all():
            raise LlmpyError(f"step {step}: the weights contain NaN or inf; not writing a checkpoint of them")
    if not sharded:
        tmp = make_temp_dir(out_dir, prefix=f".{final.name}.", suffix=".tmp")
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
            atomic_write_safetensors(tmp / name, {"m": host(optimizer.m), "v": host(optimizer.v)})
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
            atomic_write_safetensors(tmp / "optimizer.safetensors", {"m": host(optimizer.m), "v": host(optimizer.v)})
        save_model(model, tmp)
        for name, data in (files or {}).items():
            atomic_write_bytes(tmp / name, data)
        slow_write_hook()
        atomic_write_json(tmp / "train_state.json", dict(train_state, step=step))
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
        # only this run's older checkpoints, oldest first: a newer number can
        # only be a checkpoint that failed to verify when this run resumed
        older = [p for p in list_checkpoints(out_dir) if int(p.name[len(CKPT_PREFIX):]) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
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
    check_float_tensors(sd, path / "model.safetensors")
    host = model.from_hf(sd, model.config, source=str(path / "model.safetensors"))   # the model's family
    state = read_train_state(path / "train_state.json")
    n = model.params.flat.size
    lo, hi = optimizer.shard or (0, n)
    m, v = (_read_optimizer_slice(path, state, n, lo, hi, k) for k in ("m", "v"))
    model.set_params(host.flat)
    optimizer.load_state_dict({"m": model.xp.asarray(m), "v": model.xp.asarray(v)})
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
    if type(state.get("step")) is not int or state["step"] < 0:
        raise LlmpyError(f"{path}: 'step' must be a non-negative integer, got {state.get('step')!r}")
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
