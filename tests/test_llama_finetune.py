"""Fine-tuning a Llama directory as a user does it, offline: the hub, the run's tokenizer, its end of text.

The model is a tiny Llama 3 saved by transformers (LlamaForCausalLM.save_pretrained,
sharded as Meta's 8B is: an index and model-0000K-of-0000N.safetensors) beside a
byte-level BPE tokenizer.json trained here by the `tokenizers` library
(tests/test_prepare_hf_tokenizer.py). The references are not llmpy's: the
`tokenizers` library decodes the ids (llmpy's generate on the weights of the
checkpoint the text came from gives them); transformers writes the weights
and config.json.

    the hub        a stand-in on 127.0.0.1 (tests/fixtures/hub_server.py) with the directory
                   as a repository: `llmpy sample OWNER/NAME` fetches config, index, shards
                   and tokenizer and nothing else, and what it fetched loads as the original;
                   a gated repository is one line saying how to get access
    train          prepare --tokenizer DIR, train --model DIR: the samples are DIR's
                   tokenizer's text; every checkpoint carries that tokenizer, so --resume and
                   `llmpy sample RUN` decode with it after DIR is gone
    end of text    config.json's eos_token_id, an int or a list, ends generation
    mistakes       no tokenizer for the vocabulary, one larger than it, eval on another
                   tokenizer's shards: one line, exit 2
"""
from __future__ import annotations

import json
import shutil
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as ReferenceTokenizer
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

import llmpy
from llmpy import families, formats
from llmpy.cli import main
from llmpy.data.hf_tokenizer import HFTokenizer, decode_sampled
from llmpy.data.shards import write_shard
from llmpy.formats import hf_llama
from llmpy.inference import end_ids, generate
from llmpy.llama import Llama
from llmpy.llama_layout import LlamaConfig
from llmpy.model import GPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.hub_server import HubServer  # noqa: E402
from test_finetune import llmpy as llmpy_process  # noqa: E402
from test_prepare_hf_tokenizer import EOT_TEXT, make_tokenizer, one_error_line, write_inputs  # noqa: E402

PROMPT = "The lighthouse keeper"
TRAIN = ["-B", "2", "-T", "16", "--lr", "1e-3", "--warmup-steps", "1", "--val-every", "0", "--no-progress"]


def save_llama(path: Path, vocab: int, eos, seed: int = 0):
    """A tiny Llama 3 written by transformers in shards; weights drawn wide
    (std 0.5) so that greedy decoding is far from uniform."""
    cfg = HFLlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rope_theta=500000.0, tie_word_embeddings=True, initializer_range=0.5,
                        bos_token_id=None, eos_token_id=eos)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20KB")
    assert len(set(json.loads((path / hf_llama.SHARD_INDEX).read_text())["weight_map"].values())) > 1


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A model directory as a Llama 3's is: config.json (eos_token_id the
    tokenizer's <|end_of_text|>), sharded weights, tokenizer.json and
    tokenizer_config.json."""
    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    tok = make_tokenizer(d / "tokenizer.json")
    save_llama(d, tok.get_vocab_size(), eos=tok.token_to_id(EOT_TEXT))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT_TEXT,
                                                         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def reference_text(model, tokenizer_json: Path, prompt: str, n: int, **sampling) -> str:
    """prompt + the `tokenizers` library's text of what generate continues it
    with, stopping at <|end_of_text|>."""
    ref = ReferenceTokenizer.from_file(str(tokenizer_json))
    ids = ref.encode(prompt, add_special_tokens=False).ids if prompt else [ref.token_to_id(EOT_TEXT)]
    out = generate(model, ids, n, eot=ref.token_to_id(EOT_TEXT), **sampling)
    return prompt + ref.decode(out, skip_special_tokens=False)


def run(capsys, *args) -> str:
    """`llmpy ARGS` in this process; its stdout (exit 0 asserted)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def prepared(tmp_path, capsys, tokenizer) -> tuple[str, str, str]:
    """(train glob, val shard, prepare's "train on it" line) of the test text through `tokenizer`."""
    out = run(capsys, "prepare", *write_inputs(tmp_path / "src"), "--out", tmp_path / "data", "--name", "mine",
              "--tokenizer", tokenizer, "--workers", "1", "--no-progress")
    hint = next(line for line in out.splitlines() if "train on it with: " in line)
    return str(tmp_path / "data" / "mine_train_*.bin"), str(tmp_path / "data" / "mine_val_000000.bin"), hint


