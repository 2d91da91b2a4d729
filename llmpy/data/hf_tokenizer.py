"""A Hugging Face tokenizer.json (Llama 3, Mistral, ...) through the `tokenizers` library.

tokenizer.json holds a whole tokenizer: normalizer, pre-tokenizer, model
(BPE merges, or WordPiece / Unigram), decoder, and the added tokens. The
`tokenizers` library (Rust, the same code transformers' fast tokenizers run)
executes it, so our ids are the reference ids by construction; this module
only gives it the interface of data/tokenizer.py's GPT-2 Tokenizer.

Two choices keep shards made with it like the GPT-2 ones:

- encode() adds no special tokens. A tokenizer.json may carry a
  post-processor that puts <|begin_of_text|> (Llama 3) or <s> in front of
  every text; whoever writes a shard delimits documents itself, once.
- Special-token text inside a document is ordinary text unless asked
  (allow_special): a document can never fake a document boundary. llm.c's
  Llama 3 script does the same (split_special_tokens=True).

The end-of-text id is not recorded in tokenizer.json as such (transformers
keeps "eos_token" in tokenizer_config.json), so `eot` is the first special
added token with one of the usual names (_EOT_NAMES), or the name passed as
eot_text. llm.c's own Llama 3 shards start each document with
<|begin_of_text|> instead; pass eot_text="<|begin_of_text|>" to match them.

model_tokenizer below picks a model's tokenizer (this one or GPT-2's) for
the commands that turn its ids into text: train's samples, `llmpy sample`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import LlmpyError

# end-of-text / end-of-sequence spellings, most specific first:
# Llama 3, GPT-2 style (Qwen, GPT-NeoX, ...), Llama 2 / Mistral (SentencePiece), Gemma
_EOT_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_FIX = "pass a model directory containing tokenizer.json, or the file itself"


class HFTokenizer:
    """text <-> token ids with a tokenizer.json.

    >>> tok = HFTokenizer("Meta-Llama-3-8B")      # a directory, or .../tokenizer.json
    >>> tok.vocab_size, tok.eot
    (128256, 128001)
    """

    def __init__(self, path, eot_text: str | None = None):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            where = f"no tokenizer.json in directory {path}" if path.is_dir() else f"{file} does not exist"
            raise LlmpyError(f"{where}; {_FIX}")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LlmpyError(f"reading {file} needs the `tokenizers` package; run "
                             "`pip install tokenizers`") from None
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:      # the library raises plain Exception, for I/O and parse errors alike
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LlmpyError(f"{file}: not a readable tokenizer.json ({reason}); {_FIX}") from None
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot = self._find_eot(eot_text)

    def _find_eot(self, eot_text: str | None) -> int:
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        names = (eot_text,) if eot_text is not None else _EOT_NAMES
        for name in names:
            if name in special:
                return special[name]
        found = ", ".join(sorted(special)) or "none"
        raise LlmpyError(f"{self.path}: no end-of-text special token ({' or '.join(names)}) among its "
                         f"special tokens ({found}); pass eot_text= naming the one that ends a document")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with no special tokens added. With allow_special,
        special-token text ("<|end_of_text|>") becomes its single id; without
        it, that text is ordinary text (several tokens)."""
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of the tokens, special tokens included as their text."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:   # the library would skip them silently; a padded model vocab can produce them
            raise LlmpyError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) "
                             f"of {self.path}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def files(self) -> dict[str, Path]:
        """name -> file of what a model directory needs to carry this tokenizer:
        tokenizer.json, and beside it (a model's tokenizer.json, not a file of
        another name) tokenizer_config.json and special_tokens_map.json when
        there, which tell transformers the special tokens."""
        out = {"tokenizer.json": self.path}
        if self.path.name == "tokenizer.json":
            for name in _COMPANIONS:
                if (self.path.parent / name).is_file():
                    out[name] = self.path.parent / name
        return out


_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------- a model's tokenizer

def model_tokenizer(vocab_size: int, tokenizer=None, model_dir=None):
    """(the tokenizer that turns a model's ids into text, or None; what it
    is, for a message), for `llmpy train`'s samples and `llmpy sample`:

        tokenizer given        that tokenizer.json (or a directory holding one)
        else model_dir's       the tokenizer.json of the model's directory (a
                               Llama from the hub, a checkpoint of such a run)
        else GPT-2's           for a model over GPT-2's vocabulary (50,257)
        else None              no tokenizer known for this vocabulary

    A tokenizer with more ids than the model's vocabulary is refused: it
    cannot be the one the model's data was made with."""
    from ..formats.hf import GPT2_VOCAB_SIZE
    if tokenizer is None and model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        tokenizer = model_dir
    if tokenizer is None:
        if vocab_size != GPT2_VOCAB_SIZE:
            return None, f"no tokenizer for a vocabulary of {vocab_size:,} ids"
        from .tokenizer import Tokenizer
        return Tokenizer(), "GPT-2's tokenizer"
    tok = HFTokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        raise LlmpyError(f"{tok.path}: a tokenizer of {tok.vocab_size:,} ids, but the model's vocabulary has "
                         f"{vocab_size:,}: not this model's tokenizer; pass --tokenizer TOK, the tokenizer.json its "
                         "data was prepared with")
    return tok, f"{tok.path} ({tok.vocab_size:,} ids)"


def decode_sampled(tokenizer, ids) -> str:
    """Text of sampled ids. A model with more ids than its tokenizer
    (llama3-tiny's 50,257 over a smaller tokenizer.json) can sample one the
    tokenizer lacks: it shows as <|id N|>, never as another token's text."""
    text, run = [], []
    for i in map(int, ids):
        if i < tokenizer.vocab_size:
            run.append(i)
        else:
            text += [tokenizer.decode(run), f"<|id {i}|>"]
            run = []
    return "".join(text) + tokenizer.decode(run)
