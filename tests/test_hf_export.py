"""Complete Hugging Face exports: a model directory written by llmpy (a
training checkpoint, `llmpy convert --to hf`, formats.save_model) is a text
model transformers uses as it is.

    AutoTokenizer.from_pretrained(dir)      the ids of llmpy's tokenizer (tiktoken over OpenAI's
                                            files) on multilingual, whitespace- and emoji-heavy text
    model.generate / pipeline(...)          greedy: token for token llmpy's greedy generation
                                            (inference.generate and `llmpy sample --temperature 0`)
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import llmpy
from llmpy import checkpoint as ckpt
from llmpy import formats
from llmpy.data.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, Tokenizer
from llmpy.inference import generate

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json"}

TEXT = ("Hello world!  Two  spaces,\ttab\t\tand\n\nnewlines \n  \n trailing   \n"
        "Grüße aus Köln — naïve café; Ελληνικά; русский текст; עברית; العربية; हिन्दी; "
        "日本語のテキスト；中文，标点。한국어 "
        "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 combining e\u0301 a\u0308 zero\u200bwidth\u00a0nbsp "
        "spaced punctuation , . ! ? n't 's ; numbers 1234567 3.14159 1,000,000 "
        "don't I'm we'll they've she'd it's 'quoted' DON'T   \r\n\u3000"
        "\x00\x07 control, <|endoftext|> in the middle, end  ")

TINY = llmpy.GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model written by formats.save_model, its embeddings and weight
    matrices drawn 20 x wider than GPT-2's init (std 0.4): at GPT-2's 0.02 a
    random model's greedy decoding repeats one token; at 0.4 it wanders over
    the vocabulary as a trained one would (22 different tokens of 24). The
    padded rows of wte (50257..50303) are random too: they must never win."""
    model = llmpy.GPT(TINY, seed=0)
    rng = np.random.default_rng(1)
    for name, view in model.params.views.items():
        if name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
            view[...] = rng.normal(0, 0.4, view.shape)
    model.params_updated()
    d = tmp_path_factory.mktemp("export") / "model"
    formats.save_model(model, d)
    return model, d


def test_the_directory_holds_the_tokenizer_and_generation_config(export):
    _, d = export
    names = {p.name for p in d.iterdir()}
    assert names == {"config.json", "model.safetensors"} | TOKENIZER_FILES      # and no temporary file
    # vocab.json and merges.txt are OpenAI's encoder.json and vocab.bpe: the hashes tiktoken pins
    assert hashlib.sha256((d / "vocab.json").read_bytes()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256((d / "merges.txt").read_bytes()).hexdigest() == VOCAB_BPE_SHA256
    gen = transformers.GenerationConfig.from_pretrained(d)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (50256, 50256, 50256)
    assert not gen.do_sample


def test_autotokenizer_ids_equal_llmpy_ids(export):
    _, d = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    ours = Tokenizer()
    assert len(hf_tok) == 50257 and hf_tok.eos_token_id == hf_tok.bos_token_id == 50256
    assert hf_tok.model_max_length == TINY.block_size
    # transformers reads <|endoftext|> in text as the special token, as llmpy does with allow_special
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == ours.encode(TEXT, allow_special=True)
    assert ids.count(50256) == 1 and len(ids) > 200
    assert hf_tok(TEXT, split_special_tokens=True)["input_ids"] == ours.encode(TEXT)
    assert hf_tok.decode(ids) == ours.decode(ids) == TEXT


def test_autotokenizer_is_the_fast_tokenizer(export):
    """From vocab.json + merges.txt AutoTokenizer builds the `tokenizers`
    (Rust) BPE itself: the fast tokenizer, no tokenizer.json needed."""
    _, d = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert hf_tok.is_fast
    assert hf_tok.backend_tokenizer.encode(TEXT).ids == Tokenizer().encode(TEXT, allow_special=True)


PROMPT = "The meaning of life is"
N = 24


def test_greedy_generation_equals_transformers(export):
    model, d = export
    ours = generate(model, Tokenizer().encode(PROMPT), N, temperature=0)
    assert len(set(ours)) > N // 2, ours                   # not a degenerate repetition
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.GPT2LMHeadModel.from_pretrained(d)
    x = hf_tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**x, max_new_tokens=N, do_sample=False)
    assert out[0, x["input_ids"].shape[1]:].tolist() == ours
    pipe = transformers.pipeline("text-generation", model=str(d), device="cpu")
    text = pipe(PROMPT, max_new_tokens=N, do_sample=False)[0]["generated_text"]
    assert text == PROMPT + Tokenizer().decode(ours)


def test_llmpy_sample_greedy_equals_the_transformers_pipeline(export):
    _, d = export
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llmpy", "sample", str(d), "--temperature", "0", "--prompt", PROMPT,
                        "--tokens", str(N)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pipe = transformers.pipeline("text-generation", model=str(d), device="cpu")
    assert r.stdout == pipe(PROMPT, max_new_tokens=N, do_sample=False)[0]["generated_text"] + "\n"


def test_convert_to_hf_and_a_training_checkpoint_are_complete(export, tmp_path):
    model, _ = export
    formats.save_model(model, tmp_path / "m.bin", format="llmc")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llmpy", "convert", str(tmp_path / "m.bin"), str(tmp_path / "hf"),
                        "--to", "hf"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from llmpy.optim import AdamW
    path = ckpt.save_training_checkpoint(tmp_path / "run", 3, model, AdamW(model), {"loader": {}})
    for d in (tmp_path / "hf", path):
        assert TOKENIZER_FILES <= {p.name for p in d.iterdir()}, d
        assert transformers.AutoTokenizer.from_pretrained(d)("Hello world")["input_ids"] == [15496, 995]
    # the checkpoint's manifest covers the new files: damage one and the checkpoint no longer verifies
    assert TOKENIZER_FILES <= set(json.loads((path / "manifest.json").read_text())["files"])
    assert ckpt.verify_checkpoint(path) is None
    (path / "merges.txt").write_bytes((path / "merges.txt").read_bytes()[:-1])
    assert "merges.txt" in ckpt.verify_checkpoint(path)


def test_a_model_over_another_vocabulary_gets_no_gpt2_tokenizer(tmp_path):
    """GPT-2's tokenizer files describe 50257 ids; a model with another
    vocabulary (a test model, a custom tokenizer) would be mislabelled."""
    formats.save_model(llmpy.GPT(llmpy.GPTConfig(block_size=8, vocab_size=40, n_layer=1, n_head=1, n_embd=8)),
                       tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
