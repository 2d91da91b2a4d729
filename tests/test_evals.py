"""Evaluation: validation loss, and HellaSwag scored against an independent
computation with transformers' GPT2LMHeadModel (same random weights).

The fixture tests/fixtures/hellaswag_val_sample.jsonl holds a few examples in
HellaSwag's exact jsonl format (written for these tests, not taken from the
dataset). The reference scores each ending on its own unpadded row, with no
llmpy code but the tokenizer; llmpy scores a padded (4, T) batch.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import llmpy
from llmpy import evals
from llmpy.data.shards import DataLoader, write_shard
from llmpy.errors import LlmpyError

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag_val_sample.jsonl"


def small_model(seed=0, block=128):
    """Random GPT-2 with the real vocabulary (the fixture is real text), with
    larger-than-init weights so the four endings get clearly different scores."""
    cfg = llmpy.GPTConfig(block_size=block, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    model = llmpy.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name in ("wte", "wpe", "qkvw", "fcw", "attprojw", "fcprojw"):
        v = model.params.views[name]
        v[...] = 0.2 * rng.standard_normal(v.shape, dtype=np.float32)
    model.params.wte[cfg.vocab_size:] = 0
    for name in ("qkvb", "fcb", "ln1b", "lnfb"):
        model.params.views[name][...] = 0.1 * rng.standard_normal(model.params.views[name].shape, dtype=np.float32)
    return model


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def tok():
    return llmpy.Tokenizer()


# ---------------------------------------------------------------------------- HellaSwag

def test_fixture_is_real_format():
    keys = {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id"}
    lines = FIXTURE.read_text().splitlines()
    assert 5 <= len(lines) <= 10
    for line in lines:
        ex = json.loads(line)
        assert set(ex) == keys
        assert len(ex["endings"]) == 4 and ex["label"] in range(4)
        assert ex["ctx"] == (ex["ctx_a"] + " " + ex["ctx_b"]).strip()


def test_batch_layout(tok):
    ex = evals.read_hellaswag(FIXTURE, limit=1)[0]
    tokens, mask, label = evals.hellaswag_batch(ex, tok, block_size=128, pad_to=32)
    ctx = tok.encode(ex["ctx"])
    assert label == ex["label"] and tokens.shape[1] % 32 == 0
    for i, ending in enumerate(ex["endings"]):
        end = tok.encode(" " + ending)
        row = ctx + end
        assert tokens[i, :len(row)].tolist() == row
        assert np.flatnonzero(mask[i]).tolist() == list(range(len(ctx), len(row)))


def test_padding_does_not_change_scores(model, tok):
    ex = evals.read_hellaswag(FIXTURE)[3]
    a = evals.completion_losses(model, *evals.hellaswag_batch(ex, tok, 128, pad_to=1)[:2])
    b = evals.completion_losses(model, *evals.hellaswag_batch(ex, tok, 128, pad_to=64)[:2])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


def test_hellaswag_matches_transformers(model, tok):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    hm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True))
    res = hm.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=False)
    assert set(res.missing_keys) <= {"lm_head.weight"} and not res.unexpected_keys
    hm.eval()

    got = evals.hellaswag(model, FIXTURE, tokenizer=tok)
    examples = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert got["examples"] == len(examples)
    correct = correct_norm = 0
    with torch.no_grad():
        for ex, mine in zip(examples, got["per_example"]):
            ctx = tok.encode(ex["ctx"])
            sums, means = [], []
            for ending in ex["endings"]:
                end = tok.encode(" " + ending)
                ids = torch.tensor([ctx + end])
                logp = torch.log_softmax(hm(ids).logits[0].double(), dim=-1)
                # token at position t is predicted at t - 1
                s = -sum(float(logp[len(ctx) + j - 1, e]) for j, e in enumerate(end))
                sums.append(s)
                means.append(s / len(end))
            np.testing.assert_allclose(mine["sum_loss"], sums, rtol=1e-4)
            np.testing.assert_allclose(mine["mean_loss"], means, rtol=1e-4)
            assert mine["pred"] == int(np.argmin(sums))
            assert mine["pred_norm"] == int(np.argmin(means))
            correct += int(np.argmin(sums)) == ex["label"]
            correct_norm += int(np.argmin(means)) == ex["label"]
    assert got["acc"] == correct / len(examples)
    assert got["acc_norm"] == correct_norm / len(examples)
    # the random model's choices are not all the same: the comparison has teeth
    assert len({e["pred"] for e in got["per_example"]}) > 1


def test_limit_and_errors(tmp_path, model, tok):
    assert evals.hellaswag(model, FIXTURE, limit=2, tokenizer=tok)["examples"] == 2
    with pytest.raises(LlmpyError, match="no such HellaSwag file"):
        evals.read_hellaswag(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(LlmpyError, match=r"bad.jsonl:2: not valid JSON"):
        evals.read_hellaswag(bad)
    bad.write_text('{"ctx": "x", "label": 0}\n')
    with pytest.raises(LlmpyError, match="missing key 'endings'"):
        evals.read_hellaswag(bad)


# ---------------------------------------------------------------------------- val loss

def test_val_loss_is_mean_over_batches(tmp_path, model):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "val_000.bin", rng.integers(0, 50257, size=2000))
    loader = DataLoader(str(tmp_path / "val_*.bin"), 2, 32, shuffle=False)
    want = []
    for _ in range(3):
        x, y = loader.next_batch()
        want.append(model.forward(x, y)[1])
    got = evals.val_loss(model, loader, 3)          # resets the loader first
    assert got == pytest.approx(np.mean(want), rel=1e-6)
    rep = evals.val_report(model, loader, 3)
    assert rep["perplexity"] == pytest.approx(math.exp(rep["val_loss"]))
    with pytest.raises(LlmpyError):
        evals.val_loss(model, loader, 0)


def test_cli_eval_json(tmp_path, model, capsys):
    from llmpy.cli import main
    model.save(tmp_path / "m")
    write_shard(tmp_path / "val_000.bin", np.random.default_rng(1).integers(0, 50257, size=3000))
    assert main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "val_*.bin"), "--steps", "2",
                 "-B", "2", "-T", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["perplexity"] == pytest.approx(math.exp(res["val_loss"]))
    assert main(["eval", str(tmp_path / "m"), "--hellaswag", str(FIXTURE), "--limit", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 3 and 0 <= res["acc"] <= 1 and 0 <= res["acc_norm"] <= 1
    assert main(["eval", str(tmp_path / "m")]) == 2          # neither --data nor --hellaswag
    assert "--hellaswag" in capsys.readouterr().err


# ---------------------------------------------------------------------------- llm.c's HellaSwag .bin

def write_llmc_eval_bin(path, examples):
    """llm.c's eval file, written here with struct from its documented layout
    (dev/data/data_common.py write_evalfile): a 256 x int32 header
    [20240522, 1, n, longest example in bytes], then per example the uint16s
    65535, its bytes, its index, label, 4, n_ctx, ctx..., 4 x (n_i, ending_i...)."""
    import struct
    body, longest = b"", 0
    for i, (ctx, ends, label) in enumerate(examples):
        rest = [i, label, len(ends), len(ctx), *ctx]
        for e in ends:
            rest += [len(e), *e]
        nbytes = 2 * (2 + len(rest))
        longest = max(longest, nbytes)
        body += struct.pack(f"<{2 + len(rest)}H", 65535, nbytes, *rest)
    header = struct.pack("<256i", 20240522, 1, len(examples), longest, *([0] * 252))
    path.write_bytes(header + body)


def tokenized_fixture(tok):
    return [(tok.encode(ex["ctx"]), [tok.encode(" " + e) for e in ex["endings"]], ex["label"])
            for ex in map(json.loads, FIXTURE.read_text().splitlines())]


def test_llmc_bin_reads_what_was_written(tmp_path, tok):
    examples = tokenized_fixture(tok)
    write_llmc_eval_bin(tmp_path / "hellaswag_val.bin", examples)
    got = evals.read_hellaswag(tmp_path / "hellaswag_val.bin")
    assert [(g["ctx_tokens"], g["ending_tokens"], g["label"]) for g in got] == examples
    assert [g["ind"] for g in got] == list(range(len(examples)))
    assert len(evals.read_hellaswag(tmp_path / "hellaswag_val.bin", limit=2)) == 2


def test_llmc_bin_scores_as_the_jsonl(tmp_path, model, tok):
    """The .bin holds the same tokens as the .jsonl (which is checked against
    transformers above): the same sums, means and accuracies."""
    write_llmc_eval_bin(tmp_path / "h.bin", tokenized_fixture(tok))
    a = evals.hellaswag(model, FIXTURE, tokenizer=tok)
    b = evals.hellaswag(model, tmp_path / "h.bin")
    assert (a["acc"], a["acc_norm"], a["examples"]) == (b["acc"], b["acc_norm"], b["examples"])
    for x, y in zip(a["per_example"], b["per_example"]):
        np.testing.assert_allclose(x["sum_loss"], y["sum_loss"], rtol=1e-6)


def test_wrong_hellaswag_files_are_one_line(tmp_path, tok):
    good = tmp_path / "good.bin"
    examples = tokenized_fixture(tok)
    write_llmc_eval_bin(good, examples)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    cases = {
        "shard.bin": (None, "is a token shard"),
        "random.bin": (rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes(), "not UTF-8 text"),
        "latin1.jsonl": ('{"ctx": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl:1: not UTF-8 text"),
        "truncated.bin": (data[:-10], "run past the end of the file"),
        "cut.bin": (data[:1024 + 6], "the file ends inside it"),
        "trailing.bin": (data + b"\x00\x00", "2 bytes after the"),
        "version.bin": (data[:4] + (2).to_bytes(4, "little") + data[8:], "version 2, expected 20240522 version 1"),
        "header.bin": (data[:600], "shorter than the 1024-byte header"),
        "label.jsonl": (b'{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": "3"}\n', "label in 0..3"),
        "list.jsonl": (b"[1, 2]\n", "not a JSON object"),
        "empty.jsonl": (b"\n\n", "no examples"),
    }
    write_shard(tmp_path / "shard.bin", rng.integers(0, 50257, size=100))
    # an example whose length field disagrees with its content
    bad_len = bytearray(data)
    bad_len[1024 + 2:1024 + 4] = (int.from_bytes(data[1026:1028], "little") + 2).to_bytes(2, "little")
    cases["length.bin"] = (bytes(bad_len), "example 0 (byte 1024): its context and endings do not fill its")
    for name, (content, says) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(LlmpyError, match=re.escape(says)) as e:
            evals.read_hellaswag(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), name


def test_hellaswag_bin_with_ids_outside_the_vocabulary(tmp_path, tok):
    m = llmpy.GPT(llmpy.GPTConfig(block_size=64, vocab_size=1000, n_layer=1, n_head=1, n_embd=8))
    write_llmc_eval_bin(tmp_path / "h.bin", tokenized_fixture(tok)[:1])
    with pytest.raises(LlmpyError, match="outside the model's vocabulary of 1000"):
        evals.hellaswag(m, tmp_path / "h.bin")


def test_cli_hellaswag_wrong_file(tmp_path, model, capsys):
    from llmpy.cli import main
    model.save(tmp_path / "m")
    (tmp_path / "data.bin").write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    assert main(["eval", str(tmp_path / "m"), "--hellaswag", str(tmp_path / "data.bin")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "data.bin" in err and "UnicodeDecodeError" not in err
