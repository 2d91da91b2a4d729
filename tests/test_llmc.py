"""llm.c model and tokenizer files, and `llmpy convert`.

The reference for the formats is the spec (DESIGN.md section 4), written out
again here with struct and NumPy, independently of llmpy's own writer and
reader: a file this test writes must read back into the right tensors, and a
file llmpy writes must parse into the right header and tensors.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

import llmpy
from llmpy.cli import main
from llmpy.errors import LlmpyError
from llmpy.formats.llmc import bf16_bits_to_fp32, fp32_to_bf16_bits, read_tokenizer, write_tokenizer, write_tokenizer_from


def spec_shapes(maxT, V, Vp, L, C):
    """The tensor order and shapes of an llm.c model file, from the spec."""
    return [("wte", (Vp, C)), ("wpe", (maxT, C)), ("ln1w", (L, C)), ("ln1b", (L, C)),
            ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)),
            ("ln2w", (L, C)), ("ln2b", (L, C)), ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
            ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)), ("lnfw", (C,)), ("lnfb", (C,))]


def reference_bf16(x):
    """Round-to-nearest-even fp32 -> bf16 bits, one value at a time in Python."""
    out = []
    for v in np.asarray(x, dtype=np.float32).ravel():
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        if v != v:
            out.append((bits >> 16) | 0x40)
            continue
        upper, lower = bits >> 16, bits & 0xFFFF
        if lower > 0x8000 or (lower == 0x8000 and upper & 1):
            upper += 1
        out.append(upper)
    return np.array(out, dtype=np.uint16)


def write_reference_model(path, maxT, V, Vp, L, NH, C, version, rng):
    """An llm.c model file written from the spec; returns the tensors (fp32 values it holds)."""
    tensors = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240326, version, maxT, V, L, NH, C, Vp, *([0] * 248)))
        for name, shape in spec_shapes(maxT, V, Vp, L, C):
            t = rng.standard_normal(shape).astype(np.float32)
            if version == 3:
                f.write(t.astype("<f4").tobytes())
            else:
                bits = reference_bf16(t)
                f.write(bits.astype("<u2").tobytes())
                t = (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            tensors[name] = t
    return tensors


def parse_reference_model(path):
    """Header fields and tensors of an llm.c model file, parsed from the spec."""
    data = open(path, "rb").read()
    h = struct.unpack("<256i", data[:1024])
    magic, version, maxT, V, L, NH, C, Vp = h[:8]
    assert magic == 20240326 and version in (3, 5) and h[8:] == (0,) * 248
    pos, tensors = 1024, {}
    for name, shape in spec_shapes(maxT, V, Vp, L, C):
        n = int(np.prod(shape))
        if version == 3:
            t = np.frombuffer(data, "<f4", n, pos)
            pos += 4 * n
        else:
            t = (np.frombuffer(data, "<u2", n, pos).astype(np.uint32) << 16).view(np.float32)
            pos += 2 * n
        tensors[name] = t.reshape(shape)
    assert pos == len(data)
    return (magic, version, maxT, V, L, NH, C, Vp), tensors


SHAPES = [(16, 100, 128, 2, 2, 32), (8, 128, 128, 1, 1, 8), (24, 65, 192, 3, 4, 48), (8, 100, 104, 1, 2, 16)]   # maxT V Vp L NH C


@pytest.mark.parametrize("version", [3, 5])
@pytest.mark.parametrize("maxT, V, Vp, L, NH, C", SHAPES)
def test_reads_a_file_written_from_the_spec(tmp_path, maxT, V, Vp, L, NH, C, version):
    ref = write_reference_model(tmp_path / "m.bin", maxT, V, Vp, L, NH, C, version, np.random.default_rng(0))
    model = llmpy.load(tmp_path / "m.bin")
    cfg = model.config
    assert (cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (maxT, V, L, NH, C)
    for name, t in ref.items():
        ours = model.params.views[name]
        if name == "wte" and Vp != ours.shape[0]:
            # llmpy pads to a multiple of 128: the real rows must match, the new padding be zero
            np.testing.assert_array_equal(ours[:V], t[:V])
            assert not ours[V:].any()
        else:
            np.testing.assert_array_equal(ours, t)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_written_file_parses_by_the_spec(tmp_path, dtype):
    cfg = llmpy.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    model = llmpy.GPT(cfg, seed=3)
    model.params.flat[:] = np.random.default_rng(1).standard_normal(model.params.flat.size)
    model.save(tmp_path / "m.bin", format="llmc") if dtype == "fp32" else \
        llmpy.formats.save_model(model, tmp_path / "m.bin", format="llmc", dtype="bf16")
    header, tensors = parse_reference_model(tmp_path / "m.bin")
    assert header == (20240326, 3 if dtype == "fp32" else 5, 16, 100, 2, 2, 32, 128)
    for name, t in tensors.items():
        want = model.params.views[name]
        if dtype == "bf16":
            want = (reference_bf16(want).astype(np.uint32) << 16).view(np.float32).reshape(want.shape)
        np.testing.assert_array_equal(t, want)


def test_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000),
        # exact ties: halfway between two bf16 values, with even and odd upper halves
        (np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF, 0x00008000, 0x00018000],
                  dtype=np.uint32)).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45], dtype=np.float32),
    ])
    got = fp32_to_bf16_bits(x)
    np.testing.assert_array_equal(got, reference_bf16(x))
    back = bf16_bits_to_fp32(got)
    assert np.isnan(back[np.isnan(x)]).all()
    torch = pytest.importorskip("torch")
    finite = np.isfinite(x)
    t = torch.from_numpy(x[finite]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got[finite], t)


def test_other_padding_is_repadded(tmp_path):
    ref = write_reference_model(tmp_path / "m.bin", 8, 100, 104, 1, 2, 16, 3, np.random.default_rng(2))
    cfg, flat = llmpy.formats.llmc.read_model(tmp_path / "m.bin")
    model = llmpy.load(tmp_path / "m.bin")
    assert cfg == model.config and flat.size == model.params.flat.size
    assert model.params.views["wte"].shape == (128, 16)
    np.testing.assert_array_equal(model.params.views["wte"][:100], ref["wte"][:100])
    np.testing.assert_array_equal(model.params.views["lnfb"], ref["lnfb"])


# ---------------------------------------------------------------------- HF <-> llm.c


def test_hf_to_llmc_to_hf_is_bit_exact(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    hcfg = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hm = transformers.GPT2LMHeadModel(hcfg).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.add_(0.1 * torch.randn_like(p))     # biases and layernorms away from their defaults
    hm.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.bin"), "--to", "llmc"]) == 0
    assert main(["convert", str(tmp_path / "m.bin"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    for k, v in b.items():
        np.testing.assert_array_equal(v, a[k], err_msg=k)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2").eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        want, got = hm(ids).logits, back(ids).logits
    assert torch.equal(want, got)
    logits, _ = llmpy.load(tmp_path / "m.bin").forward(ids.numpy())
    assert np.linalg.norm(logits - want.numpy()) / np.linalg.norm(want.numpy()) < 1e-5
    # bf16 from the same model: every weight within bf16's half-ulp of the original
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "b.bin"), "--to", "llmc", "--dtype", "bf16"]) == 0
    assert (tmp_path / "b.bin").stat().st_size == 1024 + ((tmp_path / "m.bin").stat().st_size - 1024) // 2
    m32, m16 = llmpy.load(tmp_path / "m.bin"), llmpy.load(tmp_path / "b.bin")
    np.testing.assert_allclose(m16.params.flat, m32.params.flat, rtol=2 ** -8, atol=0)


def test_convert_of_a_bad_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.bin").write_bytes(b"\0" * 2000)
    assert main(["convert", str(tmp_path / "bad.bin"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.bin" in err[0] and "magic" in err[0]


# ---------------------------------------------------------------------- tokenizer file


def test_tokenizer_file_round_trips_and_matches_tokenizer(tmp_path):
    tok = llmpy.Tokenizer()
    write_tokenizer_from(tmp_path / "tok.bin", tok)
    tokens, eot = read_tokenizer(tmp_path / "tok.bin")
    assert eot == tok.eot == 50256 and len(tokens) == tok.n_vocab
    ids = tok.encode("Hello, world! Ünïcödé and  spaces\n\ttabs")
    assert b"".join(tokens[i] for i in ids) == tok.decode_bytes(ids)
    assert all(tokens[i] == tok.token_bytes(i) for i in range(0, tok.n_vocab, 97))
    # the same bytes as an independent writer produces from the spec
    ref = struct.pack("<256I", 20240328, 2, tok.n_vocab, 50256, *([0] * 252))
    ref += b"".join(bytes([len(t)]) + t for t in (tok.token_bytes(i) for i in range(tok.n_vocab)))
    assert (tmp_path / "tok.bin").read_bytes() == ref


def test_convert_writes_the_tokenizer_file_too(tmp_path):
    llmpy.GPT(llmpy.GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)).save(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.bin"), "--to", "llmc",
                 "--tokenizer", str(tmp_path / "tok.bin")]) == 0
    tokens, eot = read_tokenizer(tmp_path / "tok.bin")
    assert len(tokens) == 50257 and eot == 50256 and tokens[15496] == b"Hello"


def test_reads_a_version_1_tokenizer_file(tmp_path):
    toks = [b"a", b"bc", bytes(range(200, 255)), b"<|endoftext|>"]
    data = struct.pack("<256I", 20240328, 1, len(toks), *([0] * 253))
    data += b"".join(bytes([len(t)]) + t for t in toks)
    (tmp_path / "t.bin").write_bytes(data)
    with pytest.raises(LlmpyError, match="eot token 50256"):
        read_tokenizer(tmp_path / "t.bin")   # version 1 implies GPT-2's eot, outside this tiny vocab
    write_tokenizer(tmp_path / "t2.bin", toks, eot=3)
    assert read_tokenizer(tmp_path / "t2.bin") == (toks, 3)
