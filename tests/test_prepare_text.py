"""`llmpy prepare PATH ...`: the user's own files become llm.c shards.

The reference for every shard is built here, independently of prepare's
code: the documents in the order the docstring promises, each tokenized by
tiktoken's GPT-2 encoding (llmpy.data.Tokenizer) after an <|endoftext|>, and
the val split computed from the rule as written in llmpy/data/text.py.
"""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from llmpy.cli import main
from llmpy.data import Tokenizer, read_shard
from llmpy.data import prepare as prep
from llmpy.data import text as text_mod
from llmpy.data.text import prepare_text
from llmpy.errors import LlmpyError

EOT = 50256
MIN_VAL = 8 * 128 + 1          # the docstring's MIN_VAL_TOKENS: one val batch at train's defaults

# Multilingual, emoji, odd whitespace, and the literal eot string, which must
# stay ordinary text (several tokens), never a document boundary.
TEXTS = [
    "Once upon a time there was a lighthouse keeper who counted ships. " * 12,
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Ça va? 東京は大きい。 " * 10,
    "def f(x):\n\treturn x  # tabs\r\n\r\n   trailing spaces   \n" * 14,
    "Emoji 😀🚀🧪 and <|endoftext|> written as text, not a boundary. " * 10,
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم " * 12,
    "The quick brown fox jumps over the lazy dog; 1234567890. " * 13,
    "Markdown # heading\n\n* item one\n* item two\n\n> a quote\n" * 15,
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def stream(tok, texts) -> np.ndarray:
    """The reference token stream: eot + tokens of each document."""
    return np.array([t for text in texts for t in [EOT] + tok.encode(text)], dtype=np.int64)


def expected_val(tok, texts, fraction=0.1) -> int:
    """The val split's size, from the rule in text.py's docstring, by plain loops."""
    lengths = [1 + len(tok.encode(t)) for t in texts]
    n = sum(lengths)
    target = max(math.ceil(fraction * n), min(MIN_VAL, n // 2))
    target = min(max(target, 1), n - 1)
    held = 0
    for k, length in enumerate(lengths[:-1]):     # train keeps at least the last document
        held += length
        if held >= target:
            return held if held <= 2 * target else target
    return target


def shards(out: Path, name: str) -> list[Path]:
    """The shard files of a set: val first, then train by number; nothing else named like them."""
    val = sorted(out.glob(f"{name}_val_*.bin"))
    train = sorted(out.glob(f"{name}_train_*.bin"))
    assert [p.name for p in val] == [f"{name}_val_000000.bin"]
    assert [p.name for p in train] == [f"{name}_train_{i:06d}.bin" for i in range(1, len(train) + 1)]
    return val + train


def check_set(tok, out, name, texts, fraction=0.1, whole_documents=True):
    """The shards hold exactly the reference stream, cut at the expected val size."""
    paths = shards(out, name)
    tokens = [np.asarray(read_shard(p), dtype=np.int64) for p in paths]
    ref = stream(tok, texts)
    np.testing.assert_array_equal(np.concatenate(tokens), ref)
    n_val = expected_val(tok, texts, fraction)
    assert tokens[0].size == n_val
    assert tokens[0][0] == EOT
    # every eot is a document start, and only there
    assert int((ref == EOT).sum()) == len(texts)
    if whole_documents:
        assert tokens[1][0] == EOT                       # train begins with a document
    return tokens


def write_parquet(path, columns: dict, row_group_size=None):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ------------------------------------------------------------------ each input kind

def test_text_files_one_document_each(tmp_path, tok, capsys):
    src = tmp_path / "book"
    src.mkdir()
    for i, text in enumerate(TEXTS):
        (src / f"ch{i:02d}.{'md' if i % 2 else 'txt'}").write_bytes(text.encode())   # bytes: no newline translation
    r = prepare_text([src], tmp_path / "out", workers=1, progress=False)
    tokens = check_set(tok, tmp_path / "out", "book", TEXTS)
    # whole documents: val decodes to the first documents exactly
    n_val_docs = int((tokens[0] == EOT).sum())
    assert tok.decode(tokens[0]) == "".join("<|endoftext|>" + t for t in TEXTS[:n_val_docs])
    assert r["val_tokens"] == tokens[0].size and r["train_tokens"] == sum(t.size for t in tokens[1:])
    assert r["train"] == str(tmp_path / "out" / "book_train_*.bin")
    names = [p.name for p in shards(tmp_path / "out", "book")]
    assert files_under(tmp_path / "out") == sorted(["book_done.json"] + names)
    assert "7 documents from 7 files" in capsys.readouterr().out


def test_bom_is_dropped_and_text_kept_exactly(tmp_path, tok):
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbf" + "Windows\r\nline endings\r\n".encode() * 300)
    prepare_text([tmp_path / "w.txt"], tmp_path / "out", workers=1, progress=False)
    check_set(tok, tmp_path / "out", "w", ["Windows\r\nline endings\r\n" * 300], whole_documents=False)


def test_jsonl_field_blank_and_empty_rows(tmp_path, tok):
    rows = [{"id": i, "body": TEXTS[i], "text": "not this"} for i in range(len(TEXTS))]
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)]
    lines.insert(2, "")                                      # blank line: skipped
    lines.insert(4, json.dumps({"body": ""}))                # empty document: skipped
    lines.insert(5, json.dumps({"body": None}))              # null: skipped
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_text([tmp_path / "d.jsonl"], tmp_path / "out", field="body", workers=1, progress=False)
    check_set(tok, tmp_path / "out", "d", TEXTS)


def test_named_json_is_json_lines_and_skipped_in_folders(tmp_path, tok, capsys):
    src = tmp_path / "ds"
    src.mkdir()
    (src / "train.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (src / "a.txt").write_text(TEXTS[0])
    prepare_text([src / "train.json"], tmp_path / "one", workers=1, progress=False)
    check_set(tok, tmp_path / "one", "train", TEXTS)
    prepare_text([src], tmp_path / "folder", workers=1, progress=False)
    check_set(tok, tmp_path / "folder", "ds", [TEXTS[0]], whole_documents=False)
    assert "skipping 1 file of other kinds" in capsys.readouterr().out
    (tmp_path / "array.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    with pytest.raises(LlmpyError, match=r"array\.json is a JSON array, not JSON Lines; convert it with `jq"):
        prepare_text([tmp_path / "array.json"], tmp_path / "arr", workers=1, progress=False)
    assert not (tmp_path / "arr").exists()


def test_parquet_column_nulls_and_row_groups(tmp_path, tok):
    texts = TEXTS + [None, "", TEXTS[0][:50]]
    write_parquet(tmp_path / "t.parquet", {"n": list(range(len(texts))), "content": texts}, row_group_size=3)
    prepare_text([tmp_path / "t.parquet"], tmp_path / "out", column="content", workers=1, progress=False)
    check_set(tok, tmp_path / "out", "t", TEXTS + [TEXTS[0][:50]])


def test_mixed_folder_glob_and_named_file_in_one_call(tmp_path, tok, capsys):
    src = tmp_path / "mix"
    (src / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "a.txt").write_text(TEXTS[0])
    (src / "b.MD").write_text(TEXTS[1])
    (src / "c.jsonl").write_text(json.dumps({"text": TEXTS[2]}) + "\n" + json.dumps({"text": TEXTS[3]}) + "\n")
    write_parquet(src / "d.parquet", {"text": [TEXTS[4]]})
    (src / "sub" / "e.ndjson").write_text(json.dumps({"text": TEXTS[5]}))   # no final newline
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")                # other kind: skipped
    (src / ".hidden.txt").write_text("hidden")                              # hidden: skipped
    (src / ".git" / "x.txt").write_text("git")
    more = tmp_path / "more"
    more.mkdir()
    (more / "z1.txt").write_text(TEXTS[6])
    (more / "z2.txt").write_text(TEXTS[0][:200])
    (tmp_path / "notes.rst").write_text(TEXTS[3][:300])                     # named: read as text
    args = [str(src), str(more / "z*.txt"), str(tmp_path / "notes.rst"), str(src / "a.txt")]   # a.txt again: once
    rc = main(["prepare", *args, "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipping 1 file of other kinds" in out and ".png" in out
    info = json.loads(out.strip().splitlines()[-1])
    assert info["val"] == str(tmp_path / "out" / "mix_val_000000.bin")
    order = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3], TEXTS[4], TEXTS[5], TEXTS[6], TEXTS[0][:200], TEXTS[3][:300]]
    check_set(tok, tmp_path / "out", "mix", order)


def test_single_document_is_cut_at_the_target(tmp_path, tok):
    text = " ".join(f"word{i}" for i in range(2000))
    (tmp_path / "one.txt").write_text(text)
    prepare_text([tmp_path / "one.txt"], tmp_path / "a", workers=1, progress=False)
    tokens = check_set(tok, tmp_path / "a", "one", [text], whole_documents=False)
    n = 1 + len(tok.encode(text))
    assert tokens[0].size == MIN_VAL > n // 10          # the minimum wins over 10 %
    prepare_text([tmp_path / "one.txt"], tmp_path / "b", val_fraction=0.4, workers=1, progress=False)
    tokens = check_set(tok, tmp_path / "b", "one", [text], fraction=0.4, whole_documents=False)
    assert tokens[0].size == math.ceil(0.4 * n)


def test_long_first_document_is_cut_not_taken_whole(tmp_path, tok):
    texts = [TEXTS[0] * 20] + TEXTS[1:]          # the first document: most of the tokens
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    prepare_text([str(tmp_path / "*.txt")], tmp_path / "out", name="long", workers=1, progress=False)
    tokens = check_set(tok, tmp_path / "out", "long", texts, whole_documents=False)
    assert tokens[1][0] != EOT and tokens[0].size < len(tok.encode(texts[0]))


def test_tiny_input_still_gets_both_splits(tmp_path, tok, capsys):
    (tmp_path / "tiny.txt").write_text("Just a few words here, nothing more.")
    r = prepare_text([tmp_path / "tiny.txt"], tmp_path / "out", workers=1, progress=False)
    tokens = check_set(tok, tmp_path / "out", "tiny", ["Just a few words here, nothing more."],
                       whole_documents=False)
    n = sum(t.size for t in tokens)
    assert tokens[0].size == n // 2 and r["train_tokens"] == n - n // 2
    assert "less than one batch" in capsys.readouterr().out


def test_shard_size_and_workers(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 300)       # many worker tasks even on small data
    for i, t in enumerate(TEXTS * 3):
        (tmp_path / f"{i:02d}.txt").write_text(t)
    a = prepare_text([str(tmp_path / "*.txt")], tmp_path / "a", name="s", shard_size=700, workers=1, progress=False)
    b = prepare_text([str(tmp_path / "*.txt")], tmp_path / "b", name="s", shard_size=700, workers=2, progress=False)
    check_set(tok, tmp_path / "a", "s", TEXTS * 3)
    lengths = [read_shard(p).size for p in shards(tmp_path / "a", "s")]
    assert lengths[1:-1] == [700] * (len(lengths) - 2) and 0 < lengths[-1] <= 700 and len(lengths) > 3
    assert a["shards"] == len(lengths) == b["shards"]
    for pa, pb in zip(shards(tmp_path / "a", "s"), shards(tmp_path / "b", "s")):
        assert pa.read_bytes() == pb.read_bytes()


def test_default_name_and_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my notes.txt").write_text(TEXTS[0])
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "x.txt").write_text(TEXTS[1])
    assert prepare_text(["my notes.txt"], workers=1, progress=False)["val"] == "data/my_notes/my_notes_val_000000.bin"
    assert prepare_text(["books/*.txt"], workers=1, progress=False)["val"] == "data/books/books_val_000000.bin"
    assert prepare_text(["books"], workers=1, progress=False)["val"] == "data/books/books_val_000000.bin"


# ------------------------------------------------------------------ re-runs

def snapshot(out: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_rerun_says_so_and_writes_nothing_then_changes_rebuild(tmp_path, tok, capsys):
    src = tmp_path / "src"
    src.mkdir()
    texts = [t * 4 for t in TEXTS]
    for i, t in enumerate(texts):
        (src / f"{i}.txt").write_text(t)
    out = tmp_path / "out"
    args = ["prepare", str(src), "--out", str(out), "--workers", "1", "--no-progress", "--shard-size", "600"]
    assert main(args) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(shards(out, "src")) > 3           # so that a later, smaller set could leave stale ones
    before = snapshot(out)
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "nothing to do" in lines[0] and lines[1] == first
    assert snapshot(out) == before

    # an input changed: rebuilt, no stale shard left from the first set
    (src / "0.txt").write_text("short now")
    os.utime(src / "0.txt", ns=(1, 1))
    assert main(args[:-2]) == 0                  # and the default (large) shard size: 2 shards
    assert "rebuilding" in capsys.readouterr().out
    check_set(tok, out, "src", ["short now"] + texts[1:])
    assert len(shards(out, "src")) == 2 and len(list(out.glob("*.bin"))) == 2
    # the same size, another mtime: only the mtime tells, and it is enough
    (src / "0.txt").write_text("SHORT NOW")
    os.utime(src / "0.txt", ns=(2, 2))
    assert main(args[:-2]) == 0
    assert "rebuilding" in capsys.readouterr().out
    check_set(tok, out, "src", ["SHORT NOW"] + texts[1:])
    # another setting: rebuilt
    before = snapshot(out)
    assert main(args[:-2] + ["--val-fraction", "0.5"]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    check_set(tok, out, "src", ["SHORT NOW"] + texts[1:], fraction=0.5)
    # a damaged shard: rebuilt
    (out / "src_val_000000.bin").write_bytes(b"cut")
    assert main(args[:-2] + ["--val-fraction", "0.5"]) == 0
    check_set(tok, out, "src", ["SHORT NOW"] + texts[1:], fraction=0.5)
    assert set(snapshot(out)) == set(before)


# ------------------------------------------------------------------ bad inputs

def _bad_parquet(path):
    write_parquet(path, {"body": ["x"]})


def _int_parquet(path):
    write_parquet(path, {"text": [1, 2]})


BAD = {
    "empty": ("e.txt", b"", r"e\.txt is empty"),
    "whitespace": ("w.txt", b"  \n\t\n", r"w\.txt holds only whitespace"),
    "binary": ("b.txt", b"GIF89a\0\0\1", r"b\.txt is binary, not text \(a NUL byte at offset 6\)"),
    "latin1": ("l.md", "café au lait".encode("latin-1"), r"l\.md is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    "jsonl-array": ("a.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"a\.jsonl line 2: a JSON array, not an object"),
    "jsonl-field": ("f.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n',
                    r"f\.jsonl line 3: no 'text' field \(it has 'body'\); name the text field with --field"),
    "jsonl-json": ("j.jsonl", b'{"text": "ok"}\n{"text": "cut\n', r"j\.jsonl line 2: not valid JSON"),
    "jsonl-type": ("t.jsonl", b'{"text": 3}\n', r"t\.jsonl line 1: 'text' is a JSON number, not a string"),
    "jsonl-utf8": ("u.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"u\.jsonl line 2 is not UTF-8 text"),
    "jsonl-none": ("n.jsonl", b'{"text": ""}\n\n', r"n\.jsonl holds no line with a non-empty 'text'"),
    "parquet-column": ("p.parquet", _bad_parquet, r"p\.parquet has no column 'text' \(it has 'body'\); "
                       r"name the text column with --column"),
    "parquet-type": ("i.parquet", _int_parquet, r"i\.parquet: column 'text' holds int64, not strings"),
    "parquet-file": ("x.parquet", b"PAR1 not really", r"x\.parquet is not a readable Parquet file"),
}


def _run_failing(capsys, *args) -> str:
    rc = main(["prepare", *map(str, args), "--workers", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmpy prepare: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    name, content, message = BAD[case]
    src = tmp_path / "in"
    src.mkdir()
    (src / "0good.txt").write_text(TEXTS[0])        # a good file first: the bad one is met later
    if callable(content):
        content(src / name)
    else:
        (src / name).write_bytes(content)
    out = tmp_path / "data" / "out"
    line = _run_failing(capsys, src, "--out", out)
    assert re.search(message, line), line
    assert str(src / name) in line
    assert not (tmp_path / "data").exists()          # not even the folders


def test_bad_file_leaves_an_earlier_set_untouched(tmp_path, tok, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i, t in enumerate(TEXTS):
        (src / f"{i}.txt").write_text(t)
    out = tmp_path / "out"
    prepare_text([src], out, workers=1, progress=False)
    before = snapshot(out)
    (src / "9.jsonl").write_text('{"text": "fine"}\n' * 50 + "oops\n")
    line = _run_failing(capsys, src, "--out", out)
    assert "9.jsonl line 51: not valid JSON" in line
    assert snapshot(out) == before
    check_set(tok, out, "in", TEXTS)


def test_failure_while_writing_removes_the_staging_folder(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXTS[0])

    def crash(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(prep._ShardWriter, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_text([tmp_path / "a.txt"], tmp_path / "new" / "out", workers=1, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        prepare_text([tmp_path / "a.txt"], tmp_path / "kept", workers=1, progress=False)
    assert files_under(tmp_path / "kept") == []      # no hidden staging folder either


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("no")
    path.chmod(0)
    if os.geteuid() == 0:          # root reads anything: refuse the open as the OS would
        real_open = open

        def refusing_open(file, *a, **kw):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *a, **kw)
        monkeypatch.setattr(text_mod, "open", refusing_open, raising=False)
    line = _run_failing(capsys, path, "--out", tmp_path / "out")
    assert f"cannot read {path} (Permission denied)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arg, message", [
    ("missing.txt", r"missing\.txt: no such file or folder$"),
    ("tinyshakespere", r"tinyshakespere: no such file or folder; the built-in corpora are pydoc, "),
    ("nothing/*.jsonl", r"no file matches '.*nothing/\*\.jsonl'"),
])
def test_paths_that_match_nothing(tmp_path, capsys, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)
    line = _run_failing(capsys, arg)
    assert re.search(message, line), line
    assert not (tmp_path / "data").exists()


def test_folder_without_text_files(tmp_path, capsys):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    assert "pics holds no .txt, .md" in _run_failing(capsys, tmp_path / "pics", "--out", tmp_path / "out")


# ------------------------------------------------------------------ corpora vs paths, flags

def test_existing_path_wins_over_a_corpus_name(tmp_path, capsys, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    Path("pydoc").write_text(TEXTS[0])
    line = _run_failing(capsys, "pydoc")       # read as a file, but its stem is a corpus's name
    assert "'pydoc' is a built-in corpus's name; give your shards another with --name" in line
    assert main(["prepare", "pydoc", "--name", "mine", "--workers", "1", "--no-progress"]) == 0
    check_set(tok, tmp_path / "data" / "mine", "mine", [TEXTS[0]], whole_documents=False)
    assert not (tmp_path / "data" / "pydoc").exists()


def test_corpus_name_is_the_corpus_and_flags_of_the_other_kind_are_refused(tmp_path, capsys):
    assert main(["prepare", "pydoc", "--out", str(tmp_path / "pydoc")]) == 0
    assert (tmp_path / "pydoc" / "pydoc_train_000000.bin").is_file()
    capsys.readouterr()
    line = _run_failing(capsys, "pydoc", "--field", "x")
    assert "--field applies to your own files, not to the corpus pydoc" in line
    (tmp_path / "a.txt").write_text("x")
    assert "--max-tokens, --split apply to the built-in corpora" in \
        _run_failing(capsys, tmp_path / "a.txt", "--max-tokens", "5", "--split", "val")
    assert "prepare it on its own" in _run_failing(capsys, "pydoc", tmp_path / "a.txt")
    for bad, message in ((["--val-fraction", "1"], "--val-fraction must lie strictly between 0 and 1"),
                         (["--shard-size", "0"], "--shard-size must be a positive integer"),
                         (["--name", "a/b"], "--name 'a/b': use letters")):
        assert message in _run_failing(capsys, tmp_path / "a.txt", *bad)


# ------------------------------------------------------------------ the result trains

def test_train_runs_on_the_prepared_shards(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(TEXTS):
        (src / f"{i}.txt").write_text(t)
    out = tmp_path / "data"
    assert main(["prepare", str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    run = tmp_path / "run"
    rc = main(["train", "--data", str(out / "src_train_*.bin"), "--val-data", str(out / "src_val_*.bin"),
               "--model", "d2", "-B", "2", "-T", "32", "--steps", "2", "--val-every", "1", "--val-steps", "1",
               "--sample-every", "0", "--out", str(run), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val and all(np.isfinite(val)) and abs(val[0] - math.log(50257)) < 1.5   # ~uniform at init