def final_sample(stdout: str, steps: int) -> str:
    return stdout.split(f"--- sample after {steps} steps ---\n", 1)[1].rsplit("\n---\n", 1)[0]


# ---------------------------------------------------------------------------- the hub


def test_the_hub_gives_a_sharded_llama_with_its_tokenizer(tmp_path, llama_dir):
    """`llmpy sample OWNER/NAME` downloads the sharded layout and the tokenizer
    (not the repository's other files), the download loads as the original,
    and the sample is the tokenizer's text."""
    hub = HubServer()
    wanted = {p.name: p.read_bytes() for p in llama_dir.iterdir() if p.name != "generation_config.json"}
    others = {"generation_config.json": b"{}", "README.md": b"# tiny\n", "pytorch_model.bin": b"not llmpy's",
              "original/consolidated.00.pth": b"Meta's own format", "original/tokenizer.model": b"tiktoken's"}
    hub.add_repo("meta-llama/Tiny-Llama-3", {**wanted, **others})
    try:
        r = llmpy_process("sample", "meta-llama/Tiny-Llama-3", "--prompt", PROMPT, "--temperature", "0",
                          "--tokens", "12", cwd=tmp_path,
                          env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    finally:
        hub.close()
    assert r.returncode == 0, r.stdout + r.stderr
    [snapshot] = (tmp_path / "hf" / "hub" / "models--meta-llama--Tiny-Llama-3" / "snapshots").iterdir()
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == wanted
    assert not [path for _, path in hub.requests if any(name in path for name in others)]
    back = families.load(snapshot)
    assert isinstance(back, Llama)
    np.testing.assert_array_equal(back.params.flat, families.load(llama_dir).params.flat)
    assert r.stdout == reference_text(back, llama_dir / "tokenizer.json", PROMPT, 12, temperature=0) + "\n"


def test_a_gated_hub_model_is_one_line_saying_how_to_get_access(tmp_path, llama_dir):
    hub = HubServer()
    hub.add_repo("meta-llama/Gated-Llama", {"config.json": (llama_dir / "config.json").read_bytes()}, gated=True)
    try:
        r = llmpy_process("sample", "meta-llama/Gated-Llama", cwd=tmp_path,
                          env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    finally:
        hub.close()
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("llmpy sample: error: meta-llama/Gated-Llama: ") and "license" in err, err
    assert "hf auth login" in err and "HF_TOKEN" in err and f"{hub.url}/meta-llama/Gated-Llama" in err, err


# ---------------------------------------------------------------------------- train: the run's tokenizer


def test_finetune_decodes_samples_with_the_model_directorys_tokenizer(tmp_path, capsys, llama_dir):
    """prepare --tokenizer DIR names --model DIR; train's samples are DIR's
    tokenizer's text; the checkpoints carry the tokenizer and config.json's
    eos, so a resume and `llmpy sample RUN` decode with it after DIR is gone."""
    model_dir = shutil.copytree(llama_dir, tmp_path / "tiny-llama")
    train_glob, val, hint = prepared(tmp_path, capsys, model_dir)
    assert f"llmpy train --model {model_dir} --data " in hint
    out = run(capsys, "train", "--model", model_dir, "--data", train_glob, "--val-data", val, *TRAIN, "--steps", 2,
              "--sample-every", 1, "--sample-tokens", 12, "--checkpoint-every", 1, "--keep", 0,
              "--out", tmp_path / "run")
    assert f"samples: decoded with {model_dir / 'tokenizer.json'} (301 ids)" in out.splitlines()
    ckpt = tmp_path / "run" / "ckpt_00000002"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).read_bytes() == (model_dir / name).read_bytes()
    assert json.loads((ckpt / "config.json").read_text())["eos_token_id"] == 300
    at_1 = out.split("--- sample at step 1 ---\n", 1)[1].split("\n---\n", 1)[0]
    model_1 = families.load(tmp_path / "run" / "ckpt_00000001")
    assert at_1 == reference_text(model_1, model_dir / "tokenizer.json", "", 12, temperature=1.0, top_k=40, seed=1)
    model_2 = families.load(ckpt)
    assert final_sample(out, 2) == reference_text(model_2, model_dir / "tokenizer.json", "", 24, temperature=1.0,
                                                  top_k=40, seed=0)

    shutil.rmtree(model_dir)                 # from here on only the run's own copy can decode
    out = run(capsys, "sample", tmp_path / "run", "--prompt", PROMPT, "--temperature", 0, "--tokens", 12)
    assert out == reference_text(model_2, llama_dir / "tokenizer.json", PROMPT, 12, temperature=0) + "\n"
    out = run(capsys, "train", "--out", tmp_path / "run", "--resume", "--steps", 3, "--no-progress")
    assert f"samples: decoded with {ckpt / 'tokenizer.json'} (301 ids)" in out.splitlines()
    assert final_sample(out, 3) == reference_text(families.load(tmp_path / "run" / "ckpt_00000003"),
                                                  llama_dir / "tokenizer.json", "", 24, temperature=1.0, top_k=40,
                                                  seed=0)


def test_no_tokenizer_for_the_vocabulary_skips_samples_in_one_line(tmp_path, capsys, llama_dir):
    """A Llama directory without tokenizer.json over another vocabulary than
    GPT-2's: no sample is decoded with a tokenizer that is not its own; the
    run says so once and trains; --tokenizer brings the samples back."""
    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    train_glob, val, _ = prepared(tmp_path, capsys, llama_dir)
    args = ["train", "--model", bare, "--data", train_glob, "--val-data", val, *TRAIN, "--steps", 2,
            "--sample-every", 1, "--sample-tokens", 4]
    out = run(capsys, *args, "--out", tmp_path / "a")
    assert ("samples: none (no tokenizer for a vocabulary of 301 ids; --tokenizer TOK, the tokenizer.json the "
            "data was prepared with, decodes them)") in out.splitlines()
    assert "--- sample" not in out and "done: loss" in out
    out = run(capsys, *args, "--tokenizer", llama_dir / "tokenizer.json", "--out", tmp_path / "b")
    assert out.count("--- sample") == 2

    # `llmpy sample` cannot turn a prompt into this model's ids: one line
    line = one_error_line(capsys, main(["sample", str(bare), "--prompt", PROMPT]))
    assert f"{bare}: no tokenizer for a vocabulary of 301 ids" in line and "--tokenizer TOK" in line, line
    out = run(capsys, "sample", bare, "--tokenizer", llama_dir, "--prompt", PROMPT, "--temperature", 0,
              "--tokens", 6)
    assert out == reference_text(families.load(bare), llama_dir / "tokenizer.json", PROMPT, 6, temperature=0) + "\n"


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path, capsys, llama_dir):
    big = tmp_path / "big.json"
    make_tokenizer(big, pad_tokens=100)                    # 401 ids for a model of 301
    train_glob, val, _ = prepared(tmp_path, capsys, llama_dir)
    rc = main(["train", "--model", str(llama_dir), "--tokenizer", str(big), "--data", train_glob, *TRAIN,
               "--steps", "1", "--out", str(tmp_path / "run")])
    line = one_error_line(capsys, rc)
    assert f"{big}: a tokenizer of 401 ids, but the model's vocabulary has 301" in line, line
    assert not list((tmp_path / "run").glob("ckpt_*"))


