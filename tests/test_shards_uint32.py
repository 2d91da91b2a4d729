"""Llama 3 token shards (uint32, llm.c's second shard kind) and the tokenizer.json tokenizer.

References: shard bytes come from a writer transcribed here from llm.c's
dev/data/data_common.py (struct, not llmpy); tokenizer ids from the
`tokenizers` library and transformers' PreTrainedTokenizerFast.
"""
import struct

import numpy as np
import pytest

from llmpy.data import DataLoader, read_shard, write_shard
from llmpy.data.hf_tokenizer import HFTokenizer
from llmpy.errors import LlmpyError

# llm.c dev/data/data_common.py: HEADERS_INFO
LLMC_KINDS = {"gpt-2": (20240520, 1, "H"), "llama-3": (20240801, 7, "I")}


def llmc_shard_bytes(toks, model_desc):
    """llm.c's write_datafile, with struct: 256 little-endian int32 header
    [magic, version, ntok, 0...], then the tokens as uint16 ("H") or uint32 ("I")."""
    magic, version, code = LLMC_KINDS[model_desc]
    header = struct.pack("<256i", magic, version, len(toks), *([0] * 253))
    return header + struct.pack(f"<{len(toks)}{code}", *toks)


BIG_IDS = [0, 1, 65535, 65536, 128000, 128255, 2**31 - 1, 2**32 - 1]


# ------------------------------------------------------------------ files

def test_reads_llmc_llama3_shard(tmp_path):
    path = tmp_path / "llama.bin"
    path.write_bytes(llmc_shard_bytes(BIG_IDS, "llama-3"))
    back = read_shard(path)
    assert back.dtype == np.uint32
    assert back.tolist() == BIG_IDS            # ids >= 65536 survive
    with pytest.raises(ValueError):            # read-only view of the file
        back[0] = 1


@pytest.mark.parametrize("dtype", [np.uint32, "uint32", np.dtype("<u4")])
def test_writes_llmc_llama3_bytes(tmp_path, dtype):
    path = tmp_path / "llama.bin"
    write_shard(path, np.array(BIG_IDS, dtype=np.int64), dtype=dtype)
    assert path.read_bytes() == llmc_shard_bytes(BIG_IDS, "llama-3")


@pytest.mark.parametrize("dtype", [None, np.uint16])
def test_uint16_bytes_unchanged(tmp_path, dtype):
    ids = [0, 50256, 15496, 995, 65535]
    path = tmp_path / "gpt2.bin"
    write_shard(path, ids) if dtype is None else write_shard(path, ids, dtype=dtype)
    assert path.read_bytes() == llmc_shard_bytes(ids, "gpt-2")


@pytest.mark.parametrize("kind, dtype", [("gpt-2", np.uint16), ("llama-3", np.uint32)])
def test_read_dtype_follows_header(tmp_path, kind, dtype):
    for ids in ([7, 8, 9], []):
        path = tmp_path / f"{kind}_{len(ids)}.bin"
        path.write_bytes(llmc_shard_bytes(ids, kind))
        back = read_shard(path)
        assert back.dtype == dtype and back.tolist() == ids
        assert not back.flags.writeable       # the empty shard too


def test_write_refuses_what_does_not_fit(tmp_path):
    with pytest.raises(LlmpyError, match=r"65536.*dtype=np.uint32"):
        write_shard(tmp_path / "a.bin", [1, 65536])
    with pytest.raises(LlmpyError, match="4294967296"):
        write_shard(tmp_path / "a.bin", [2**32], dtype=np.uint32)
    with pytest.raises(LlmpyError):
        write_shard(tmp_path / "a.bin", [-1], dtype=np.uint32)
    for bad in (np.int32, np.uint64, "float32", "nonsense"):
        with pytest.raises(LlmpyError, match="np.uint16.*np.uint32"):
            write_shard(tmp_path / "a.bin", [1], dtype=bad)
    assert list(tmp_path.iterdir()) == []


