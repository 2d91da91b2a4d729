"""Corpora -> token shards.

`pydoc` is the corpus that needs no network: every CPython ships the English
text of its language reference and library docs as `pydoc_data.topics.topics`
(a dict of ~80 topic name -> text, ~465K characters, ~100K GPT-2 tokens), the
text behind `help("for")`. That is small enough to tokenize in a second and
large enough to watch a small model learn English and Python.

Documents are joined the way llm.c does it: each one is preceded by the
<|endoftext|> token, so the model learns where documents begin and the
first token of every document has a well-defined context.

Note the topics differ slightly between Python versions, and so do the shards.

The other corpora are downloaded from their public homes (see download.py:
resumable, verified, atomic) into OUT/downloads/, then tokenized by worker
processes into llm.c-format shards of `shard_size` tokens:

    NAME_val_000000.bin     the first val_tokens tokens (llm.c's val split)
    NAME_train_000001.bin   then shard_size tokens per shard
    NAME_train_000002.bin   ...
    NAME_done.json          written last: the shard list, so a finished set is not redone

    tinyshakespeare  karpathy/char-rnn input.txt, split at blank lines; val = 32,768 tokens
    tinystories      roneneldan/TinyStories (hub) tar.gz of data*.json; val = data00.json
    fineweb-edu      HuggingFaceFW/fineweb-edu sample/10BT parquet files, one by one;
                     val = the first shard
    hellaswag        rowanz/hellaswag jsonl, only downloaded (the eval tokenizes it)

Your own files (.txt, .md, .jsonl, .parquet, folders, globs) go through the
same tokenizing workers and shard writer: text.py.
"""
from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import re
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..errors import LlmpyError
from ..fileio import atomic_write_json
from .download import NotFound, download, endpoint
from .hf_tokenizer import HFTokenizer
from .shards import read_shard, write_shard
from .tokenizer import Tokenizer

DATASETS = ("pydoc", "tinyshakespeare", "tinystories", "fineweb-edu", "hellaswag")


def prepare(name: str, out_dir=None, **kw) -> dict:
    """Build the shards of dataset `name` in out_dir (default data/<name>)."""
    if name not in DATASETS:
        raise LlmpyError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    out_dir = out_dir if out_dir is not None else os.path.join("data", name)
    if name == "pydoc":
        kw.pop("progress", None)          # a second's work: no bar
    # Options that only make sense for the tokenized downloads are an error
    # elsewhere, rather than silently ignored.
    allowed = {"pydoc": {"val_fraction"}, "hellaswag": {"splits", "progress"}}.get(name)
    if allowed is not None and set(kw) - allowed:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(set(kw) - allowed))
        raise LlmpyError(f"{flags} only apply to the tokenized download corpora "
                         f"(tinyshakespeare, tinystories, fineweb-edu), not {name}")
    if allowed is None and "splits" in kw:
        raise LlmpyError(f"--split chooses hellaswag's splits; {name} has its own val split "
                         "(--val-tokens sets its size)")
    if name == "pydoc":
        return prepare_pydoc(out_dir, **kw)
    if name == "hellaswag":
        return prepare_hellaswag(out_dir, **kw)
    return prepare_corpus(name, out_dir, **kw)


def prepare_pydoc(out_dir="data/pydoc", val_fraction: float = 0.1) -> dict:
    """Tokenize the Python docs into pydoc_val_000000.bin and pydoc_train_000000.bin.

    The validation split is the first documents, in topic-name order, until
    they hold at least `val_fraction` of all tokens; the rest is training data.
    Whole documents go to one side, so no text is in both splits.

    Idempotent: if both shards already exist and are valid, nothing is written.
    Returns {"train": path, "val": path, "train_tokens": n, "val_tokens": m}.
    """
    if not 0 < val_fraction < 1:
        raise LlmpyError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    paths = {split: out / f"pydoc_{split}_000000.bin" for split in ("val", "train")}

    existing = _valid_shards(paths)
    if existing is not None:
        print(f"pydoc: shards already in {out} "
              f"({existing['train_tokens']:,} train + {existing['val_tokens']:,} val tokens), "
              "nothing to do")
        return existing

    from pydoc_data.topics import topics      # stdlib; imported only when needed

    names = sorted(topics)                    # dict order is not part of any contract
    print(f"pydoc: tokenizing {len(names)} topics "
          f"({sum(len(topics[n]) for n in names):,} characters)")
    tok = Tokenizer()
    docs = [[tok.eot] + ids for ids in tok.encode_batch([topics[n] for n in names])]

    total = sum(len(d) for d in docs)
    n_val, val_tokens = 0, 0                  # documents / tokens in the val split
    while val_tokens < val_fraction * total and n_val < len(docs) - 1:   # keep >= 1 for train
        val_tokens += len(docs[n_val])
        n_val += 1
    splits = {"val": docs[:n_val], "train": docs[n_val:]}

    n_tokens = {}
    for split, chunk in splits.items():
        tokens = np.concatenate([np.asarray(d, dtype=np.uint16) for d in chunk])
        write_shard(paths[split], tokens)
        print(f"pydoc: wrote {paths[split]} ({len(chunk)} documents, {tokens.size:,} tokens)")
        n_tokens[split] = int(tokens.size)
    return _result(paths, n_tokens)


