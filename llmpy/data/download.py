"""Resumable, verified, atomic HTTP downloads (stdlib urllib only).

A corpus file can be gigabytes, and connections drop. Three rules make a
download safe to interrupt at any moment and safe to trust afterwards:

1. Resumable. Bytes go to DEST.part. On a restart (or after a dropped
   connection) we ask for the rest only, with the header
   `Range: bytes=<bytes we have>-`. A server that honours it answers
   206 Partial Content and we append; one that does not answers 200 with the
   whole file and we start the .part over from zero.
2. Verified. When the body ends we check its size against what the server
   announced (Content-Length, or the total in Content-Range) and, where the
   source publishes one, its sha256. A mismatch deletes the .part and fails
   with the URL: a corrupt file is never kept, and never resumed from.
3. Atomic. Only a verified .part is renamed to DEST (os.replace is atomic),
   so a file under its final name is always complete. That also makes a
   finished file free on the next run: if DEST exists it is not fetched again.

Checksums. The Hugging Face hub stores big files in git LFS, and its
`resolve` URLs answer with a redirect to a CDN whose headers carry the LFS
object id, which *is* the file's sha256: `X-Linked-Etag` (and `ETag`),
possibly quoted. We read it from the hub's own response (the redirect), not
from the CDN's, whose ETag means something else. Other sources (GitHub raw
files) publish no checksum, so only the size is checked.

Base URLs come from ENDPOINTS, overridable by environment variables, so the
tests can point every source at a server on 127.0.0.1.
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import LlmpyError
from ..fileio import sha256_file

# name -> (default base URL, environment variable that overrides it)
_ENDPOINTS = {
    "hf": ("https://huggingface.co", "LLMPY_HF_ENDPOINT"),
    "github_raw": ("https://raw.githubusercontent.com", "LLMPY_GITHUB_RAW"),
}

CHUNK = 1 << 20           # bytes per read: large enough that Python overhead vanishes
TIMEOUT = 60              # seconds without data before a connection counts as dropped
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def endpoint(name: str) -> str:
    """Base URL of a source ("hf", "github_raw"), honouring its environment override."""
    default, env = _ENDPOINTS[name]
    return os.environ.get(env, default).rstrip("/")


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like the default handler, keeping the first response's headers.

    urlopen() hands back only the last response of a redirect chain; the
    hub's checksum headers are on the first one.
    """

    def __init__(self):
        self.first_headers = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.first_headers is None:
            self.first_headers = headers
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def published_sha256(headers) -> str | None:
    """The sha256 in a hub response's X-Linked-Etag / ETag header, if it holds one.

    Only a 64-hex-digit value is a sha256; a git blob id (40 digits, small
    files not in LFS) or a weak ETag ("W/...") is no checksum of the bytes.
    """
    for key in ("X-Linked-Etag", "ETag"):
        value = headers.get(key)
        if value:
            value = value.strip().strip('"').lower()
            if _SHA256.match(value):
                return value
    return None


class NotFound(LlmpyError):
    """HTTP 404: the file is not there (how a sequence of numbered files ends)."""


class _Dropped(Exception):
    """The connection ended before the announced size: worth a retry."""