def _one_line(fn, *fragments):
    """fn() raises an LlmpyError of one line containing every fragment."""
    with pytest.raises(LlmpyError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def _one_line_error(path, *fragments):
    _one_line(lambda: read_shard(path), path.name, "llmpy prepare", *fragments)


@pytest.mark.parametrize("magic, version, fragment", [
    (20240801, 1, "version 1, expected 7"),      # Llama 3 magic, GPT-2 version
    (20240520, 7, "version 7, expected 1"),      # GPT-2 magic, Llama 3 version
    (20240801, 8, "version 8"),
    (20240326, 7, "not a token shard"),          # an llm.c model file
])
def test_bad_magic_or_version(tmp_path, magic, version, fragment):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<256i", magic, version, 2, *([0] * 253)) + bytes(8))
    _one_line_error(path, fragment)


def test_truncated_and_long_llama3(tmp_path):
    good = llmc_shard_bytes(list(range(100)), "llama-3")
    cases = {"cut.bin": good[:-4], "half.bin": good[:1024 + 200],   # a uint16-sized body
             "long.bin": good + bytes(4), "head.bin": good[:600]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        _one_line_error(tmp_path / name, "header" if name == "head.bin" else "100 tokens")


# ---------------------------------------------------------------- loader

T = 8


def _pair_of_datasets(tmp_path, sizes):
    """The same small ids as llm.c GPT-2 shards in a/ and Llama 3 shards in b/."""
    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    for s, n in enumerate(sizes):
        ids = rng.integers(0, 65536, size=n).tolist()
        (tmp_path / "a" / f"tok_{s}.bin").write_bytes(llmc_shard_bytes(ids, "gpt-2"))
        (tmp_path / "b" / f"tok_{s}.bin").write_bytes(llmc_shard_bytes(ids, "llama-3"))
    return str(tmp_path / "a" / "tok_*.bin"), str(tmp_path / "b" / "tok_*.bin")


@pytest.mark.parametrize("kw", [dict(shuffle=False), dict(seed=3),
                                dict(seed=5, rank=1, world_size=2)])
def test_loader_same_batches_either_kind(tmp_path, kw):
    narrow, wide = _pair_of_datasets(tmp_path, [81, 200, 57])
    a, b = DataLoader(narrow, B=3, T=T, **kw), DataLoader(wide, B=3, T=T, **kw)
    assert (a.dtype, b.dtype) == (np.uint16, np.uint32)
    for _ in range(20):                   # crosses epoch boundaries
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xb.dtype == yb.dtype == xa.dtype == np.int32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_loader_keeps_big_ids(tmp_path):
    ids = (128000 + np.arange(4 * T + 1)).tolist()
    (tmp_path / "l.bin").write_bytes(llmc_shard_bytes(ids, "llama-3"))
    x, y = DataLoader(str(tmp_path / "l.bin"), B=4, T=T, shuffle=False).next_batch()
    np.testing.assert_array_equal(x.reshape(-1), ids[:-1][:4 * T])
    np.testing.assert_array_equal(y[:, -1], [ids[(b + 1) * T] for b in range(4)])


def test_loader_refuses_ids_beyond_int32(tmp_path):
    (tmp_path / "huge.bin").write_bytes(llmc_shard_bytes([5] * T + [2**31], "llama-3"))
    dl = DataLoader(str(tmp_path / "huge.bin"), B=1, T=T)
    _one_line(dl.next_batch, "huge.bin", "2**31")


def test_loader_refuses_mixed_kinds(tmp_path):
    (tmp_path / "tok_0.bin").write_bytes(llmc_shard_bytes(list(range(50)), "gpt-2"))
    (tmp_path / "tok_1.bin").write_bytes(llmc_shard_bytes(list(range(50)), "llama-3"))
    _one_line(lambda: DataLoader(str(tmp_path / "tok_*.bin"), B=1, T=T),
              "tok_0.bin", "tok_1.bin", "uint16", "uint32")


# ------------------------------------------------------------ tokenizer.json

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Llama 3 uses a byte-level BPE with 128256 tokens.",
    "Café, naïve, façade: bytes beyond ASCII.",
    "Numbers 12345 and   spaces\tand\nnewlines.",
    "日本語のテキストと絵文字 🦙",
]
TEXTS = SENTENCES + ["an unseen word: zyxwvut", "", "  leading spaces",
                     "a fake boundary <|end_of_text|> inside", "🦙🦙 and é"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


@pytest.fixture(scope="module")
def tokenizers():
    return pytest.importorskip("tokenizers")     # here, so that only these tests skip without it


def _train(specials, post_processor=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    if post_processor:   # like Llama 3's: <|begin_of_text|> before every text
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizers):
    d = tmp_path_factory.mktemp("hf_tok")
    _train(SPECIALS).save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def hf_fast(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))


def test_encode_matches_references(tokenizers, tokenizer_dir, hf_fast):
    ours = HFTokenizer(tokenizer_dir)
    ref = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ref_split = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ref_split.encode_special_tokens = True
    for text in TEXTS:
        plain = ours.encode(text)
        assert plain == ref_split.encode(text, add_special_tokens=False).ids
        assert plain == hf_fast.encode(text, add_special_tokens=False, split_special_tokens=True)
        special = ours.encode(text, allow_special=True)
        assert special == ref.encode(text, add_special_tokens=False).ids
        assert special == hf_fast.encode(text, add_special_tokens=False)
        # the references' default adds the post-processor's <|begin_of_text|>; ours never does
        assert hf_fast.encode(text) == [0] + special
    boundary = "a fake boundary <|end_of_text|> inside"
    assert ours.eot in ours.encode(boundary, allow_special=True)
    assert ours.eot not in ours.encode(boundary)        # a document cannot fake a boundary


def test_decode_matches_references(tokenizers, tokenizer_dir, hf_fast):
    ours = HFTokenizer(tokenizer_dir)
    ref = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text) + [ours.eot] + ours.encode(text[::-1])
        got = ours.decode(ids)
        assert got == ref.decode(ids, skip_special_tokens=False)
        assert got == hf_fast.decode(ids, clean_up_tokenization_spaces=False)
        assert ours.decode(ours.encode(text)) == text
    assert ours.decode(np.array(ours.encode("fox"), dtype=np.uint32)) == "fox"   # shard ids work


