"""Your own files -> token shards (`llmpy prepare PATH [PATH ...]`).

What is read. Each PATH is a file, a folder or a glob:

    .txt .md .text .markdown   one document per file: its whole text (UTF-8, a leading BOM dropped)
    .jsonl .ndjson (.json)     one document per line: the string in `field` (--field, default "text")
    .parquet                   one document per row: the string in `column` (--column, default "text")

A folder gives the files of those kinds under it, recursively, sorted by
path compared name by name (a subfolder among its siblings' files), hidden
ones left out. A file named directly or matched by a glob is read by its
extension: .json as JSON Lines (what `datasets`' to_json writes; in a folder
a .json is more likely a config file, and skipped), any other as plain text.
Documents keep the order of the paths as given. An empty or null row of a
JSONL or Parquet file is skipped (datasets have them); an empty file is an
error (usually a mistake), and so is any file that cannot be read as what it
claims to be: one line naming the file (and line) and the fix. Every input
is read and parsed once before any tokenizing (which is ~100x slower), so a
bad input is found in seconds.

The token stream is the corpora's (prepare.py, whose worker processes and
shard writer do the work): each document preceded by <|endoftext|>, which
ordinary text can never produce, so the eot positions are exactly the
document starts. With --tokenizer TOK (a Hugging Face tokenizer.json, or a
folder holding one; hf_tokenizer.py) its ids replace GPT-2's and its eot
token separates the documents; the shards are uint16 while its vocabulary
fits (<= 65,536 ids), else llm.c's uint32 Llama 3 kind.

The val split is the start of the stream, N tokens in all:

    target = max(val_fraction * N, min(MIN_VAL_TOKENS, N // 2))

val is the first whole documents once they hold `target` tokens, unless that
takes more than 2 x target (a single document, or a long first one) or leaves
train no document: then val is exactly the first `target` tokens, cut inside
a document. MIN_VAL_TOKENS is one val batch at train's defaults, so a small
file still gives a val shard `llmpy train` can use; N // 2 keeps that
minimum from swallowing a tiny input.

In OUT (default data/NAME): NAME_val_000000.bin, NAME_train_000001.bin, ...
(llm.c's shard format) and NAME_done.json, written last.

Nothing half-written. The tokens (2 or 4 bytes each, until the split is known),
then the shards, go to a hidden staging folder inside OUT; only when every
input has been read do the shards replace an earlier set, and the done-file
follows them. A failure anywhere, Ctrl-C included, removes the staging folder
(and OUT, if this run created it): OUT is as it was. The done-file records
each input's path, size and mtime and the settings, the tokenizer file's
sha256 among them; the same again, with the shards intact, does nothing.
"""
from __future__ import annotations

import collections
import glob
import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np

from ..errors import LlmpyError
from ..fileio import atomic_write_json, fsync_dir, make_temp_dir, sha256_file
from .hf_tokenizer import HFTokenizer
from .prepare import (DATASETS, SHARD_SIZE, _corpus_result, _finished, _pyarrow_parquet, _ShardWriter,
                      _tokenize, check_positive, token_dtype)
from .tokenizer import EOT