def _result(paths: dict, n_tokens: dict) -> dict:
    return {"train": str(paths["train"]), "val": str(paths["val"]),
            "train_tokens": n_tokens["train"], "val_tokens": n_tokens["val"]}


def _valid_shards(paths: dict) -> dict | None:
    """The result dict if every shard in `paths` exists and reads back valid, else None."""
    n_tokens = {}
    for split, path in paths.items():
        if not path.is_file():
            return None
        try:
            n_tokens[split] = int(read_shard(path).size)
        except LlmpyError as e:
            print(f"pydoc: rebuilding: {e}")
            return None
    return _result(paths, n_tokens)


# ===================================================================== downloaded corpora

SHARD_SIZE = 100_000_000          # tokens per shard, as llm.c (200 MB of uint16)
TINYSHAKESPEARE_VAL_TOKENS = 32_768
BATCH_CHARS = 1_000_000           # characters per task sent to a worker (~250K tokens)
HELLASWAG_SPLITS = ("train", "val", "test")
_DATA_EXTRA = "pip install 'llmpy[data]'"


def prepare_corpus(name: str, out_dir, shard_size: int = SHARD_SIZE, workers: int | None = None,
                   max_tokens: int | None = None, shards: int | None = None,
                   val_tokens: int | None = None, progress: bool = True) -> dict:
    """Download corpus `name` and tokenize it into shards in out_dir.

    shard_size: tokens per train shard (and the val shard's, unless val_tokens).
    workers:    tokenizer processes (default: one per CPU).
    max_tokens / shards: stop after that many tokens / shards in all (val
                included), downloading only what they need: a quick start
                on a corpus of billions of tokens.
    val_tokens: size of the val shard (default: 32,768 for tinyshakespeare,
                as llm.c; shard_size otherwise).

    Returns {"val": path, "train": glob of the train shards, "val_tokens": n,
    "train_tokens": m, "shards": count}.
    """
    if name not in _CORPORA:
        raise LlmpyError(f"{name!r} is not a tokenized corpus; choose one of: {', '.join(_CORPORA)}")
    if workers is None:
        workers = os.cpu_count() or 1
    if val_tokens is None:
        val_tokens = TINYSHAKESPEARE_VAL_TOKENS if name == "tinyshakespeare" else shard_size
    check_positive({"--shard-size": shard_size, "--workers": workers, "--max-tokens": max_tokens,
                    "--shards": shards, "--val-tokens": val_tokens})

    out = Path(out_dir)
    settings = {"name": name, "shard_size": shard_size, "val_tokens": val_tokens,
                "max_tokens": max_tokens, "shards": shards}
    done = out / f"{name}_done.json"
    finished = _finished(done, settings)
    if finished is not None:
        print(f"{name}: {finished['shards']} shards already in {out} "
              f"({finished['train_tokens']:,} train + {finished['val_tokens']:,} val tokens), "
              "nothing to do")
        return finished

    # Starting (again): first un-finish, then remove shards of an earlier run
    # with other settings, so that a glob never mixes two runs.
    done.unlink(missing_ok=True)
    for old in glob.glob(str(out / f"{name}_val_*.bin")) + glob.glob(str(out / f"{name}_train_*.bin")):
        os.unlink(old)

    writer = _ShardWriter(out, name, shard_size, val_tokens, max_tokens, shards)
    docs = _CORPORA[name](out / "downloads", progress)
    _tokenize(docs, writer, workers, progress, name)
    writer.finish()

    result = writer.result()
    # The marker goes last, atomically: its presence means the set is whole.
    atomic_write_json(done, {**settings, "files": [[Path(p).name, n] for p, n in writer.written]})
    print(f"{name}: wrote {result['shards']} shards to {out} "
          f"({result['train_tokens']:,} train + {result['val_tokens']:,} val tokens)")
    return result


