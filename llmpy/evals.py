"""Evaluation: validation loss, and HellaSwag accuracy.

Validation loss. The mean next-token cross-entropy over the first `steps`
batches of a val loader, in file order; perplexity = exp(loss), the size of a
uniform choice that would be as uncertain as the model. One pass over the
data is num_windows // B batches (DataLoader: a window is T + 1 tokens,
consecutive windows share one; the partial batch at the end is dropped); more
steps than that would read the same batches again, so val_report stops there.

HellaSwag (Zellers et al. 2019). Each example is a context ("A man is sitting
on a roof. he") and four endings, one of them the real continuation. A
language model answers by likelihood: the ending it finds most probable after
the context is its choice. As in llm.c (and the eval harness it follows):

    context tokens  c = encode(ctx)
    ending tokens   e_i = encode(" " + ending_i)        (the space joins the words)
    row i           c + e_i, right-padded to the longest row: a (4, T) batch
    loss of token t = -log p(token_t | tokens_<t)        (logits of position t-1)
    sum_i  = sum of the losses of e_i's tokens           -> acc:      argmin sum_i
    mean_i = sum_i / len(e_i)                            -> acc_norm: argmin mean_i

Only the ending's tokens are scored: the context is the same for all four rows,
so its loss would add the same number to each. The sum favours short endings
(fewer tokens, fewer losses added); the mean removes that bias, which is why
acc_norm is the number usually reported. Padding never changes a score:
attention is causal, so a position never sees the padding after it.

HellaSwag files, told apart by their first bytes, not their name:
  - HellaSwag's own .jsonl: one JSON object a line with "ctx", "endings"
    (4 strings) and "label" (0..3), tokenized here;
  - llm.c's eval .bin (dev/data/hellaswag.py writes it), already tokenized:
        header   256 x int32 LE: [20240522 (magic), 1 (version), n_examples,
                                  longest example in bytes, 0, ...]
        examples n_examples x a run of uint16 LE:
                 65535 (start), its length in bytes (these words included),
                 index (0, 1, ...), label, 4 (completions),
                 n_ctx, n_ctx context tokens, then 4 x (n_i, n_i ending tokens)
    The ending tokens are GPT-2's encoding of " " + ending, as here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import LlmpyError
from .formats.llmc import SHARD_MAGIC

# ---------------------------------------------------------------------- validation loss


def val_loss(model, loader, steps: int, progress=None) -> float:
    """Mean loss over the first `steps` batches of the loader (reset first).
    progress, if given, is called with no argument after each batch."""
    if steps <= 0:
        raise LlmpyError(f"number of val batches must be positive, got {steps}")
    loader.reset()
    total = 0.0
    for _ in range(steps):
        x, y = loader.next_batch()
        _, loss = model.forward(x, y)
        total += loss
        if progress is not None:
            progress()
    return total / steps


def batches_per_pass(loader) -> int:
    """Full batches in one pass over the loader's data (one epoch)."""
    return loader.num_windows // loader.global_batch


def val_report(model, loader, steps: int | None = None, progress=None) -> dict:
    """val_loss and perplexity, with what they were measured on: `steps`
    batches, or one pass over the data when steps is None or more than one
    pass (then "capped_from" holds the steps asked for)."""
    one_pass = batches_per_pass(loader)
    if steps is not None and steps <= 0:
        raise LlmpyError(f"--steps {steps}: the number of val batches must be >= 1")
    used = one_pass if steps is None else min(steps, one_pass)
    loss = val_loss(model, loader, used, progress)
    res = {"val_loss": loss, "perplexity": math.exp(loss), "batches": used,
           "B": loader.B, "T": loader.T, "tokens": used * loader.B * loader.T}
    if steps is not None and steps > one_pass:
        res["capped_from"] = steps
    return res


# ---------------------------------------------------------------------- HellaSwag

_FIX = "run `llmpy prepare hellaswag` or pass a HellaSwag .jsonl file or llm.c's hellaswag_val.bin"
EVAL_MAGIC, EVAL_VERSION = 20240522, 1         # llm.c's eval .bin header
_START_EXAMPLE = 65535                          # the uint16 that opens each example in it


