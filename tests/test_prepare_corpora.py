"""`llmpy prepare` for the downloaded corpora, end to end, against 127.0.0.1.

Each source is imitated in its real format: tinyshakespeare as plain text,
TinyStories as a tar.gz of data*.json lists, FineWeb-Edu as parquet files
with a "text" column, HellaSwag as jsonl. The shards must decode back to the
documents, each preceded by <|endoftext|>, with the val shard first.
"""
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from corpus_server import CorpusServer  # noqa: E402

from llmpy.cli import main  # noqa: E402
from llmpy.data import DataLoader, Tokenizer, read_shard  # noqa: E402
from llmpy.data import prepare as prep  # noqa: E402
from llmpy.data.prepare import prepare  # noqa: E402
from llmpy.errors import LlmpyError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
EOT = "<|endoftext|>"
SHAKESPEARE = (FIXTURES / "corpus_tinyshakespeare.txt").read_text()
HELLASWAG = (FIXTURES / "corpus_hellaswag_val.jsonl").read_bytes()

STORIES = {f"data{i:02d}.json": [{"story": f"  Once upon a time, story {i}.{j} about a "
                                            f"{['cat', 'dog', 'fox'][j % 3]} who liked {j} apples.\n"}
                                 for j in range(40)] for i in range(3)}
FINEWEB = [[f"Document {f}.{j}: photosynthesis turns light into sugar; " * (1 + j % 4)
            for j in range(60)] for f in range(2)]

SHAKESPEARE_PATH = "/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
STORIES_PATH = "/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
FINEWEB_PATH = "/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/{:03d}_00000.parquet"
HELLASWAG_PATH = "/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def _stories_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        # archive order is not name order: data00.json must still be val
        for name in ["data01.json", "data00.json", "data02.json"]:
            body = json.dumps(STORIES[name]).encode()
            info = tarfile.TarInfo(f"TinyStories_all_data/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _parquet(texts) -> bytes:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}), buf,
                   row_group_size=16)
    return buf.getvalue()


@pytest.fixture
def server(monkeypatch):
    s = CorpusServer()
    s.add(SHAKESPEARE_PATH, SHAKESPEARE.encode())
    s.add(STORIES_PATH, _stories_tar(), publish_sha256=True)
    for i, texts in enumerate(FINEWEB):
        s.add(FINEWEB_PATH.format(i), _parquet(texts), publish_sha256=True)
    s.add(HELLASWAG_PATH, HELLASWAG)
    monkeypatch.setenv("LLMPY_HF_ENDPOINT", s.url)
    monkeypatch.setenv("LLMPY_GITHUB_RAW", s.url)
    monkeypatch.setattr(prep, "BATCH_CHARS", 500)     # many worker tasks even on tiny data
    monkeypatch.setattr("llmpy.data.download.TIMEOUT", 10)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _text(tok, paths) -> str:
    return "".join(tok.decode(read_shard(p)) for p in paths)


def _shards(r):
    return [r["val"]] + sorted(__import__("glob").glob(r["train"]))


def test_tinyshakespeare_round_trip(server, tmp_path, tok):
    r = prepare("tinyshakespeare", tmp_path, shard_size=500, val_tokens=300,
                workers=2, progress=False)
    paths = _shards(r)
    assert Path(paths[0]).name == "tinyshakespeare_val_000000.bin"
    assert Path(paths[1]).name == "tinyshakespeare_train_000001.bin"
    assert r["val_tokens"] == 300 and len(read_shard(paths[1])) == 500 and len(paths) >= 3
    # eot before each blank-line-separated section; together the exact file
    sections = SHAKESPEARE.split("\n\n")
    expected = EOT + ("\n\n" + EOT).join(sections)
    assert _text(tok, paths) == expected
    assert r["val_tokens"] + r["train_tokens"] == len(tok.encode(expected, allow_special=True))
    x, y = DataLoader(r["train"], B=2, T=32).next_batch()
    assert x.shape == (2, 32)