def test_an_id_past_the_tokenizer_shows_as_its_number(tmp_path):
    """llama3-tiny (50,257 ids) over a 301-id tokenizer can sample id 301 and up."""
    ref = make_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path)
    a, b = ref.encode("lighthouse").ids, ref.encode(" keeper").ids
    assert decode_sampled(tok, [*a, 301, 50000, *b]) == "lighthouse<|id 301|><|id 50000|> keeper"
    assert decode_sampled(tok, a + b) == ref.decode(a + b)


# ---------------------------------------------------------------------------- eval: another tokenizer's shards


def test_eval_refuses_shards_beyond_the_vocabulary(tmp_path, capsys, llama_dir):
    shard = tmp_path / "gpt2_val_000000.bin"
    write_shard(shard, np.arange(0, 50257, 37))            # GPT-2 ids, up to 50,246, for a 301-id model
    line = one_error_line(capsys, main(["eval", str(llama_dir), "--data", str(shard), "-B", "1", "-T", "8"]))
    assert f"token shard {shard} holds token id 50,246" in line and "vocabulary of 301 ids" in line, line
    assert "--tokenizer" in line, line


# ---------------------------------------------------------------------------- the end of text


def test_generation_stops_at_any_eos_id_of_config_json(tmp_path, capsys, llama_dir):
    """config.json's eos_token_id as a list (Llama 3 Instruct has three):
    generate's default and `llmpy sample` stop before the first of them, and
    a save keeps the list."""
    greedy = generate(families.load(llama_dir), [5, 17, 42], 16, temperature=0, stop_at_eot=False)
    k = next(i for i in range(2, 16) if greedy[i] not in greedy[:i])      # a token that appears first at k
    ends = [next(i for i in range(301) if i not in greedy), greedy[k]]     # and one that never does
    d = shutil.copytree(llama_dir, tmp_path / "instruct")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, eos_token_id=ends)))
    model = families.load(d)
    assert model.config.eos_token_id == tuple(ends) and end_ids(model.config) == tuple(ends)
    assert generate(model, [5, 17, 42], 16, temperature=0) == greedy[:k]

    ref = ReferenceTokenizer.from_file(str(d / "tokenizer.json"))
    prompt_ids = ref.encode(PROMPT, add_special_tokens=False).ids
    full = generate(model, prompt_ids, 24, temperature=0, stop_at_eot=False)
    stop = next((i for i, t in enumerate(full) if t in ends), len(full))
    out = run(capsys, "sample", d, "--prompt", PROMPT, "--temperature", 0, "--tokens", 24)
    assert out == PROMPT + ref.decode(full[:stop], skip_special_tokens=False) + "\n"

    formats.save_model(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["eos_token_id"] == ends
    assert HFLlamaConfig.from_pretrained(tmp_path / "saved").eos_token_id == ends


def test_end_ids_come_from_the_config_then_the_tokenizer_then_gpt2s_vocabulary(tmp_path):
    make_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path)
    assert end_ids(LlamaConfig(vocab_size=301, eos_token_id=7), tok) == (7,)
    assert end_ids(LlamaConfig(vocab_size=301), tok) == (tok.eot,) == (300,)
    assert end_ids(LlamaConfig(vocab_size=50257)) == (50256,)         # llama3-tiny on GPT-2's shards
    assert end_ids(LlamaConfig(vocab_size=301)) == ()
    model = Llama(LlamaConfig(vocab_size=301, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32))
    with pytest.raises(llmpy.LlmpyError, match="empty prompt"):
        generate(model, [], 3)


