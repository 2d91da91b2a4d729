"""Hostile input: every reader, fed damaged files, either succeeds or raises
LlmpyError -- never another exception, and never allocates memory for a size
that only a (corrupt) header claims.

Each reader starts from a valid file, which hypothesis then damages: cut
short, bits flipped, header words overwritten with random or huge numbers,
garbage appended. Memory is watched with tracemalloc (NumPy reports its
buffers to it): a reader may use a bounded multiple of the file's size, no more.
"""
from __future__ import annotations

import json
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmpy
from llmpy import checkpoint as ckpt
from llmpy import formats
from llmpy.formats import hf, llmc
from llmpy.data.shards import read_shard, write_shard
from llmpy.errors import LlmpyError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
CFG = llmpy.GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=8)

# Numbers a corrupt header might hold: small, negative, off by one, huge.
header_words = st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1),
                         st.sampled_from([0, 1, -1, 2, 3, 5, 7, 8, 40, 128, 255, 256, 2 ** 16, 2 ** 24,
                                          2 ** 30, 2 ** 31 - 1, -2 ** 31]))


@st.composite
def damaged(draw, original: bytes, header_ints: int = 8):
    """A damaged copy of `original`."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "word", "append", "word"]))
        if kind == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "word" and len(data) >= 4 * header_ints:
            i = draw(st.integers(0, header_ints - 1))
            data[4 * i:4 * i + 4] = struct.pack("<i", draw(header_words))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def only_llmpy_errors(read, path, data: bytes):
    """Call read(path) on `data`; success or LlmpyError only, memory bounded."""
    path.write_bytes(data)
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        read(path)
    except LlmpyError as e:
        msg = str(e)
        assert "\n" not in msg and msg, repr(msg)
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak < 16 * len(data) + (4 << 20), f"{peak} bytes allocated for a {len(data)}-byte file"


@pytest.fixture(scope="module", autouse=True)
def watch_memory():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def model():
    m = llmpy.GPT(CFG, seed=0)
    return m


# ---------------------------------------------------------------------- readers


def test_fuzz_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    write_shard(d / "ok.bin", np.arange(500) % 50257)
    original = (d / "ok.bin").read_bytes()

    def read(path):
        tokens = read_shard(path)
        np.asarray(tokens[:10])

    @SETTINGS
    @given(damaged(original, header_ints=3))
    def run(data):
        only_llmpy_errors(read, d / "x.bin", data)
    run()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fuzz_llmc_model(tmp_path_factory, dtype):
    d = tmp_path_factory.mktemp("llmc")
    formats.save_model(model(), d / "ok.bin", format="llmc", dtype=dtype)
    original = (d / "ok.bin").read_bytes()

    @SETTINGS
    @given(damaged(original))
    def run(data):
        only_llmpy_errors(llmpy.load, d / "x.bin", data)
    run()


def test_fuzz_llmc_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    llmc.write_tokenizer(d / "ok.bin", [bytes([i]) * (1 + i % 5) for i in range(256)], eot=255)
    original = (d / "ok.bin").read_bytes()

    @SETTINGS
    @given(damaged(original, header_ints=4))
    def run(data):
        only_llmpy_errors(llmc.read_tokenizer, d / "x.bin", data)
    run()


def bf16_safetensors(path):
    """The same model's weights as a bfloat16 safetensors file (written by the format)."""
    from safetensors.numpy import load_file
    sd = load_file(str(path))
    header, blobs, pos = {}, [], 0
    for name, t in sd.items():
        b = llmc.fp32_to_bf16_bits(t).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + b"".join(blobs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fuzz_safetensors_directory(tmp_path_factory, dtype):
    d = tmp_path_factory.mktemp("hf")
    model().save(d / "ok")
    original = (d / "ok" / "model.safetensors").read_bytes()
    if dtype == "bf16":
        original = bf16_safetensors(d / "ok" / "model.safetensors")
        (d / "ok" / "model.safetensors").write_bytes(original)
        llmpy.load(d / "ok")          # the unharmed file loads
    shutil.copytree(d / "ok", d / "x")

    @SETTINGS
    @given(damaged(original, header_ints=2))
    def run(data):
        only_llmpy_errors(lambda p: llmpy.load(p.parent), d / "x" / "model.safetensors", data)
    run()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)


def test_fuzz_config_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    model().save(d / "x")
    good = json.loads((d / "x" / "config.json").read_text())
    fields = ["n_positions", "vocab_size", "n_layer", "n_head", "n_embd", "n_inner", "model_type",
              "activation_function"]

    @SETTINGS
    @given(st.dictionaries(st.sampled_from(fields), json_values | header_words, max_size=3),
           st.sampled_from(["json", "bytes"]), st.binary(max_size=40))
    def run(changes, how, junk):
        data = json.dumps(dict(good, **changes)).encode() if how == "json" else json.dumps(good).encode()[:20] + junk
        only_llmpy_errors(lambda p: llmpy.load(p.parent), d / "x" / "config.json", data)
    run()


def test_fuzz_training_checkpoint(tmp_path_factory):
    """Damage any file of a training checkpoint (then refresh the manifest, as
    an attacker or a buggy tool could): loading it is success or LlmpyError."""
    from llmpy.optim import AdamW
    d = tmp_path_factory.mktemp("ckpt")
    m = model()
    opt = AdamW(m)
    state = {"loader": {"epoch": 0, "position": 3}}
    path = ckpt.save_training_checkpoint(d, 7, m, opt, state)
    originals = {p.name: p.read_bytes() for p in path.iterdir()}

    def load(_):
        problem = ckpt.verify_checkpoint(path)
        assert problem is None or isinstance(problem, str)
        ckpt.load_training_checkpoint(path, llmpy.GPT(CFG, init=False), AdamW(llmpy.GPT(CFG, init=False)))

    @SETTINGS
    @given(st.sampled_from(sorted(originals)), st.data())
    def run(name, data):
        for n, b in originals.items():
            (path / n).write_bytes(b)
        only_llmpy_errors(load, path / name, data.draw(damaged(originals[name], header_ints=2)))
    run()


def test_fuzz_train_state_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")

    @SETTINGS
    @given(st.dictionaries(st.sampled_from(["step", "loader"]),
                           json_values | st.fixed_dictionaries({"epoch": json_values, "position": json_values})))
    def run(state):
        only_llmpy_errors(ckpt.read_train_state, d / "train_state.json", json.dumps(state).encode())
    run()


def test_fuzz_bf16_safetensors_reader_directly(tmp_path_factory):
    """llmpy's own safetensors reader (used for bfloat16 files), without the
    library's checks in front of it."""
    d = tmp_path_factory.mktemp("bf16")
    model().save(d / "ok")
    original = bf16_safetensors(d / "ok" / "model.safetensors")

    @SETTINGS
    @given(damaged(original, header_ints=2))
    def run(data):
        only_llmpy_errors(hf._read_safetensors_by_format, d / "x.safetensors", data)
    run()