def test_workers_do_not_change_the_shards(server, tmp_path):
    a = prepare("tinyshakespeare", tmp_path / "a", shard_size=700, val_tokens=300, workers=1,
                progress=False)
    b = prepare("tinyshakespeare", tmp_path / "b", shard_size=700, val_tokens=300, workers=2,
                progress=False)
    assert [Path(p).name for p in _shards(a)] == [Path(p).name for p in _shards(b)]
    for pa, pb in zip(_shards(a), _shards(b)):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()


def test_tinystories_val_is_data00(server, tmp_path, tok):
    r = prepare("tinystories", tmp_path, shard_size=2000, workers=2, progress=False)
    docs = lambda name: "".join(EOT + s["story"].strip() for s in STORIES[name])  # noqa: E731
    assert tok.decode(read_shard(r["val"])) == docs("data00.json")
    assert _text(tok, _shards(r)[1:]) == docs("data01.json") + docs("data02.json")
    assert (tmp_path / "downloads" / "TinyStories_all_data" / ".complete").exists()


def test_fineweb_edu_all_files_then_stops_at_404(server, tmp_path, tok):
    r = prepare("fineweb-edu", tmp_path, shard_size=1500, workers=2, progress=False)
    expected = "".join(EOT + t for texts in FINEWEB for t in texts)
    assert _text(tok, _shards(r)) == expected
    assert r["val_tokens"] == 1500
    assert any(p.endswith("002_00000.parquet") for _, p, _ in server.requests)   # 404: the end


def test_max_tokens_stops_early_and_downloads_only_what_it_needs(server, tmp_path):
    r = prepare("fineweb-edu", tmp_path, shard_size=500, max_tokens=1200, workers=2, progress=False)
    assert r["val_tokens"] + r["train_tokens"] == 1200
    assert [len(read_shard(p)) for p in _shards(r)] == [500, 500, 200]
    assert not any(p.endswith("001_00000.parquet") for _, p, _ in server.requests)


def test_shards_limit(server, tmp_path):
    r = prepare("fineweb-edu", tmp_path, shard_size=500, shards=2, workers=1, progress=False)
    assert r["shards"] == 2 and r["val_tokens"] == 500 and r["train_tokens"] == 500
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".bin")) == \
        ["fineweb-edu_train_000001.bin", "fineweb-edu_val_000000.bin"]


def test_dropped_download_resumes_and_shards_are_right(server, tmp_path, tok):
    server.drop_once[FINEWEB_PATH.format(0)] = 700
    r = prepare("fineweb-edu", tmp_path, shard_size=100_000, workers=1, progress=False)
    assert _text(tok, _shards(r)) == "".join(EOT + t for texts in FINEWEB for t in texts)
    ranges = [rg for _, p, rg in server.requests if p == FINEWEB_PATH.format(0)]
    assert ranges == [None, "bytes=700-"]


def test_corrupted_download_fails_and_leaves_nothing_finished(server, tmp_path):
    server.corrupt[STORIES_PATH] = True
    with pytest.raises(LlmpyError, match="sha256"):
        prepare("tinystories", tmp_path, shard_size=1000, workers=1, progress=False)
    left = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    assert left == []


def test_second_run_is_a_noop_and_settings_change_redoes(server, tmp_path, capsys):
    kw = dict(shard_size=400, val_tokens=300, workers=1, progress=False)
    r = prepare("tinyshakespeare", tmp_path, **kw)
    n = len(server.requests)
    mtimes = [Path(p).stat().st_mtime_ns for p in _shards(r)]
    n_first = len(mtimes)
    assert n_first == 4
    assert prepare("tinyshakespeare", tmp_path, **kw) == r
    assert "nothing to do" in capsys.readouterr().out
    assert len(server.requests) == n                                  # no download either
    assert [Path(p).stat().st_mtime_ns for p in _shards(r)] == mtimes
    # other shard size: redone, and no stale shard of the first run is left
    r2 = prepare("tinyshakespeare", tmp_path, **{**kw, "shard_size": 5000})
    assert len(_shards(r2)) == 2
    assert len(list(tmp_path.glob("tinyshakespeare_*.bin"))) == len(_shards(r2))