KINDS = {".txt": "text", ".md": "text", ".text": "text", ".markdown": "text",
         ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
NAMED_KINDS = {**KINDS, ".json": "jsonl"}
VAL_FRACTION = 0.1
MIN_VAL_TOKENS = 8 * 128 + 1    # train's default B=8 windows of T=128 (+1: the last target)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def corpus_named(args: list[str]) -> str | None:
    """The built-in corpus that `args` name, or None when they are paths.

    A word that is a corpus name and not an existing path is that corpus:
    an existing file or folder of the same name wins.
    """
    corpora = [a for a in args if a in DATASETS and not os.path.exists(a)]
    if not corpora:
        return None
    if len(args) > 1:
        raise LlmpyError(f"{corpora[0]!r} is a built-in corpus: prepare it on its own "
                         f"(`llmpy prepare {corpora[0]}`), not together with files")
    return corpora[0]


def prepare_text(paths, out_dir=None, name: str | None = None, field: str = "text", column: str = "text",
                 val_fraction: float = VAL_FRACTION, shard_size: int = SHARD_SIZE,
                 workers: int | None = None, progress: bool = True, tokenizer=None) -> dict:
    """Tokenize the documents of `paths` (files, folders, globs) into shards in out_dir.

    name: the shards' prefix (default: the first path's stem); out_dir
    defaults to data/NAME. tokenizer: a tokenizer.json or a folder holding
    one (default: GPT-2's). Returns what prepare() returns for a corpus:
    {"val": path, "train": glob, "val_tokens": n, "train_tokens": m, "shards": count}.
    """
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise LlmpyError("prepare needs at least one file, folder or glob")
    if workers is None:
        workers = os.cpu_count() or 1
    check_positive({"--shard-size": shard_size, "--workers": workers})
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise LlmpyError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    tok = HFTokenizer(tokenizer) if tokenizer is not None else None     # a bad path fails before any input is read

    inputs, skipped = find_inputs(paths)
    name = _checked_name(name) if name is not None else _default_name(paths[0], inputs)
    if name in DATASETS:
        raise LlmpyError(f"{name!r} is a built-in corpus's name; give your shards another with --name")
    out = Path(out_dir if out_dir is not None else os.path.join("data", name))
    kinds = {kind for _, kind in inputs}
    stats = [_checked_input(path, kind, column) for path, kind in inputs]

    # Everything the shards depend on; --workers does not change them.
    settings = {"name": name, "inputs": [[os.path.abspath(p), st.st_size, st.st_mtime_ns]
                                         for (p, _), st in zip(inputs, stats)],
                "field": field if "jsonl" in kinds else None,
                "column": column if "parquet" in kinds else None,
                "val_fraction": val_fraction, "min_val_tokens": MIN_VAL_TOKENS, "shard_size": shard_size,
                # the content, not the path: a retrained tokenizer in the same place redoes the shards
                "tokenizer_sha256": sha256_file(tok.path) if tok is not None else None}
    done = out / f"{name}_done.json"
    finished = _finished(done, settings)
    if finished is not None:
        print(f"{name}: {_count(len(inputs), 'input file')} unchanged since the shards in {out} were made "
              f"({finished['train_tokens']:,} train + {finished['val_tokens']:,} val tokens), nothing to do")
        return finished

    # A bad line at the end of a large corpus fails now, not after hours of tokenizing.
    _check_documents(inputs, field, column, progress)
    if done.exists():
        print(f"{name}: inputs or settings differ from {done}; rebuilding")
    for folder, others in skipped.items():
        common = collections.Counter(Path(o).suffix.lower() or "no extension" for o in others).most_common(4)
        print(f"{name}: skipping {_count(len(others), 'file')} of other kinds in {folder} "
              f"({', '.join(f'{n:,} {kind}' for kind, n in common)}{', ...' if len(common) == 4 else ''}); "
              "name a file directly to read it as text")

    documents, written = _staged(out, name, inputs, field, column, val_fraction, shard_size, workers, progress, tok)
    record = {**settings, "documents": documents, "tokenizer": str(tok.path.resolve()) if tok is not None else None}
    result = _install(out, name, written, record)
    print(f"{name}: wrote {result['shards']} shards to {out} ({result['train_tokens']:,} train + "
          f"{result['val_tokens']:,} val tokens; {_count(documents, 'document')} from "
          f"{_count(len(inputs), 'file')})")
    if result["train_tokens"] < MIN_VAL_TOKENS:
        print(f"{name}: note: {result['train_tokens']:,} train tokens are less than one batch at train's "
              f"defaults (B=8, T=128 need {MIN_VAL_TOKENS:,}): train with smaller -B and -T, or add text")
    print(f"{name}: train on it with: llmpy train {_model_flag(tok)}--data '{result['train']}' "
          f"--val-data '{result['val']}'")
    return result


def _model_flag(tok: HFTokenizer | None) -> str:
    """`--model DIR ` for a tokenizer of a model directory (DIR has a
    config.json: the model to fine-tune, whose samples then decode with it),
    else `--model P ` for the smallest Llama preset whose vocabulary holds the
    tokenizer's ids (train's default GPT-2 model has only GPT-2's); none for
    GPT-2's tokenizer."""
    if tok is None:
        return ""
    if tok.path.name == "tokenizer.json" and (tok.path.parent / "config.json").is_file():
        return f"--model {shlex.quote(str(tok.path.parent))} "
    from ..llama_layout import PRESETS
    fits = [p for p, cfg in PRESETS.items() if cfg.vocab_size >= tok.vocab_size]
    return f"--model {fits[0]} " if fits else f"--model MODEL (a model of >= {tok.vocab_size:,} ids) "


def _staged(out: Path, name: str, inputs, field, column, val_fraction, shard_size, workers, progress, tok):
    """_build in a hidden folder of `out`; on any failure (Ctrl-C too) the folder
    goes, and so do `out` and its parents if this run created them."""
    missing = [d for d in (out, *out.parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out, prefix=f".{name}.", suffix=".partial")
    try:
        return _build(staging, name, _documents(inputs, field, column), val_fraction, shard_size,
                      workers, progress, tok)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in missing:               # deepest first; stop at one that is not empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _install(out: Path, name: str, written: list[tuple[str, int]], record: dict) -> dict:
    """Move the staged shards into `out` in place of an earlier set; the done-file last.

    Un-finish first, then drop the earlier set (a glob must never mix two
    runs): an interruption in between leaves no done-file, so the next run
    rebuilds.
    """
    done = out / f"{name}_done.json"
    done.unlink(missing_ok=True)
    for split in ("val", "train"):
        for old in glob.glob(f"{glob.escape(str(out))}/{name}_{split}_*.bin"):
            os.unlink(old)
    installed = []
    for path, n in written:
        os.replace(path, out / Path(path).name)
        installed.append((str(out / Path(path).name), n))
    shutil.rmtree(Path(written[0][0]).parent)          # the staging folder, now empty
    fsync_dir(out)
    atomic_write_json(done, {**record, "files": [[Path(p).name, n] for p, n in installed]})
    return _corpus_result(out, name, installed)


# --- which files ---------------------------------------------------------------------

def find_inputs(paths: list[str]) -> tuple[list[tuple[Path, str]], dict[str, list[str]]]:
    """[(file, kind)] in order, each file once; and {folder: [files skipped there]}."""
    inputs, seen, skipped = [], set(), {}

    def take(path: str, kind: str):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            inputs.append((Path(path), kind))

    for arg in paths:
        path = os.path.expanduser(arg)
        if os.path.exists(path):
            hits = [path]
        elif any(c in path for c in "*?["):
            hits = sorted(glob.glob(path, recursive=True))
            if not hits:
                raise LlmpyError(f"no file matches {arg!r}; check the pattern (quote it so the shell "
                                 "leaves it to llmpy)")
        else:
            word = not any(c in arg for c in "./" + os.sep)     # perhaps a corpus name mistyped
            corpora = f"; the built-in corpora are {', '.join(DATASETS)}" if word else ""
            raise LlmpyError(f"{arg}: no such file or folder{corpora}")
        for hit in hits:
            if os.path.isdir(hit):
                found = _walk(hit, skipped)
                if not found:
                    raise LlmpyError(f"{hit} holds no {', '.join(KINDS)} files; point prepare at the files")
                for f in found:
                    take(f, KINDS[Path(f).suffix.lower()])
            elif os.path.isfile(hit):
                take(hit, NAMED_KINDS.get(Path(hit).suffix.lower(), "text"))
            else:
                raise LlmpyError(f"{hit} is not a regular file or folder; leave it out of the inputs")
    return inputs, skipped


def _walk(folder: str, skipped: dict) -> list[str]:
    """The files of known kinds under folder, sorted, hidden files and folders left out."""
    def refuse(e: OSError):
        raise LlmpyError(f"cannot read folder {e.filename} ({e.strerror}); fix its permissions "
                         "or leave it out")
    found = []
    for root, dirs, names in os.walk(folder, onerror=refuse):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            if Path(n).suffix.lower() in KINDS:
                found.append(os.path.join(root, n))
            else:
                skipped.setdefault(folder, []).append(os.path.join(root, n))
    return sorted(found, key=lambda f: Path(f).parts)


def _checked_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise LlmpyError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names files)")
    return name


def _default_name(first: str, inputs) -> str:
    """The first path's stem: a file's stem, a folder's name; for a glob, the
    folder it searches (its first file's stem when that is the current one)."""
    path = Path(os.path.abspath(os.path.expanduser(first)))
    if not path.exists():                       # a glob: cut it at its first wildcard
        parts = path.parts
        path = Path(*parts[:next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))])
        if path == Path.cwd():
            path = inputs[0][0].with_suffix("")
    stem = path.stem if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "text"