def read_hellaswag(path, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag file, up to limit: HellaSwag's .jsonl
    (dicts with "ctx", "endings", "label") or llm.c's eval .bin (dicts with
    "ctx_tokens", "ending_tokens", "label"). Anything else is one LlmpyError
    line naming the file (and the line or example at fault)."""
    path = Path(path)
    if not path.is_file():
        raise LlmpyError(f"{path}: no such HellaSwag file; {_FIX}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        magic = int.from_bytes(head, "little") if len(head) == 4 else None
        if magic == EVAL_MAGIC:
            examples = read_hellaswag_bin(path, limit)
        elif magic == SHARD_MAGIC:
            raise LlmpyError(f"{path} is a token shard (llm.c header {SHARD_MAGIC}), not a HellaSwag file; {_FIX}")
        else:
            examples = _read_hellaswag_jsonl(path, limit)
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read it ({e.strerror}); {_FIX}") from None
    if not examples:
        raise LlmpyError(f"{path}: no examples in this file; {_FIX}")
    return examples


def _read_hellaswag_jsonl(path: Path, limit: int | None) -> list[dict]:
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise LlmpyError(f"{path}:{lineno}: not UTF-8 text, so neither a HellaSwag .jsonl nor llm.c's "
                                 f"HellaSwag .bin (header {EVAL_MAGIC}); {_FIX}") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise LlmpyError(f"{path}:{lineno}: not valid JSON ({why}); the file is damaged, {_FIX}") from None
            if not isinstance(ex, dict):
                raise LlmpyError(f"{path}:{lineno}: not a JSON object; not a HellaSwag file, {_FIX}")
            missing = [k for k in ("ctx", "endings", "label") if k not in ex]
            if missing:
                raise LlmpyError(f"{path}:{lineno}: missing key {missing[0]!r}; not a HellaSwag file, {_FIX}")
            ctx, ends, label = ex["ctx"], ex["endings"], ex["label"]
            if not (isinstance(ends, list) and len(ends) == 4 and all(isinstance(e, str) for e in ends)
                    and type(label) is int and 0 <= label < 4):
                raise LlmpyError(f"{path}:{lineno}: expected 4 endings (strings) and a label in 0..3; {_FIX}")
            if not isinstance(ctx, str) or not ctx:
                raise LlmpyError(f"{path}:{lineno}: 'ctx' must be a non-empty string; {_FIX}")
            examples.append(ex)
    return examples


def read_hellaswag_bin(path, limit: int | None = None) -> list[dict]:
    """The examples of llm.c's HellaSwag eval .bin (layout in the module
    docstring), up to limit, every field checked against the format."""
    path = Path(path)
    data = path.read_bytes()

    def fail(what):
        return LlmpyError(f"{path}: {what}; not llm.c's HellaSwag .bin, or a damaged one; {_FIX}")
    if len(data) < 1024 or len(data) % 2:
        raise fail(f"{len(data)} bytes: shorter than the 1024-byte header, or not whole uint16s")
    header = np.frombuffer(data, dtype="<i4", count=256)
    magic, version, n_examples = (int(v) for v in header[:3])
    if magic != EVAL_MAGIC or version != EVAL_VERSION:
        raise fail(f"header {magic} version {version}, expected {EVAL_MAGIC} version {EVAL_VERSION}")
    if n_examples <= 0:
        raise fail(f"the header says {n_examples} examples")
    words = np.frombuffer(data, dtype="<u2", offset=1024)   # (n_words,) the examples' uint16 stream
    n = len(words)
    want = n_examples if limit is None else min(limit, n_examples)
    examples, pos = [], 0
    for i in range(want):
        at = f"example {i} (byte {1024 + 2 * pos})"
        if pos + 6 > n:
            raise fail(f"{at}: the file ends inside it ({n_examples} examples in the header)")
        start, nbytes, index, label, n_ends, n_ctx = (int(w) for w in words[pos:pos + 6])
        if start != _START_EXAMPLE or index != i:
            raise fail(f"{at}: starts with {start}, {nbytes}, {index}, expected {_START_EXAMPLE}, <bytes>, {i}")
        if nbytes % 2:
            raise fail(f"{at}: an odd length of {nbytes} bytes")
        if pos + nbytes // 2 > n:
            raise fail(f"{at}: its {nbytes} bytes run past the end of the file (truncated?)")
        if label >= 4 or n_ends != 4:
            raise fail(f"{at}: label {label} and {n_ends} endings, expected a label in 0..3 and 4 endings")
        stop = pos + nbytes // 2              # this example's words are [pos, stop)
        q = pos + 6
        ctx = words[q:q + n_ctx]
        q += n_ctx
        ends = []
        for _ in range(4):
            k = int(words[q]) if q < stop else 0
            ends.append(words[q + 1:q + 1 + k])
            q += 1 + k
        if n_ctx == 0 or q != stop or any(len(e) == 0 for e in ends):
            raise fail(f"{at}: its context and endings do not fill its {nbytes} bytes "
                       f"(or one of them is empty)")
        examples.append({"ind": index, "label": label, "ctx_tokens": ctx.tolist(),
                         "ending_tokens": [e.tolist() for e in ends]})
        pos = stop
    if want == n_examples and pos != n:
        raise fail(f"{2 * (n - pos)} bytes after the {n_examples} examples the header announces")
    return examples


def example_tokens(example: dict, tokenizer) -> tuple[list[int], list[list[int]]]:
    """(context tokens, the 4 endings' tokens) of an example from either file kind."""
    if "ctx_tokens" in example:
        return example["ctx_tokens"], example["ending_tokens"]
    return tokenizer.encode(example["ctx"]), [tokenizer.encode(" " + e) for e in example["endings"]]


def hellaswag_batch(example: dict, tokenizer, block_size: int, pad_to: int = 1):
    """(tokens (4, T) int64, mask (4, T) bool, label). mask marks each row's
    ending tokens. T is the longest row, rounded up to a multiple of pad_to
    (fewer distinct shapes: the model keeps its activations per shape) and
    at most block_size; a context too long for that loses its first tokens."""
    ctx, ends = example_tokens(example, tokenizer)
    longest_end = max(len(e) for e in ends)
    if longest_end >= block_size:
        raise LlmpyError(f"a HellaSwag ending of {longest_end} tokens does not fit the model's "
                         f"block_size {block_size}; use a model with a longer context")
    ctx = ctx[max(0, len(ctx) + longest_end - block_size):]     # keep the context's end
    T = len(ctx) + longest_end
    T = min(block_size, -(-T // pad_to) * pad_to)
    tokens = np.zeros((4, T), dtype=np.int64)
    mask = np.zeros((4, T), dtype=bool)
    for i, e in enumerate(ends):
        row = list(ctx) + list(e)
        tokens[i, :len(row)] = row
        mask[i, len(ctx):len(row)] = True
    return tokens, mask, int(example["label"])


def completion_losses(model, tokens, mask) -> tuple[np.ndarray, np.ndarray]:
    """(sum, mean) of the masked tokens' losses per row, float64 (4,) each.

    Token t is predicted by the logits at position t - 1, so its loss is
        logsumexp(logits[t-1]) - logits[t-1, token_t].
    Only the masked rows of the logits are read (a few dozen of 4T)."""
    logits, _ = model.forward(tokens)                  # a view, valid until the next forward
    rows, cols = np.nonzero(mask)                      # positions of ending tokens (never 0)
    xp = model.xp                                      # index with the logits' own array kind (CuPy on GPU)
    z = logits[xp.asarray(rows), xp.asarray(cols - 1)]  # (n, V) rows that predict them
    z = np.asarray(z if isinstance(z, np.ndarray) else z.get(), dtype=np.float64)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    losses = lse - z[np.arange(len(rows)), tokens[rows, cols]]
    sums = np.bincount(rows, weights=losses, minlength=tokens.shape[0])
    counts = mask.sum(axis=1)
    return sums, sums / counts


def check_hellaswag_tokenizer(path, tokenizer, model_name, how="--tokenizer TOK") -> None:
    """Refuse, in one line, a HellaSwag file that the model's tokenizer
    (hf_tokenizer.model_tokenizer's choice; None: none is known) cannot
    score. A .jsonl is tokenized with that tokenizer. llm.c's .bin holds
    GPT-2's token ids, right only for a model over GPT-2's tokenizer: a Llama
    would score them without any error (GPT-2's ids all lie inside its
    vocabulary) and report a meaningless accuracy. how: the way to name a
    tokenizer, for the message."""
    from .formats.hf import GPT2_VOCAB_SIZE
    first = read_hellaswag(path, limit=1)[0]
    if "ctx" in first:
        if tokenizer is None:
            raise LlmpyError(f"{path}: HellaSwag's text must be tokenized with {model_name}'s tokenizer, and none "
                             f"is known for its vocabulary; give the tokenizer.json its data was prepared with "
                             f"({how})")
    elif getattr(tokenizer, "vocab_size", None) != GPT2_VOCAB_SIZE:
        raise LlmpyError(f"{path}: llm.c's HellaSwag .bin holds GPT-2's token ids, but {model_name} has another "
                         "tokenizer; pass the HellaSwag .jsonl (llmpy prepare hellaswag), which is tokenized "
                         "with the model's own")


def hellaswag(model, path, limit: int | None = None, tokenizer=None, progress=None) -> dict:
    """HellaSwag accuracy of the model on a HellaSwag file (.jsonl or llm.c's
    .bin): {"acc", "acc_norm", "examples", "correct", "correct_norm",
    "per_example": [...]}. Each entry of per_example holds the label, both
    predictions and the four sums and means. progress(n, total, acc_norm so
    far), if given, is called after each example. tokenizer: the model's
    (default GPT-2's; see check_hellaswag_tokenizer)."""
    examples = read_hellaswag(path, limit)
    if tokenizer is None and "ctx" in examples[0]:
        from .data.tokenizer import Tokenizer
        tokenizer = Tokenizer()
    block = model.config.block_size
    correct = correct_norm = 0
    per_example = []
    for n, ex in enumerate(examples, 1):
        tokens, mask, label = hellaswag_batch(ex, tokenizer, block, pad_to=32)
        if int(tokens.max()) >= model.config.vocab_size:
            raise LlmpyError(f"{path}: example {n - 1} holds token id {int(tokens.max())}, outside the model's "
                             f"vocabulary of {model.config.vocab_size}; the file was made for another tokenizer")
        sums, means = completion_losses(model, tokens, mask)
        pred, pred_norm = int(np.argmin(sums)), int(np.argmin(means))
        correct += pred == label
        correct_norm += pred_norm == label
        per_example.append({"ind": ex.get("ind"), "label": label, "pred": pred, "pred_norm": pred_norm,
                            "sum_loss": sums.tolist(), "mean_loss": means.tolist()})
        if progress is not None:
            progress(n, len(examples), correct_norm / n)
    k = len(examples)
    return {"acc": correct / k, "acc_norm": correct_norm / k, "examples": k,
            "correct": correct, "correct_norm": correct_norm, "per_example": per_example}
