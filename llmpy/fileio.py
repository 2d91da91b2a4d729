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