def download(url: str, dest, *, sha256: str | None = None, hub_checksum: bool = False,
             retries: int = 5, backoff: float = 1.0, progress: bool = True) -> Path:
    """Fetch `url` to `dest` (resumably, verified, atomically); returns dest as a Path.

    sha256: the expected checksum, if the caller knows it.
    hub_checksum: trust the first response's X-Linked-Etag/ETag as the
        sha256 (Hugging Face hub resolve URLs; see the module doc).
    retries: how many times a dropped connection or a server error (5xx) is
        retried, waiting backoff, 2*backoff, 4*backoff... seconds (capped at
        30 s), before giving up with the .part kept for the next run.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest                      # finished files only ever appear by os.replace
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    failures = 0
    while True:
        try:
            total, published = _fetch(url, part, hub_checksum, progress, dest.name)
            break
        except (_Dropped, urllib.error.URLError, http.client.HTTPException,
                ConnectionError, TimeoutError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                raise (NotFound if e.code == 404 else LlmpyError)(f"download {url} failed: HTTP {e.code} {e.reason}; "
                                 "check the URL (or the LLMPY_*_ENDPOINT override)") from None
            if _unresolvable(e):
                # no DNS answer: offline, or a mistyped host; retrying for half a minute changes neither
                raise LlmpyError(f"download {url} failed: {urllib.parse.urlsplit(url).hostname} cannot be "
                                 f"resolved (offline?); connect and run the command again{_resume_hint(part)}") from None
            failures += 1
            if failures > retries:
                raise LlmpyError(f"download {url} failed after {retries} retries ({e}); "
                                 f"run the command again{_resume_hint(part)}") from None
            wait = min(backoff * 2 ** (failures - 1), 30.0)
            print(f"download {dest.name}: {e}; retrying in {wait:.0f} s "
                  f"({failures}/{retries}), resuming at {_size(part):,} bytes")
            time.sleep(wait)

    # The body is complete as far as the connection goes; now trust nothing.
    got = _size(part)
    if total is not None and got != total:
        part.unlink(missing_ok=True)
        raise LlmpyError(f"download {url}: got {got:,} bytes but the server announced "
                         f"{total:,}; the partial file was deleted, run the command again")
    expected = (sha256 or published or "").lower() or None
    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise LlmpyError(f"download {url}: sha256 {actual[:16]}... does not match the "
                             f"published {expected[:16]}... (corrupted in transit?); "
                             "the file was deleted, run the command again")
    os.replace(part, dest)
    return dest


def _unresolvable(e: Exception) -> bool:
    """A name-resolution failure (socket.gaierror inside URLError)."""
    return isinstance(getattr(e, "reason", None), socket.gaierror)


def _resume_hint(part: Path) -> str:
    """' (it resumes from P)' when a partial download is there to resume, else nothing."""
    return f" (it resumes from {part}, {_size(part):,} bytes)" if _size(part) else ""


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fetch(url: str, part: Path, hub_checksum: bool, progress: bool, label: str):
    """One attempt: append the missing bytes to `part`.

    Returns (total size or None, published sha256 or None). Raises _Dropped
    if the body ends short, so that the caller retries from where it stopped.
    """
    have = _size(part)
    request = urllib.request.Request(url, headers={"User-Agent": "llmpy"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    redirects = _RecordRedirects()
    opener = urllib.request.build_opener(redirects)
    try:
        response = opener.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # "Range Not Satisfiable": we asked past the end. Either the
            # .part is already whole (verified by the caller) or it belongs
            # to another version of the file: start over to find out.
            whole = _content_range_total(e.headers.get("Content-Range", ""))
            if whole == have:
                return whole, _published(redirects, e.headers, hub_checksum)
            part.unlink()
            raise _Dropped("server refused the resume range; starting over") from None
        raise

    with response:
        headers = response.headers
        published = _published(redirects, headers, hub_checksum)
        if response.status == 206:
            start, total = _content_range(headers.get("Content-Range", ""))
            if start != have:            # not the bytes we asked for: trust none of it
                part.unlink()
                raise _Dropped(f"server resumed at byte {start}, not {have}; starting over")
            mode = "ab"
        else:                            # 200: the whole file, from byte 0
            have, mode = 0, "wb"
            length = headers.get("Content-Length")
            total = int(length) if length is not None else None

        from tqdm import tqdm
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=label,
                                         disable=not progress) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except http.client.IncompleteRead as e:   # some Pythons raise, some return short
                    f.write(e.partial)
                    raise _Dropped("connection dropped") from None
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and _size(part) < total:
        raise _Dropped(f"connection dropped at {_size(part):,} of {total:,} bytes")
    return total, published


def _published(redirects: _RecordRedirects, headers, hub_checksum: bool) -> str | None:
    if not hub_checksum:
        return None
    return published_sha256(redirects.first_headers or headers)


def _content_range(value: str) -> tuple[int, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); the total may be '*' (unknown) -> None."""
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if not m:
        raise _Dropped(f"206 response with an unreadable Content-Range {value!r}")
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _content_range_total(value: str) -> int | None:
    m = re.match(r"bytes \*/(\d+)", value.strip())
    return int(m.group(1)) if m else None
