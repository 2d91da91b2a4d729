"""Downloads resume, verify and land atomically (against a server on 127.0.0.1)."""
import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from corpus_server import CorpusServer  # noqa: E402

from llmpy.data import download as dl  # noqa: E402
from llmpy.errors import LlmpyError  # noqa: E402

BODY = bytes(range(256)) * 4096 + b"tail"      # ~1 MB, every byte value, odd length


@pytest.fixture
def server():
    s = CorpusServer()
    s.add("/f.bin", BODY)
    s.add("/lfs.bin", BODY, publish_sha256=True)
    yield s
    s.close()


def fetch(server, path, dest, **kw):
    kw.setdefault("backoff", 0.0)
    return dl.download(server.url + path, dest, progress=False, **kw)


def test_plain_download(server, tmp_path):
    out = fetch(server, "/f.bin", tmp_path / "f.bin")
    assert out.read_bytes() == BODY
    assert os.listdir(tmp_path) == ["f.bin"]


def test_finished_file_is_not_fetched_again(server, tmp_path):
    fetch(server, "/f.bin", tmp_path / "f.bin")
    n = len(server.requests)
    fetch(server, "/f.bin", tmp_path / "f.bin")
    assert len(server.requests) == n


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.drop_once["/lfs.bin"] = 300_000
    out = fetch(server, "/lfs.bin", tmp_path / "x.bin", hub_checksum=True)
    assert out.read_bytes() == BODY
    ranges = [r for m, p, r in server.requests if p == "/lfs.bin"]
    assert ranges[0] is None and ranges[1] == "bytes=300000-"


def test_leftover_part_is_resumed(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY[:1000])
    out = fetch(server, "/f.bin", tmp_path / "f.bin")
    assert out.read_bytes() == BODY
    assert server.requests[-1][2] == "bytes=1000-"


def test_server_without_range_support_restarts(server, tmp_path):
    server.no_range = True
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes from another version")
    out = fetch(server, "/f.bin", tmp_path / "f.bin")
    assert out.read_bytes() == BODY


def test_drop_without_range_support_still_completes(server, tmp_path):
    server.no_range = True
    server.drop_once["/f.bin"] = 5000
    assert fetch(server, "/f.bin", tmp_path / "f.bin").read_bytes() == BODY


def test_corrupted_body_detected_and_nothing_kept(server, tmp_path):
    server.corrupt["/lfs.bin"] = True
    with pytest.raises(LlmpyError, match=r"sha256.*lfs\.bin|lfs\.bin.*sha256"):
        fetch(server, "/lfs.bin", tmp_path / "x.bin", hub_checksum=True)
    assert os.listdir(tmp_path) == []


def test_caller_checksum(server, tmp_path):
    with pytest.raises(LlmpyError, match="does not match"):
        fetch(server, "/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert os.listdir(tmp_path) == []
    good = hashlib.sha256(BODY).hexdigest()
    assert fetch(server, "/f.bin", tmp_path / "f.bin", sha256=good).read_bytes() == BODY


def test_checksum_read_from_the_redirect(server, tmp_path):
    # The hub: /resolve answers 302 with the LFS sha256; the CDN has no checksum.
    server.add("/cdn/blob", BODY)
    server.corrupt["/cdn/blob"] = True
    server.redirect["/resolve/f"] = "/cdn/blob"
    server.sha256["/resolve/f"] = hashlib.sha256(BODY).hexdigest()
    with pytest.raises(LlmpyError, match="does not match"):
        fetch(server, "/resolve/f", tmp_path / "f", hub_checksum=True)
    server.corrupt["/cdn/blob"] = False
    assert fetch(server, "/resolve/f", tmp_path / "f", hub_checksum=True).read_bytes() == BODY


def test_missing_file_names_the_url(server, tmp_path):
    with pytest.raises(LlmpyError, match=r"/nope.*404"):
        fetch(server, "/nope", tmp_path / "nope")
    assert os.listdir(tmp_path) == []


def test_gives_up_after_bounded_retries(server, tmp_path, monkeypatch):
    calls = []

    def always_drop(url, part, *a, **k):
        calls.append(1)
        with open(part, "ab") as f:          # some bytes arrive before each drop
            f.write(b"12345")
        raise dl._Dropped("connection dropped")
    monkeypatch.setattr(dl, "_fetch", always_drop)
    with pytest.raises(LlmpyError, match=r"after 2 retries.*resumes from .*f\.bin\.part, 15 bytes"):
        fetch(server, "/f.bin", tmp_path / "f.bin", retries=2)
    assert len(calls) == 3
    assert not (tmp_path / "f.bin").exists()

    def drop_at_once(*a, **k):              # nothing arrived: no partial file, no resume hint
        raise dl._Dropped("connection dropped")
    monkeypatch.setattr(dl, "_fetch", drop_at_once)
    with pytest.raises(LlmpyError) as e:
        fetch(server, "/f.bin", tmp_path / "g.bin", retries=1)
    assert "after 1 retries" in str(e.value) and "resume" not in str(e.value)


def test_published_sha256_parsing():
    h = "ab" * 32
    assert dl.published_sha256({"X-Linked-Etag": f'"{h}"'}) == h
    assert dl.published_sha256({"ETag": h.upper()}) == h
    assert dl.published_sha256({"ETag": '"' + "a" * 40 + '"'}) is None   # git blob id
    assert dl.published_sha256({"ETag": 'W/"xyz"'}) is None


def test_endpoint_override(monkeypatch):
    monkeypatch.setenv("LLMPY_HF_ENDPOINT", "http://127.0.0.1:9/")
    assert dl.endpoint("hf") == "http://127.0.0.1:9"
    monkeypatch.delenv("LLMPY_HF_ENDPOINT")
    assert dl.endpoint("hf") == "https://huggingface.co"


def test_resume_through_a_redirect(server, tmp_path):
    # The Range header must survive the hub's redirect to the CDN.
    server.add("/cdn/blob", BODY)
    server.redirect["/resolve/f"] = "/cdn/blob"
    server.sha256["/resolve/f"] = hashlib.sha256(BODY).hexdigest()
    server.drop_once["/cdn/blob"] = 123_456
    assert fetch(server, "/resolve/f", tmp_path / "f", hub_checksum=True).read_bytes() == BODY
    assert [r for _, p, r in server.requests if p == "/cdn/blob"] == [None, "bytes=123456-"]


def test_an_unresolvable_host_fails_at_once_and_hints_resume_only_with_a_partial_file(tmp_path, monkeypatch):
    # offline: the name lookup fails (socket.gaierror, as getaddrinfo raises it
    # without a network); no retries with back-off, one line, no network used here
    import socket
    import time

    def offline(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    dest = tmp_path / "input.txt"
    t0 = time.monotonic()
    with pytest.raises(LlmpyError) as e:
        dl.download("http://example.invalid/input.txt", dest, retries=5, backoff=1.0, progress=False)
    assert time.monotonic() - t0 < 1.0
    msg = str(e.value)
    assert "example.invalid cannot be resolved (offline?)" in msg and "resumes from" not in msg
    assert "\n" not in msg
    (tmp_path / "input.txt.part").write_bytes(b"x" * 10)
    with pytest.raises(LlmpyError, match=r"resumes from .*input\.txt\.part, 10 bytes"):
        dl.download("http://example.invalid/input.txt", dest, retries=5, backoff=1.0, progress=False)
