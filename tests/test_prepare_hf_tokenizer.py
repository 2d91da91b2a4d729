"""`llmpy prepare PATH --tokenizer TOK`: your text through a Hugging Face tokenizer.json.

References, none of them llmpy: the `tokenizers` library itself (a byte-level
BPE trained here) gives the expected ids and decodes the shards; the shard
files are read with struct and numpy by llm.c's layout (dev/data/data_common.py:
a 256 x int32 header [magic, version, ntok, ...], then the ids).
"""
import json
import math
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmpy.cli import main
from llmpy.data import prepare as prep

EOT_TEXT = "<|end_of_text|>"
LLMC_KINDS = {(20240520, 1): "<u2", (20240801, 7): "<u4"}    # data_common.py HEADERS_INFO: gpt-2, llama-3
LLAMA3 = (20240801, 7)
GPT2 = (20240520, 1)

# The literal eot text inside a document must stay text, never a boundary.
DOCS = [
    "The lighthouse keeper counted ships and wrote their names in a book. " * 8
    + f"A line that says {EOT_TEXT} is only text. " * 3,
    "Über den Wolken, ça va? 東京は大きい。 Привет, мир! def f(x):\n\treturn x\r\n\n" * 8,
]


def make_tokenizer(path: Path, vocab_size: int = 300, pad_tokens: int = 0, eot: bool = True) -> Tokenizer:
    """A byte-level BPE trained on DOCS, saved to path. pad_tokens added tokens
    come first: a vocabulary over 65,536 cheaply, with the eot id beyond them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(DOCS, trainer)
    tok.add_tokens([f"<pad_{i}>" for i in range(pad_tokens)])
    if eot:
        tok.add_special_tokens([EOT_TEXT])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def reference(tok: Tokenizer, docs) -> np.ndarray:
    """eot + ids of each document, special-token text in a document split as text."""
    tok.encode_special_tokens = True
    eot = tok.token_to_id(EOT_TEXT)
    return np.array([i for d in docs for i in [eot] + tok.encode(d, add_special_tokens=False).ids], dtype=np.int64)


def read_llmc(path: Path) -> tuple[tuple[int, int], np.ndarray]:
    """((magic, version), ids) of an llm.c shard."""
    data = path.read_bytes()
    magic, version, ntok = struct.unpack("<3i", data[:12])
    ids = np.frombuffer(data[256 * 4:], dtype=LLMC_KINDS[magic, version])
    assert ids.size == ntok
    return (magic, version), ids.astype(np.int64)


def shard_files(out: Path, name: str) -> list[Path]:
    return sorted(out.glob(f"{name}_val_*.bin")) + sorted(out.glob(f"{name}_train_*.bin"))


def write_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "a.txt", folder / "b.md"]
    for p, d in zip(paths, DOCS):
        p.write_text(d, encoding="utf-8", newline="")
    return paths


def prepare(capsys, inputs, out, *flags) -> list[str]:
    """`llmpy prepare` on inputs; its stdout lines."""
    rc = main(["prepare", *map(str, inputs), "--out", str(out), "--no-progress", *map(str, flags)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out.strip().splitlines()


def check_shards(out: Path, name: str, tok: Tokenizer, kind: tuple[int, int]) -> list[np.ndarray]:
    """The shards are llm.c files of `kind` holding the reference stream, which decodes to the documents."""
    files = shard_files(out, name)
    assert len(files) >= 2
    read = [read_llmc(f) for f in files]
    assert {k for k, _ in read} == {kind}
    ids = np.concatenate([t for _, t in read])
    np.testing.assert_array_equal(ids, reference(tok, DOCS))
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == "".join(EOT_TEXT + d for d in DOCS)
    assert int((ids == tok.token_to_id(EOT_TEXT)).sum()) == len(DOCS)     # the literal eot text stayed text
    return [t for _, t in read]


def one_error_line(capsys, rc) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], captured.err
    return lines[0]


# ------------------------------------------------------------------ small and large vocabularies

def test_small_vocabulary_gives_uint16_shards_and_llama_trains_on_them(tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert tok.get_vocab_size() < 65536
    out = tmp_path / "data"
    lines = prepare(capsys, write_inputs(tmp_path / "src"), out, "--tokenizer", tmp_path / "tok" / "tokenizer.json",
                    "--workers", "1", "--name", "mine")
    check_shards(out, "mine", tok, GPT2)

    # the command prepare suggests trains, as it says
    hint = next(line for line in lines if "train on it with: llmpy " in line)
    args = shlex.split(hint.split("train on it with: llmpy ", 1)[1])
    assert args[:3] == ["train", "--model", "llama3-tiny"]
    run = tmp_path / "run"
    rc = main(args + ["-B", "2", "-T", "16", "--steps", "2", "--val-every", "1", "--val-steps", "1",
                      "--sample-every", "0", "--out", str(run), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    val = [r["val_loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert val and abs(val[0] - math.log(50257)) < 1.5          # ~uniform over llama3-tiny's vocabulary at init


def test_large_vocabulary_gives_llama3_shards_that_a_small_model_refuses(tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "big" / "tokenizer.json", pad_tokens=66_000)
    eot = tok.token_to_id(EOT_TEXT)
    assert tok.get_vocab_size() > 65536 and eot >= 65536
    out = tmp_path / "data"
    lines = prepare(capsys, write_inputs(tmp_path / "src"), out, "--tokenizer", tmp_path / "big", "--workers", "1")
    check_shards(out, "a", tok, LLAMA3)
    assert "--model llama3.2-1b " in lines[-2]           # the smallest preset whose vocabulary holds 66,3xx ids

    # the val split ends inside the second document: only the val shard holds an eot id
    val, train = shard_files(out, "a")
    assert read_llmc(train)[1].max() < 50257 <= read_llmc(val)[1].max() == eot
    rc = main(["train", "--model", "llama3-tiny", "--data", str(train), "--val-data", str(val), "-B", "1",
               "-T", "8", "--steps", "1", "--sample-every", "0", "--out", str(tmp_path / "run"), "--no-progress"])
    line = one_error_line(capsys, rc)
    assert str(val) in line and f"{eot:,}" in line and "50,257" in line, line


# ------------------------------------------------------------------ re-runs and workers

def test_rerun_is_a_no_op_and_a_changed_tokenizer_redoes_it(tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    make_tokenizer(path)
    inputs, out = write_inputs(tmp_path / "src"), tmp_path / "data"
    args = (inputs, out, "--tokenizer", path, "--workers", "1")
    prepare(capsys, *args)
    old = [p.read_bytes() for p in shard_files(out, "a")]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    lines = prepare(capsys, *args)
    assert "nothing to do" in lines[0]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before

    retrained = make_tokenizer(path, vocab_size=360)        # same path, other merges, other ids
    assert "rebuilding" in "\n".join(prepare(capsys, *args))
    check_shards(out, "a", retrained, GPT2)
    assert [p.read_bytes() for p in shard_files(out, "a")] != old
    # and GPT-2's tokenizer again (no --tokenizer) is another setting too
    assert "rebuilding" in "\n".join(prepare(capsys, inputs, out, "--workers", "1"))


def test_two_workers_write_the_same_bytes_as_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 100)           # many worker tasks even on two documents
    make_tokenizer(tmp_path / "big.json", pad_tokens=66_000)
    inputs = write_inputs(tmp_path / "src")
    for workers in (1, 2):
        prepare(capsys, inputs, tmp_path / f"w{workers}", "--tokenizer", tmp_path / "big.json",
                "--workers", workers, "--shard-size", 150)
    one, two = shard_files(tmp_path / "w1", "a"), shard_files(tmp_path / "w2", "a")
    assert len(one) > 3 and [p.name for p in one] == [p.name for p in two]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


# ------------------------------------------------------------------ mistakes

def _folder_without_one(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _not_json(d: Path) -> Path:
    (d / "t.json").write_text("{not json")
    return d / "t.json"


def _no_eot(d: Path) -> Path:
    make_tokenizer(d / "t.json", eot=False)
    return d / "t.json"


BAD_TOKENIZERS = {
    "missing": (lambda d: d / "nope.json", "nope.json does not exist"),
    "folder without one": (_folder_without_one, "no tokenizer.json in directory"),
    "not json": (_not_json, "not a readable tokenizer.json"),
    "no eot token": (_no_eot, "no end-of-text special token"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZERS))
def test_bad_tokenizer_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    make, message = BAD_TOKENIZERS[case]
    where = tmp_path / "toks"
    where.mkdir()
    tok_path = make(where)
    inputs = write_inputs(tmp_path / "src")
    rc = main(["prepare", *map(str, inputs), "--out", str(tmp_path / "data" / "out"), "--tokenizer", str(tok_path),
               "--workers", "1", "--no-progress"])
    line = one_error_line(capsys, rc)
    assert message in line and str(tok_path.name) in line, line
    assert not (tmp_path / "data").exists()


def test_tokenizer_is_for_your_own_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                             # no file named like the corpus here
    line = one_error_line(capsys, main(["prepare", "tinyshakespeare", "--tokenizer", "tokenizer.json"]))
    assert "--tokenizer applies to your own files, not to the corpus tinyshakespeare" in line
