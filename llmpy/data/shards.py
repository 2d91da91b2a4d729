"""Token shard files and the DataLoader that cuts them into training batches.

A shard is llm.c's format (formats/llmc.py reads and writes its header), so
shards made by llm.c's scripts work here and ours work in llm.c:

    header: 256 x int32, little-endian: [magic, version, ntok, 0, ...]
    body:   ntok token ids, little-endian:
            uint16 under [20240520, 1] (GPT-2), uint32 under [20240801, 7] (Llama 3)

uint16 holds ids up to 65535, enough for GPT-2's 50257 and half the size of
uint32, which Llama 3's 128256 ids need. The body is read through np.memmap:
the OS pages in only the windows that a batch touches, so a dataset far
larger than RAM costs almost no memory.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from ..errors import LlmpyError
from ..fileio import atomic_file
from ..formats.llmc import HEADER_BYTES, SHARD_KINDS, read_shard_header, shard_header

_REBUILD = "rebuild it, e.g. re-run `llmpy prepare pydoc`"


# --------------------------------------------------------------------------- files

def write_shard(path, tokens, dtype=np.uint16) -> None:
    """Write `tokens` to `path` as a shard of `dtype`, atomically.

    dtype=np.uint16 (the default) is llm.c's GPT-2 shard, ids in [0, 65536).
    dtype=np.uint32 is its Llama 3 shard (magic 20240801, version 7), ids in
    [0, 2**32): use it when asked for (llm.c's Llama 3 training reads only
    that kind) or when an id is >= 65536, which uint16 refuses rather than
    truncating.

    The bytes go to a temporary file in the same directory, are fsynced, and
    only then renamed over `path`: a crash leaves either the old file or the
    new one, never a half-written shard that looks valid.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise LlmpyError(f"write_shard {path}: tokens must be 1-D, got shape {tokens.shape}")
    try:
        kind = np.dtype(dtype).newbyteorder("<")
    except TypeError:
        kind = None
    if kind not in SHARD_KINDS:
        raise LlmpyError(f"write_shard {path}: dtype must be np.uint16 (GPT-2 shard) or "
                         f"np.uint32 (Llama 3 shard), got {dtype!r}")
    dtype = kind
    limit = 1 << (8 * dtype.itemsize)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= limit):
        wider = ", or pass dtype=np.uint32" if dtype.itemsize == 2 else ""
        raise LlmpyError(f"write_shard {path}: token ids must lie in [0, {limit}) to fit "
                         f"{dtype.name}{wider}; got range [{tokens.min()}, {tokens.max()}]")
    body = tokens.astype(dtype)

    with atomic_file(path) as f:
        f.write(shard_header(tokens.size, dtype))
        f.write(body.tobytes())


def read_shard(path) -> np.ndarray:
    """The tokens of a shard, shape (ntok,), as a read-only memmap: uint16
    or uint32, whichever its header says (see the module doc).

    Everything about the file is checked before it is trusted: a truncated
    download or a file of another format fails here with one line naming the
    file, instead of as garbage batches later.
    """
    path = Path(path)
    if not path.is_file():
        raise LlmpyError(f"token shard {path} does not exist; {_REBUILD}")
    ntok, dtype = read_shard_header(path, _REBUILD)
    if ntok == 0:    # np.memmap refuses to map zero bytes
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


# --------------------------------------------------------------------- the loader