# --- the corpora: each yields (split, text), split "val", "train" or None --------
#
# None means "no split of its own": the first val_tokens tokens become val.
# A corpus with its own val documents (TinyStories' data00.json) labels them;
# when the first "train" document arrives the val shard is closed.

def _tinyshakespeare(downloads: Path, progress: bool):
    url = f"{endpoint('github_raw')}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    path = download(url, downloads / "input.txt", progress=progress)
    text = path.read_text(encoding="utf-8")
    # One "document" per paragraph (speech), as llm.c: each keeps its
    # trailing blank line, so eot + the text reproduce the file exactly.
    sections = text.split("\n\n")
    for i, section in enumerate(sections):
        yield None, section + "\n\n" if i < len(sections) - 1 else section


def _tinystories(downloads: Path, progress: bool):
    url = f"{endpoint('hf')}/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
    archive = download(url, downloads / "TinyStories_all_data.tar.gz", hub_checksum=True,
                       progress=progress)
    folder = _extract_json_members(archive, downloads / "TinyStories_all_data")
    for path in sorted(folder.glob("data*.json")):
        split = "val" if path.name == "data00.json" else "train"   # llm.c's val file
        try:
            stories = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise LlmpyError(f"{path} is not valid JSON ({e}); delete {folder} and run again") from None
        for story in stories:
            yield split, story["story"].strip()


def _fineweb_edu(downloads: Path, progress: bool):
    pq = _pyarrow_parquet()
    base = f"{endpoint('hf')}/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT"
    for i in range(1000):
        name = f"{i:03d}_00000.parquet"
        try:
            # Files are fetched one at a time, only when the previous one is
            # used up: with --max-tokens, the rest is never downloaded.
            path = download(f"{base}/{name}", downloads / name, hub_checksum=True, progress=progress)
        except NotFound:
            if i == 0:
                raise
            return                         # the numbered files have run out
        try:
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
                for text in batch.column(0).to_pylist():
                    yield None, text
        except (OSError, KeyError, ValueError) as e:   # pyarrow's errors derive from these
            raise LlmpyError(f"{path} is not a readable parquet file with a 'text' column ({e}); "
                             "delete it and run again") from None


_CORPORA = {"tinyshakespeare": _tinyshakespeare, "tinystories": _tinystories,
            "fineweb-edu": _fineweb_edu}


def check_positive(flags: dict) -> None:
    """One line for the first flag (name -> value; None: not given) that is not a positive integer."""
    for flag, v in flags.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise LlmpyError(f"{flag} must be a positive integer, got {v!r}")


def _pyarrow_parquet(what: str = "fineweb-edu comes as parquet files, which need"):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmpyError(f"{what} pyarrow; run `{_DATA_EXTRA}`") from None
    return pq


