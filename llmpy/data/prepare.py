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
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LlmpyError
from .shards import read_shard, write_shard
from .tokenizer import Tokenizer

DATASETS = ("pydoc", "tinyshakespeare", "tinystories", "fineweb-edu", "hellaswag")


def prepare(name: str, out_dir=None, **kw) -> dict:
    """Build the shards of dataset `name` in out_dir (default data/<name>)."""
    if name not in DATASETS:
        raise LlmpyError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name != "pydoc":
        raise LlmpyError(f"dataset {name!r} is not implemented yet; use pydoc")
    return prepare_pydoc(out_dir if out_dir is not None else os.path.join("data", name), **kw)


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
