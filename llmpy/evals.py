"""Evaluation: validation loss, and HellaSwag accuracy.

Validation loss. The mean next-token cross-entropy over the first `steps`
batches of a val loader, in file order; perplexity = exp(loss), the size of a
uniform choice that would be as uncertain as the model.

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
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import LlmpyError

# ---------------------------------------------------------------------- validation loss


def val_loss(model, loader, steps: int) -> float:
    """Mean loss over the first `steps` batches of the loader (reset first)."""
    if steps <= 0:
        raise LlmpyError(f"number of val batches must be positive, got {steps}")
    loader.reset()
    total = 0.0
    for _ in range(steps):
        x, y = loader.next_batch()
        _, loss = model.forward(x, y)
        total += loss
    return total / steps


def val_report(model, loader, steps: int) -> dict:
    """val_loss and perplexity, with what they were measured on."""
    loss = val_loss(model, loader, steps)
    return {"val_loss": loss, "perplexity": math.exp(loss), "batches": steps,
            "B": loader.B, "T": loader.T, "tokens": steps * loader.B * loader.T}


# ---------------------------------------------------------------------- HellaSwag

_KEYS = ("ctx", "endings", "label")
_FIX = "run `llmpy prepare hellaswag` or pass a HellaSwag .jsonl file"


def read_hellaswag(path, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag jsonl file (one JSON object per line), up to limit."""
    path = Path(path)
    if not path.is_file():
        raise LlmpyError(f"{path}: no such HellaSwag file; {_FIX}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmpyError(f"{path}:{lineno}: not valid JSON ({e.msg}); the file is damaged, {_FIX}") from None
            missing = [k for k in _KEYS if not isinstance(ex, dict) or k not in ex]
            if missing:
                raise LlmpyError(f"{path}:{lineno}: missing key {missing[0]!r}; not a HellaSwag file, {_FIX}")
            if len(ex["endings"]) != 4 or not 0 <= int(ex["label"]) < 4:
                raise LlmpyError(f"{path}:{lineno}: expected 4 endings and a label in 0..3; {_FIX}")
            examples.append(ex)
    if not examples:
        raise LlmpyError(f"{path}: no examples in this file; {_FIX}")
    return examples


def hellaswag_batch(example: dict, tokenizer, block_size: int, pad_to: int = 1):
    """(tokens (4, T) int64, mask (4, T) bool, label). mask marks each row's
    ending tokens. T is the longest row, rounded up to a multiple of pad_to
    (fewer distinct shapes: the model keeps its activations per shape) and
    at most block_size; a context too long for that loses its first tokens."""
    ctx = tokenizer.encode(example["ctx"])
    ends = [tokenizer.encode(" " + e) for e in example["endings"]]
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
        row = ctx + e
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


def hellaswag(model, path, limit: int | None = None, tokenizer=None, progress=None) -> dict:
    """HellaSwag accuracy of the model on a jsonl file: {"acc", "acc_norm",
    "examples", "correct", "correct_norm", "per_example": [...]}. Each entry of
    per_example holds the label, both predictions and the four sums and means."""
    if tokenizer is None:
        from .data.tokenizer import Tokenizer
        tokenizer = Tokenizer()
    examples = read_hellaswag(path, limit)
    block = model.config.block_size
    correct = correct_norm = 0
    per_example = []
    for n, ex in enumerate(examples, 1):
        tokens, mask, label = hellaswag_batch(ex, tokenizer, block, pad_to=32)
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