def _extract_json_members(archive: Path, folder: Path) -> Path:
    """Unpack the data*.json files of a .tar.gz into folder, once.

    A gzip stream cannot seek, so the archive is read in one pass in its
    own order and every member is written out; then the files can be read
    in sorted order (data00.json, the val split, first). Only plain files
    named data<digits>.json are taken, by base name, so no member can
    write outside `folder`. Each is renamed into place when whole, and
    `.complete` marks the end, so an interrupted unpacking is redone.
    """
    complete = folder / ".complete"
    if complete.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"unpacking {archive.name} into {folder}")
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if not (member.isfile() and re.fullmatch(r"data\d+\.json", base)):
                    continue
                part = folder / (base + ".part")
                with tar.extractfile(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(part, folder / base)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise LlmpyError(f"{archive} is not a readable .tar.gz ({e}); delete it and run again") from None
    if not any(folder.glob("data*.json")):
        raise LlmpyError(f"{archive} holds no data*.json files; delete it and run again")
    complete.write_text("")
    return folder


# --- tokenizing in worker processes ----------------------------------------------

def _batches(docs, batch_chars: int):
    """Group (split, text) into (split, [texts]) of about batch_chars characters.

    A task per document would drown in inter-process overhead (a TinyStory is
    ~200 tokens); a batch never mixes splits, so the val boundary survives.
    """
    split, texts, chars = None, [], 0
    for s, text in docs:
        if texts and (s != split or chars >= batch_chars):
            yield split, texts
            texts, chars = [], 0
        split = s
        texts.append(text)
        chars += len(text)
    if texts:
        yield split, texts


_worker_tokenizers: dict = {}       # (tokenizer path (None: GPT-2), its mtime, size) -> tokenizer, per process


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 (llm.c's GPT-2 shards) while every id fits, else uint32 (its Llama 3 shards)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _encode_docs(texts: list[str], tokenizer_path: str | None = None) -> np.ndarray:
    """Runs in a worker: eot + tokens of each text, concatenated, as token_dtype.

    tokenizer_path: a tokenizer.json (HFTokenizer), None for GPT-2's. Each
    process builds its own from the path, once (~1 s): a short string goes
    with every task, never a tokenizer object. The file's mtime and size are
    in the key, so that a tokenizer retrained in place is read again.
    """
    st = os.stat(tokenizer_path) if tokenizer_path is not None else None
    key = (tokenizer_path, st and st.st_mtime_ns, st and st.st_size)
    tok = _worker_tokenizers.get(key)
    if tok is None:
        tok = Tokenizer() if tokenizer_path is None else HFTokenizer(tokenizer_path)
        _worker_tokenizers[key] = tok
    ids = [tok.encode(t) for t in texts]
    dtype = np.uint16 if tokenizer_path is None else token_dtype(tok.vocab_size)
    out = np.empty(len(ids) + sum(len(d) for d in ids), dtype=dtype)
    pos = 0
    for d in ids:
        out[pos] = tok.eot
        out[pos + 1:pos + 1 + len(d)] = d
        pos += 1 + len(d)
    return out


def _encoded(batches, workers: int, tokenizer_path: str | None = None):
    """(split, tokens) for each batch, in input order, from `workers` processes
    (tokenizer_path: _encode_docs's).

    At most 2 tasks per worker are in flight, so reading (and downloading)
    keeps pace with tokenizing, and stopping early stops everything. Results
    come back in submission order, so the shards do not depend on the number
    of workers. A worker that dies (killed, out of memory) raises
    BrokenProcessPool here instead of leaving the wait without an end, as
    multiprocessing.Pool would.

    Workers start from forkserver, never by a fork of this process: a lock that
    another thread holds at the moment of a fork (tqdm's monitor, an HTTP
    server beside a caller, the allocator's) stays held forever in the child.
    It costs under 0.1 s per run.
    """
    if workers == 1:                   # no processes to start: same results, less overhead
        for split, texts in batches:
            yield split, _encode_docs(texts, tokenizer_path)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    pending = collections.deque()
    try:
        for split, texts in batches:
            pending.append((split, pool.submit(_encode_docs, texts, tokenizer_path)))
            if len(pending) >= 2 * workers:
                s, f = pending.popleft()
                yield s, f.result()
        while pending:
            s, f = pending.popleft()
            yield s, f.result()
    except BrokenProcessPool as e:
        # The pool's own clean-up joins the workers still alive without
        # stopping them (CPython 3.11), and they wait for work that will
        # never come: stop them here, or the join (and we) would wait for ever.
        for worker in list(getattr(pool, "_processes", {}).values()):
            worker.kill()
        raise LlmpyError(f"a tokenizer worker process died ({e}); run again with --workers 1 "
                         f"to see its error") from None
    finally:                           # also on an early stop: drop what is queued, wait for the rest
        pool.shutdown(wait=True, cancel_futures=True)


def _tokenize(docs, writer, workers: int, progress: bool, name: str, tokenizer_path: str | None = None) -> None:
    from tqdm import tqdm
    with tqdm(total=writer.max_tokens, unit="tok", unit_scale=True, desc=f"{name} tokens",
              disable=not progress) as bar:
        for split, tokens in _encoded(_batches(docs, BATCH_CHARS), workers, tokenizer_path):
            if split == "train":
                writer.end_val()
            bar.update(writer.add(tokens))
            if writer.full:
                break


class _ShardWriter:
    """Cuts one long token stream into shards: val first, then train, as they fill."""

    def __init__(self, out: Path, name: str, shard_size: int, val_tokens: int,
                 max_tokens: int | None, max_shards: int | None, dtype=np.uint16):
        self.out, self.name, self.dtype = out, name, np.dtype(dtype)
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.max_tokens, self.max_shards = max_tokens, max_shards
        self.buf = np.empty(val_tokens, dtype=self.dtype)   # the shard being filled
        self.fill = 0                                      # tokens in buf
        self.total = 0                                     # tokens taken, all shards
        self.written: list[tuple[str, int]] = []           # (path, tokens) per shard

    @property
    def full(self) -> bool:
        return ((self.max_tokens is not None and self.total >= self.max_tokens)
                or (self.max_shards is not None and len(self.written) >= self.max_shards))

    def add(self, tokens: np.ndarray) -> int:
        """Take tokens (cut at max_tokens); returns how many were taken."""
        if self.max_tokens is not None:
            tokens = tokens[:max(self.max_tokens - self.total, 0)]
        taken = 0
        while taken < tokens.size and not self.full:
            n = min(self.buf.size - self.fill, tokens.size - taken)
            self.buf[self.fill:self.fill + n] = tokens[taken:taken + n]
            self.fill += n
            taken += n
            self.total += n
            if self.fill == self.buf.size:
                self._flush()
        return taken

    def end_val(self) -> None:
        """The corpus's own val documents are over: close the val shard even if not full."""
        if not self.written and self.fill:
            self._flush()

    def finish(self) -> None:
        if self.fill and not (self.max_shards is not None and len(self.written) >= self.max_shards):
            self._flush()

    def _flush(self) -> None:
        index = len(self.written)
        split = "val" if index == 0 else "train"
        path = self.out / f"{self.name}_{split}_{index:06d}.bin"
        write_shard(path, self.buf[:self.fill], dtype=self.dtype)
        self.written.append((str(path), self.fill))
        self.fill = 0
        if index == 0 and self.buf.size != self.shard_size:
            self.buf = np.empty(self.shard_size, dtype=self.dtype)

    def result(self) -> dict:
        if not self.written:
            raise LlmpyError(f"{self.name}: the corpus produced no tokens; delete "
                             f"{self.out / 'downloads'} and run again")
        return _corpus_result(self.out, self.name, self.written)


def _corpus_result(out: Path, name: str, written: list[tuple[str, int]]) -> dict:
    """What prepare returns, from the (path, tokens) of each shard, val first."""
    return {"val": written[0][0],
            "train": str(out / f"{name}_train_*.bin"),
            "val_tokens": written[0][1],
            "train_tokens": sum(n for _, n in written[1:]),
            "shards": len(written)}


def _finished(done: Path, settings: dict) -> dict | None:
    """The result of an earlier run with the same settings, if its shards are all intact."""
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if {k: record.get(k) for k in settings} != settings:
        return None
    written = []
    for name, n in record.get("files", []):
        path = done.parent / name
        try:
            if read_shard(path).size != n:
                return None
        except LlmpyError:
            return None
        written.append((str(path), n))
    if not written:
        return None
    return _corpus_result(done.parent, settings["name"], written)


# ===================================================================== hellaswag

def prepare_hellaswag(out_dir="data/hellaswag", splits=("val",), progress: bool = True) -> dict:
    """Download HellaSwag's jsonl files (one 4-way multiple-choice item per line).

    Nothing is tokenized here: the eval tokenizes context + each ending itself.
    GitHub publishes no checksum, so the size is what is verified, and the
    first line is checked to be a HellaSwag item.
    Returns {split: path}.
    """
    result = {}
    for split in splits:
        if split not in HELLASWAG_SPLITS:
            raise LlmpyError(f"hellaswag has no split {split!r}; choose from {', '.join(HELLASWAG_SPLITS)}")
        url = f"{endpoint('github_raw')}/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
        path = download(url, Path(out_dir) / f"hellaswag_{split}.jsonl", progress=progress)
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        try:
            item = json.loads(first)
            ok = isinstance(item, dict) and "ctx" in item and "endings" in item
        except ValueError:
            ok = False
        if not ok:
            raise LlmpyError(f"{path} (from {url}) is not HellaSwag jsonl; delete it and run again")
        result[split] = str(path)
    return result
