"""`llmpy prepare pydoc`: the offline corpus becomes valid, disjoint train/val shards."""
import os
from pathlib import Path

import pytest
from pydoc_data.topics import topics

from llmpy.data import DataLoader, Tokenizer, read_shard
from llmpy.data.prepare import prepare, prepare_pydoc
from llmpy.errors import LlmpyError

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("pydoc")
    return out, prepare_pydoc(out)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _docs(tok, path):
    """The documents of a shard: its text split at the eot tokens that start each one."""
    text = tok.decode(read_shard(path))
    assert text.startswith(EOT)
    return text.split(EOT)[1:]


def test_result_and_files(prepared):
    out, r = prepared
    assert r["train"] == str(out / "pydoc_train_000000.bin")
    assert r["val"] == str(out / "pydoc_val_000000.bin")
    assert len(read_shard(r["train"])) == r["train_tokens"]
    assert len(read_shard(r["val"])) == r["val_tokens"]
    assert sorted(os.listdir(out)) == ["pydoc_train_000000.bin", "pydoc_val_000000.bin"]


def test_token_counts_reasonable(prepared):
    _, r = prepared
    chars = sum(len(t) for t in topics.values())
    total = r["train_tokens"] + r["val_tokens"]
    assert chars / 6 < total < chars / 2          # English + code: ~3-4 characters per token
    assert 0.08 < r["val_tokens"] / total < 0.3   # about val_fraction=0.1, whole documents


def test_text_is_recognizable(prepared, tok):
    _, r = prepared
    train = tok.decode(read_shard(r["train"]))
    val = tok.decode(read_shard(r["val"]))
    assert topics["with"][:300] in train
    assert topics["assert"][:300] in val          # "assert" sorts first: a val document
    assert "statement" in train and "Python" in train


def test_splits_are_disjoint_whole_documents(prepared, tok):
    _, r = prepared
    train, val = _docs(tok, r["train"]), _docs(tok, r["val"])
    names = sorted(topics)
    # val is a prefix of the sorted topics, train the rest: each document once
    assert val + train == [topics[n] for n in names]
    assert not set(train) & set(val)


def test_shards_feed_the_loader(prepared):
    _, r = prepared
    x, y = DataLoader(r["train"], B=4, T=64).next_batch()
    assert x.shape == (4, 64) and x.max() < 50257


def test_second_run_is_a_noop(prepared, capsys):
    out, r = prepared
    paths = [Path(r["train"]), Path(r["val"])]
    before = [p.stat().st_mtime_ns for p in paths]
    again = prepare_pydoc(out)
    assert again == r
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert "nothing to do" in capsys.readouterr().out


def test_corrupt_shard_is_rebuilt(tmp_path, capsys):
    r = prepare_pydoc(tmp_path)
    Path(r["val"]).write_bytes(b"half a file")
    again = prepare_pydoc(tmp_path)
    assert again == r
    assert len(read_shard(r["val"])) == r["val_tokens"]
    assert "rebuilding" in capsys.readouterr().out


def test_prepare_dispatch_default_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = prepare("pydoc")
    assert Path(r["train"]).resolve() == (tmp_path / "data" / "pydoc" / "pydoc_train_000000.bin")


def test_pydoc_rejects_corpus_options(tmp_path):
    # the downloaded corpora are tested in test_prepare_corpora.py (no network)
    with pytest.raises(LlmpyError, match="--max-tokens"):
        prepare("pydoc", out_dir=tmp_path, max_tokens=10)


def test_unknown_dataset(tmp_path):
    with pytest.raises(LlmpyError, match="pydoc"):
        prepare("wikipedia", out_dir=tmp_path)