def _checked_input(path: Path, kind: str, column: str) -> os.stat_result:
    """Fail now, before any tokenizing, on what a glance shows: unreadable, empty, no such column."""
    try:
        st = path.stat()
        with open(path, "rb"):
            pass
    except OSError as e:
        raise LlmpyError(f"cannot read {path} ({e.strerror}); fix its permissions or leave it out") from None
    if st.st_size == 0:
        raise LlmpyError(f"{path} is empty; fill it or leave it out of the inputs")
    if kind == "parquet":
        names, types = _parquet_schema(path)      # first: it says how to install pyarrow
        import pyarrow as pa
        if column not in names:
            raise LlmpyError(f"{path} has no column {column!r} (it has {', '.join(map(repr, names[:8]))}); "
                             "name the text column with --column")
        kind_of = types[names.index(column)]
        if not (pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of)):
            raise LlmpyError(f"{path}: column {column!r} holds {kind_of}, not strings; "
                             "name the text column with --column")
    return st


def _parquet_schema(path: Path) -> tuple[list[str], list]:
    pq = _pyarrow_parquet("reading .parquet files needs")
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:    # pyarrow's errors derive from these
        raise LlmpyError(f"{path} is not a readable Parquet file ({e}); check it or leave it out") from None
    return list(schema.names), list(schema.types)