def test_llmpy_load_is_typed_and_returns_either_family(llama_dir):
    assert typing.get_type_hints(llmpy.load)["return"] == GPT | Llama
    assert isinstance(llmpy.load(llama_dir), Llama)


# ------------------------------------------------------------------ HellaSwag with another tokenizer

def test_hellaswag_is_scored_with_the_models_tokenizer(tmp_path, llama_dir, capsys, monkeypatch):
    # A Llama over 60,000 ids with its own tokenizer.json: llm.c's HellaSwag
    # .bin (GPT-2's ids, which all fit in 60,000) would score without any
    # error and mean nothing, so it is refused in one line, in eval and at
    # the start of train; the .jsonl is tokenized with the model's
    # tokenizer.json, the same scores as evals.hellaswag given that tokenizer
    from llmpy import evals
    from llmpy.data.tokenizer import Tokenizer
    from test_evals import FIXTURE, tokenized_fixture, write_llmc_eval_bin
    big = tmp_path / "big-llama"
    cfg = LlamaConfig(block_size=1024, vocab_size=60000, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                      intermediate_size=32, rope_theta=1e4)
    hf_llama.save(big, cfg, Llama(cfg, seed=1).state_dict())
    shutil.copy(llama_dir / "tokenizer.json", big / "tokenizer.json")
    gpt2_bin = tmp_path / "hellaswag_val.bin"
    write_llmc_eval_bin(gpt2_bin, tokenized_fixture(Tokenizer()))

    line = one_error_line(capsys, main(["eval", str(big), "--hellaswag", str(gpt2_bin)]))
    assert "hellaswag_val.bin" in line and "GPT-2's token ids" in line and ".jsonl" in line
    monkeypatch.chdir(tmp_path)                      # train's default data (pydoc) is prepared under ./data
    line = one_error_line(capsys, main(["train", "--model", str(big), "--hellaswag", str(gpt2_bin),
                                        "--hellaswag-every", "1", "--steps", "1", "--out", "run", *TRAIN]))
    assert "GPT-2's token ids" in line

    assert main(["eval", str(big), "--hellaswag", str(FIXTURE), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = families.load(big)
    want = evals.hellaswag(model, FIXTURE, tokenizer=HFTokenizer(big))
    with_gpt2 = evals.hellaswag(model, FIXTURE, tokenizer=Tokenizer())
    assert [e["mean_loss"] for e in want["per_example"]] != [e["mean_loss"] for e in with_gpt2["per_example"]]
    assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"])

    # no tokenizer known for the vocabulary: the .jsonl cannot be tokenized
    (big / "tokenizer.json").unlink()
    line = one_error_line(capsys, main(["eval", str(big), "--hellaswag", str(FIXTURE)]))
    assert "none is known" in line and "tokenizer.json" in line