def test_eot_and_vocab_size(tokenizers, tokenizer_dir, hf_fast):
    ref = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for where in (tokenizer_dir, tokenizer_dir / "tokenizer.json", str(tokenizer_dir)):
        ours = HFTokenizer(where)
        assert ours.eot == ref.token_to_id("<|end_of_text|>") == hf_fast.convert_tokens_to_ids("<|end_of_text|>")
        assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True) == len(hf_fast)
    assert HFTokenizer(tokenizer_dir, eot_text="<|begin_of_text|>").eot == ref.token_to_id("<|begin_of_text|>")


@pytest.mark.parametrize("special", ["</s>", "<|endoftext|>"])
def test_eot_other_spellings(tmp_path, tokenizers, special):
    _train(["<unk>", special], post_processor=False).save(str(tmp_path / "tokenizer.json"))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert HFTokenizer(tmp_path).eot == ref.token_to_id(special)


def test_no_eot_is_one_line(tmp_path, tokenizers):
    _train(["<unk>", "<pad>"], post_processor=False).save(str(tmp_path / "tokenizer.json"))
    _one_line(lambda: HFTokenizer(tmp_path), "tokenizer.json", "<pad>", "eot_text")
    _one_line(lambda: HFTokenizer(tmp_path, eot_text="<|eot_id|>"), "<|eot_id|>")


def test_file_errors_are_one_line(tmp_path, tokenizer_dir):
    _one_line(lambda: HFTokenizer(tmp_path / "nope.json"), "nope.json", "does not exist")
    _one_line(lambda: HFTokenizer(tmp_path), str(tmp_path), "no tokenizer.json")
    for name, data in {"empty.json": b"", "obj.json": b"{}", "latin1.json": b"\xff\xfe{",
                       "cut.json": (tokenizer_dir / "tokenizer.json").read_bytes()[:500]}.items():
        (tmp_path / name).write_bytes(data)
        _one_line(lambda: HFTokenizer(tmp_path / name), name, "not a readable tokenizer.json")


def test_decode_refuses_unknown_ids(tokenizer_dir):
    ours = HFTokenizer(tokenizer_dir)
    _one_line(lambda: ours.decode([1, ours.vocab_size]), str(ours.vocab_size), "tokenizer.json")
    _one_line(lambda: ours.decode([-1]), "-1")