# --- the documents in them -------------------------------------------------------------

def _documents(inputs, field: str, column: str):
    """(None, text) per document, file by file: the corpora's form (no split of its own)."""
    for path, kind in inputs:
        n = 0
        read = {"text": _text_file, "jsonl": lambda p: _jsonl_file(p, field),
                "parquet": lambda p: _parquet_file(p, column)}[kind]
        for text in read(path):
            n += 1
            yield None, text
        if n == 0:
            what = {"text": "only whitespace", "jsonl": f"no line with a non-empty {field!r}",
                    "parquet": f"no row with a non-empty {column!r}"}[kind]
            raise LlmpyError(f"{path} holds {what}; fill it or leave it out of the inputs")


def _check_documents(inputs, field: str, column: str, progress: bool) -> None:
    """Read and parse every input, keeping nothing: the first bad one raises its one line."""
    from tqdm import tqdm
    # delay: a bar only when checking takes a while, never for small inputs
    with tqdm(inputs, unit="file", desc="checking inputs", delay=2, leave=False,
              disable=not progress) as files:
        for one in files:
            for _ in _documents([one], field, column):
                pass


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LlmpyError(f"cannot read {path} ({e.strerror}); fix its permissions or leave it out") from None


def _decoded(data: bytes, where: str, bom: bool) -> str:
    """UTF-8 text, or one line: a NUL byte means a binary file, other bad bytes another encoding."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise LlmpyError(f"{where} is binary, not text (a NUL byte at offset {nul}); leave it out of the inputs")
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        raise LlmpyError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert it (e.g. iconv -f latin1 -t utf-8) or leave it out") from None


def _text_file(path: Path):
    text = _decoded(_read_bytes(path), str(path), bom=True)
    if text.strip():
        yield text


def _jsonl_file(path: Path, field: str):
    fix = f"each line must be a JSON object with a {field!r} string (or name the field with --field)"
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LlmpyError(f"cannot read {path} ({e.strerror}); fix its permissions or leave it out") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path} line {line_no}"
            line = _decoded(raw, where, bom=line_no == 1)
            if not line.strip():
                continue
            if line.lstrip().startswith("[") and line_no == 1:
                raise LlmpyError(f"{path} is a JSON array, not JSON Lines; convert it with "
                                 f"`jq -c '.[]' {path} > {path.with_suffix('.jsonl')}`")
            try:
                obj = json.loads(line.rstrip("\r\n"))     # so that e.colno is within this line
            except json.JSONDecodeError as e:
                raise LlmpyError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {fix}") from None
            except (ValueError, RecursionError) as e:
                raise LlmpyError(f"{where}: not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
            if not isinstance(obj, dict):
                raise LlmpyError(f"{where}: a JSON {_json_type(obj)}, not an object; {fix}")
            if field not in obj:
                keys = ", ".join(map(repr, list(obj)[:8])) or "no fields"
                raise LlmpyError(f"{where}: no {field!r} field (it has {keys}); name the text field with --field")
            text = obj[field]
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise LlmpyError(f"{where}: {field!r} is a JSON {_json_type(text)}, not a string; {fix}")
            yield text


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(v), "null")


def _parquet_file(path: Path, column: str):
    pq = _pyarrow_parquet("reading .parquet files needs")
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text:               # None and "" are empty rows
                    yield text
    except (OSError, ValueError) as e:    # pyarrow's errors derive from these
        raise LlmpyError(f"{path} is not a readable Parquet file ({e}); check it or leave it out") from None


# --- tokens, split, shards ---------------------------------------------------------------

class _TokenFile:
    """The token stream on disk while its length, and so the split, is unknown.

    Plays _ShardWriter's part for _tokenize (add, full, max_tokens): tokens
    are appended to one flat file of `dtype`, and the position of every eot,
    i.e. of every document's start, is kept.
    """
    max_tokens = None
    full = False

    def __init__(self, path: Path, eot: int, dtype: np.dtype):
        self.path, self.eot, self.dtype = path, eot, np.dtype(dtype).newbyteorder("<")
        self.file = open(path, "wb")
        self.total = 0
        self.starts: list[np.ndarray] = []    # eot positions, per batch

    def add(self, tokens: np.ndarray) -> int:
        self.file.write(tokens.astype(self.dtype).tobytes())
        self.starts.append(np.flatnonzero(tokens == self.eot) + self.total)
        self.total += tokens.size
        return int(tokens.size)

    def close(self) -> None:
        self.file.close()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (N,) memmap of dtype, document starts (D,) int64); N > 0."""
        return (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.total,)),
                np.concatenate(self.starts))