def test_damaged_shard_means_not_finished(server, tmp_path, capsys):
    kw = dict(shard_size=1000, val_tokens=300, workers=1, progress=False)
    r = prepare("tinyshakespeare", tmp_path, **kw)
    Path(r["val"]).write_bytes(b"truncated")
    again = prepare("tinyshakespeare", tmp_path, **kw)
    assert again == r and len(read_shard(r["val"])) == 300
    assert "nothing to do" not in capsys.readouterr().out


def test_hellaswag_download(server, tmp_path):
    r = prepare("hellaswag", tmp_path, progress=False)
    assert Path(r["val"]).read_bytes() == HELLASWAG
    assert json.loads(HELLASWAG.splitlines()[0])["endings"]


def test_option_errors(server, tmp_path):
    with pytest.raises(LlmpyError, match="--shard-size"):
        prepare("pydoc", tmp_path, shard_size=10)
    with pytest.raises(LlmpyError, match="--workers must be a positive integer"):
        prepare("tinyshakespeare", tmp_path, workers=0)
    with pytest.raises(LlmpyError, match="no split 'dev'"):
        prepare("hellaswag", tmp_path, splits=("dev",), progress=False)


def test_cli_prepare_flags(server, tmp_path, capsys):
    rc = main(["prepare", "tinyshakespeare", "--out", str(tmp_path), "--shard-size", "800",
               "--val-tokens", "200", "--max-tokens", "1000", "--workers", "1", "--no-progress"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["val_tokens"] == "200" and info["train_tokens"] == "800"


def test_fixture_checksums_published(server):
    # the hub-style fixtures carry the sha256 the downloader verifies
    assert server.sha256[STORIES_PATH] == hashlib.sha256(server.files[STORIES_PATH]).hexdigest()


def test_interrupted_prepare_looks_unfinished_and_resumes(server, tmp_path, tok):
    # The second parquet file arrives corrupted: prepare fails halfway through,
    # after the val shard is written. Nothing may claim to be finished.
    server.corrupt[FINEWEB_PATH.format(1)] = True
    kw = dict(shard_size=500, workers=2, progress=False)
    with pytest.raises(LlmpyError, match="001_00000.parquet.*sha256"):
        prepare("fineweb-edu", tmp_path, **kw)
    assert (tmp_path / "fineweb-edu_val_000000.bin").exists()
    assert not (tmp_path / "fineweb-edu_done.json").exists()
    assert sorted(os.listdir(tmp_path / "downloads")) == ["000_00000.parquet"]   # no .part
    # Fixed upstream: the run completes; the finished download is not fetched again.
    server.corrupt[FINEWEB_PATH.format(1)] = False
    r = prepare("fineweb-edu", tmp_path, **kw)
    assert _text(tok, _shards(r)) == "".join(EOT + t for texts in FINEWEB for t in texts)
    assert [m for m, p, _ in server.requests if p == FINEWEB_PATH.format(0)] == ["GET"]
    assert (tmp_path / "fineweb-edu_done.json").exists()


def test_a_tokenizer_worker_that_dies_is_one_error_not_a_hang():
    # ONE worker killed mid-run (the OOM killer, a crash) must end the prepare
    # with a message: multiprocessing.Pool would wait for its result forever,
    # and ProcessPoolExecutor's clean-up (CPython 3.11) for the other worker.
    def batches():
        # Two small tasks, then two long ones: when this generator resumes,
        # the first result is in and both workers are busy tokenizing, not
        # sending a result (a worker killed halfway through sending one
        # leaves a partial message that CPython's pool waits on for ever).
        for i in range(4):
            yield "val", [f"batch {i} " * (200_000 if i >= 2 else 1)]
        workers = multiprocessing.active_children()
        os.kill(workers[0].pid, signal.SIGKILL)
        for i in range(8):
            yield "train", [f"batch {i}"]
    with pytest.raises(LlmpyError, match=r"a tokenizer worker process died .*--workers 1"):
        list(prep._encoded(batches(), 2))
