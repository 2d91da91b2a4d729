"""Atomic file writes, file hashes and JSON reads, shared by every file in llmpy.

A file written here appears whole or not at all: the bytes go to a temporary
file in the same directory, which is fsynced and then renamed over the target
(a rename within one file system is atomic), and the directory is fsynced so
the rename itself survives a power cut. A crash leaves the old file or the new
one, never a half-written file that looks valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from .errors import LlmpyError


@contextlib.contextmanager
def atomic_file(path):
    """Open `path` for binary writing; it is renamed into place only when the
    with-block ends without an exception (the temporary is removed otherwise,
    even on Ctrl-C)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.chmod(tmp, umask_mode(0o666))      # mkstemp makes it 0600; a file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    slow_write_hook()


def umask_mode(mode: int) -> int:
    """`mode` less the process's umask: the permissions open() and mkdir()
    give new files (0o666) and directories (0o777), which tempfile's private
    0600 / 0700 would otherwise replace (shards, checkpoints and converted
    models are meant to be read by the group that shares them)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def make_temp_dir(parent, prefix: str, suffix: str) -> Path:
    """A new directory in `parent` (for building something to rename into
    place), with the mode mkdir would give it."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(path, umask_mode(0o777))
    return path


def atomic_write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """tensors as a safetensors file at `path`, whole or not at all, with the
    umask's mode (the library writes its files 0600)."""
    from safetensors.numpy import save_file
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, umask_mode(0o666))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes):
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_dir(path):
    """Make renames inside `path` durable (a no-op where directories cannot be opened)."""
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


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def slow_write_hook():
    """Tests only: LLMPY_TEST_SLOW_CHECKPOINT=seconds sleeps after every file
    written, so that a test can kill a run in the middle of a checkpoint."""
    delay = os.environ.get("LLMPY_TEST_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))