def val_size(starts: np.ndarray, total: int, val_fraction: float) -> int:
    """Tokens in the val split: the rule of this module's docstring.

    starts: (D,) the position of each document's first token (its eot), 0 first.
    """
    target = max(math.ceil(val_fraction * total), min(MIN_VAL_TOKENS, total // 2))
    target = min(max(target, 1), total - 1)
    k = int(np.searchsorted(starts, target, side="left"))   # first document starting at >= target
    if k < len(starts) and starts[k] <= 2 * target:
        return int(starts[k])       # documents 0..k-1 whole; train starts with document k
    return target


def _build(staging: Path, name: str, docs, val_fraction: float, shard_size: int, workers: int,
           progress: bool, tok: HFTokenizer | None) -> tuple[int, list[tuple[str, int]]]:
    """Tokenize docs (with tok, None: GPT-2's), split, write the shards into staging.
    Returns (documents, [(path, tokens)])."""
    dtype = token_dtype(tok.vocab_size) if tok is not None else np.dtype(np.uint16)
    stream = _TokenFile(staging / "tokens.bin", tok.eot if tok is not None else EOT, dtype)
    try:
        # the workers get the path (absolute: their working folder is the forkserver's) and build it themselves
        _tokenize(docs, stream, workers, progress, name, str(tok.path.resolve()) if tok is not None else None)
    finally:
        stream.close()
    tokens, starts = stream.read()      # every input holds a document: N >= 2
    writer = _ShardWriter(staging, name, shard_size, val_size(starts, stream.total, val_fraction), None, None,
                          dtype)
    writer.add(tokens)
    writer.finish()
    del tokens
    os.unlink(stream.path)
    return len(starts), writer.written