class DataLoader:
    """Batches (x, y) of shape (B, T) from token shards, for one rank.

    Windows. A shard with n tokens holds (n - 1) // T windows; window i is the
    T + 1 tokens [i*T, i*T + T + 1). Consecutive windows share one token, the
    last target of one being the first input of the next (as in llm.c), so
    each epoch every token is a target once, except a shard's first token and
    a tail of fewer than T tokens.

    Epochs. An epoch visits every window of every shard exactly once. With
    shuffle=True the shard order, and the window order inside each shard, are
    fresh random permutations each epoch, fixed by (seed, epoch); with
    shuffle=False everything is in file order. Going shard by shard (rather
    than shuffling all windows together) keeps reads local to one memmap.

    Ranks. The epoch's window sequence is cut into global batches of
    B * world_size windows; rank r takes windows [r*B, (r+1)*B) of each. So
    ranks never read the same window, and together they read what one process
    with batch B * world_size would. A partial global batch at the end of an
    epoch is dropped: every step sees full batches on every rank.

    The whole state is (epoch, position): `state_dict()` saved with a
    checkpoint and `load_state_dict()` make a resumed run read exactly the
    batches the uninterrupted run would have read.

    Shards may be uint16 (GPT-2) or uint32 (Llama 3), but all of one loader
    must be the same kind: a mix means two tokenizers' ids in one dataset.
    """

    def __init__(self, pattern, B: int, T: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        for name, v in (("B", B), ("T", T), ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise LlmpyError(f"DataLoader: {name} must be a positive integer, got {v!r}")
        if not 0 <= rank < world_size:
            raise LlmpyError(f"DataLoader: rank {rank} is outside [0, world_size={world_size})")
        self.B, self.T = int(B), int(T)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)

        self.files = _expand(pattern)
        self.shards = [read_shard(f) for f in self.files]
        self.dtype = _one_dtype(self.files, self.shards, pattern)
        self.num_tokens = sum(len(s) for s in self.shards)
        # windows per shard, shape (n_shards,)
        self.shard_windows = np.array([max(len(s) - 1, 0) // self.T for s in self.shards],
                                      dtype=np.int64)
        self.num_windows = int(self.shard_windows.sum())
        self.global_batch = self.B * self.world_size     # windows per step, all ranks
        if self.num_windows < self.global_batch:
            raise LlmpyError(
                f"data {_describe(pattern)} is too small for B={self.B}, T={self.T}"
                f"{f', world_size={self.world_size}' if self.world_size > 1 else ''}: "
                f"{self.num_tokens} tokens make {self.num_windows} windows of T+1 tokens, "
                f"one step needs {self.global_batch}; use a smaller B or T, or more data")
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self.reset()

    def check_vocab(self, vocab_size: int, model: str) -> None:
        """One line naming the shard holding an id >= vocab_size, which the
        model's embedding could not look up (shards of another tokenizer).
        Only the pattern's first shard is read (~0.1 s per 100M tokens): one
        tokenizer made them all, and a pass over every shard of a
        billions-of-tokens corpus would cost minutes before the first step."""
        for f, s in list(zip(self.files, self.shards))[:1]:
            top = int(s.max()) if s.size else -1
            if top >= vocab_size:
                raise LlmpyError(f"token shard {f} holds token id {top:,}, but model {model} has a vocabulary of "
                                 f"{vocab_size:,} ids; prepare the data with the model's tokenizer (llmpy "
                                 "prepare FILES --tokenizer DIR, DIR holding its tokenizer.json), or use a "
                                 "model of that tokenizer's vocabulary (--model)")

    # --- state -------------------------------------------------------------

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch = 0
        self.position = 0     # index, in this epoch's window order, of the next global batch
        self._start_epoch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise LlmpyError(f"DataLoader state {state} does not fit this data "
                             f"({self.num_windows} windows per epoch); was it saved for other data?")
        self.epoch, self.position = epoch, position
        self._start_epoch()

    # --- epoch order ---------------------------------------------------------

    def _start_epoch(self) -> None:
        """Fix this epoch's shard order and where each shard starts in it."""
        n = len(self.shards)
        self._order = self._rng(self.epoch).permutation(n) if self.shuffle else np.arange(n)
        # _starts[k] = position of the first window of the k-th shard visited
        counts = self.shard_windows[self._order]
        self._starts = np.concatenate([[0], np.cumsum(counts)])   # (n_shards + 1,)
        self._perm_cache.clear()

    def _rng(self, *keys: int) -> np.random.Generator:
        # Seeding with the tuple (seed, epoch, ...) rather than seed + epoch
        # keeps (seed=0, epoch=1) and (seed=1, epoch=0) from sharing an order.
        return np.random.default_rng([self.seed, *keys])

    def _window_order(self, shard: int) -> np.ndarray:
        """Order in which this epoch visits the windows of one shard."""
        key = (self.epoch, shard)
        if key not in self._perm_cache:
            n = int(self.shard_windows[shard])
            if self.shuffle:
                perm = self._rng(self.epoch, shard).permutation(n)
            else:
                perm = np.arange(n)
            if len(self._perm_cache) >= 4:     # a batch spans at most a few shards
                self._perm_cache.clear()
            self._perm_cache[key] = perm
        return self._perm_cache[key]

    # --- batches -------------------------------------------------------------

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both int32 of shape (B, T), with y[b, t] = x[b, t + 1] within a window."""
        if self.position + self.global_batch > self.num_windows:
            self.epoch += 1             # drop the partial global batch
            self.position = 0
            self._start_epoch()
        first = self.position + self.rank * self.B
        w = np.empty((self.B, self.T + 1), dtype=np.int32)   # (B, T+1)
        for b in range(self.B):
            shard, window = self._locate(first + b)
            start = window * self.T
            w[b] = self.shards[shard][start:start + self.T + 1]
            # a uint32 id >= 2**31 wraps to a negative int32 in the copy above
            if self.dtype.itemsize == 4 and w[b].min() < 0:
                raise LlmpyError(f"token shard {self.files[shard]} holds an id >= 2**31, beyond any "
                                 f"vocabulary (corrupt?); {_REBUILD}")
        self.position += self.global_batch
        # contiguous copies: callers hand these straight to kernels / the GPU
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    def _locate(self, pos: int) -> tuple[int, int]:
        """Position in the epoch's window order -> (shard index, window index)."""
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        shard = int(self._order[k])
        return shard, int(self._window_order(shard)[pos - self._starts[k]])


def _expand(pattern) -> list[str]:
    """A glob pattern, a path, or a list of those -> sorted, de-duplicated paths."""
    pats = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    files = []
    for p in pats:
        p = os.path.expanduser(os.fspath(p))
        hits = sorted(glob.glob(p))
        if not hits:
            raise LlmpyError(f"no token shards match {p!r}; check the path or create them "
                             "with `llmpy prepare pydoc`")
        files += [h for h in hits if h not in files]
    if not files:
        raise LlmpyError("DataLoader was given an empty list of token shards")
    return files


def _one_dtype(files, shards, pattern) -> np.dtype:
    """The token dtype shared by all shards, or one line naming two that differ."""
    first = {}
    for f, s in zip(files, shards):
        first.setdefault(s.dtype, f)
    if len(first) > 1:
        (a, fa), (b, fb) = list(first.items())[:2]
        raise LlmpyError(f"data {_describe(pattern)} mixes {a.name} shards ({fa}) with {b.name} "
                         f"shards ({fb}), i.e. two tokenizers' ids; give one kind per data pattern")
    return next(iter(first))


def _describe(pattern) -> str:
    if isinstance(pattern, (str, os.PathLike)):
        return repr(os.fspath(pattern))
    return f"({len(list(pattern))} files)"
