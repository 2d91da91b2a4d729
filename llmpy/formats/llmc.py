"""llm.c's file formats: model weights (.bin), the tokenizer file, token shards.

Model file (little-endian throughout):

    header   256 x int32: [20240326, version, max_seq_len, vocab_size,
                           num_layers, num_heads, channels, padded_vocab_size,
                           0, 0, ...]
             version 3: the tensors are float32; version 5: bfloat16
    tensors  wte (Vp, C), wpe (maxT, C), ln1w (L, C), ln1b (L, C),
             qkvw (L, 3C, C), qkvb (L, 3C), attprojw (L, C, C), attprojb (L, C),
             ln2w (L, C), ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C),
             fcprojw (L, C, 4C), fcprojb (L, C), lnfw (C), lnfb (C)
             one after another, each row-major, nothing in between.

That is exactly llmpy's flat parameter buffer (gpt2_layout.parameter_shapes), so a
model file is `header + params.flat`. The only freedom is Vp: llm.c pads the
vocabulary to a multiple of 128 as llmpy does, but a file with another padding
still reads (its first vocab_size rows of wte are the real ones).

Tokenizer file:

    header   256 x uint32: [20240328, version, vocab_size, eot_token, 0, ...]
             (version 1 has no eot field; GPT-2's is 50256)
    tokens   vocab_size times: one uint8 length n (1..255), then n bytes.

Token shard (what `llmpy prepare` writes and data/shards.py reads), in
the two kinds of llm.c's dev/data/data_common.py:

    header   256 x int32: [magic, version, ntok, 0, ...]
    tokens   ntok token ids: uint16 for magic 20240520 version 1 (GPT-2),
             uint32 for magic 20240801 version 7 (Llama 3)

bfloat16 is the top half of a float32. Writing rounds to nearest, ties to
even (as PyTorch and CUDA do); reading shifts the 16 bits back up, exactly.

Readers trust nothing: the header is checked field by field and the file size
against what the header implies *before* anything is allocated, so a corrupt
or hostile file fails with one line naming it, never with a huge allocation or
a NumPy traceback.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..errors import LlmpyError
from ..fileio import atomic_file
from ..gpt2_layout import parameter_shapes
from ..tensors import FlatTensors

MODEL_MAGIC = 20240326
VERSION_FP32 = 3
VERSION_BF16 = 5
TOKENIZER_MAGIC = 20240328
SHARD_MAGIC = 20240520          # GPT-2 token shard: uint16 ids
SHARD_VERSION = 1
LLAMA3_SHARD_MAGIC = 20240801   # Llama 3 token shard: uint32 ids
LLAMA3_SHARD_VERSION = 7
# token dtype -> (magic, version) of its shard header, as llm.c's data_common.py
SHARD_KINDS = {np.dtype("<u2"): (SHARD_MAGIC, SHARD_VERSION),
               np.dtype("<u4"): (LLAMA3_SHARD_MAGIC, LLAMA3_SHARD_VERSION)}
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
GPT2_EOT = 50256
# Largest sane dimension in a header. Not a real limit of the format: it keeps
# every product of header fields far away from overflow and absurdity.
_MAX_DIM = 1 << 24

_CHUNK = 1 << 22   # floats converted to/from bf16 at a time (bounds extra memory)


# ---------------------------------------------------------------------- bfloat16


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even.

    Adding 0x7FFF plus the lowest kept bit to the float's bits and cutting the
    low 16 bits rounds to nearest with ties to even; an overflow of the
    mantissa carries into the exponent, which is the right answer (up to inf).
    NaNs are kept NaN (quiet) rather than rounded, which could turn them into inf.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_bits_to_fp32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------- model files


def model_header(cfg: GPTConfig, version: int, padded_vocab_size: int | None = None) -> np.ndarray:
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:8] = [MODEL_MAGIC, version, cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
             padded_vocab_size or cfg.padded_vocab_size]
    return h


def write_model(path, cfg: GPTConfig, flat: np.ndarray, dtype: str = "fp32"):
    """Write an llm.c model file from llmpy's flat parameter buffer (host, float32)."""
    if dtype not in ("fp32", "bf16"):
        raise LlmpyError(f"llm.c model dtype must be fp32 or bf16, got {dtype!r}")
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    with atomic_file(path) as f:
        f.write(model_header(cfg, VERSION_FP32 if dtype == "fp32" else VERSION_BF16).tobytes())
        for i in range(0, flat.size, _CHUNK):
            part = flat[i:i + _CHUNK]
            f.write((part.astype("<f4") if dtype == "fp32" else fp32_to_bf16_bits(part).astype("<u2")).tobytes())


def _read_header(f, path, size: int, what: str, dtype) -> np.ndarray:
    if size < HEADER_BYTES:
        raise LlmpyError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte {what} header (truncated?)")
    return np.frombuffer(f.read(HEADER_BYTES), dtype=dtype)


def read_model_header(path) -> tuple[GPTConfig, int, int]:
    """(config, version, padded_vocab_size) of an llm.c model file, all checked
    against each other and against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            h = _read_header(f, path, size, "llm.c model", "<i4")
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read ({e.strerror or e})") from None
    magic, version, maxT, V, L, NH, C, Vp = (int(v) for v in h[:8])
    if magic != MODEL_MAGIC:
        raise LlmpyError(f"{path}: not an llm.c model file (magic {magic}, expected {MODEL_MAGIC})")
    if version not in (VERSION_FP32, VERSION_BF16):
        raise LlmpyError(f"{path}: llm.c model version {version} is not supported "
                         f"({VERSION_FP32}: fp32, {VERSION_BF16}: bf16)")
    for name, v in (("max_seq_len", maxT), ("vocab_size", V), ("num_layers", L), ("num_heads", NH),
                    ("channels", C), ("padded_vocab_size", Vp)):
        if not 0 < v <= _MAX_DIM:
            raise LlmpyError(f"{path}: header field {name} = {v} is not a plausible size (corrupt header?)")
    if Vp < V:
        raise LlmpyError(f"{path}: padded_vocab_size {Vp} is smaller than vocab_size {V} (corrupt header?)")
    try:
        cfg = GPTConfig(block_size=maxT, vocab_size=V, n_layer=L, n_head=NH, n_embd=C)
    except LlmpyError as e:
        raise LlmpyError(f"{path}: {e}") from None
    n = Vp * C + _per_model_without_wte(cfg)
    itemsize = 4 if version == VERSION_FP32 else 2
    expected = HEADER_BYTES + n * itemsize
    if size != expected:
        raise LlmpyError(f"{path}: {size} bytes, but its header describes {expected} bytes "
                         f"({n:,} {'fp32' if itemsize == 4 else 'bf16'} parameters; truncated or corrupt)")
    return cfg, version, Vp


def _per_model_without_wte(cfg: GPTConfig) -> int:
    return sum(int(np.prod(s, dtype=object)) for name, s in parameter_shapes(cfg) if name != "wte")


def read_model(path) -> tuple[GPTConfig, np.ndarray]:
    """(config, flat float32 parameters in llmpy's layout) of an llm.c model file.
    bf16 files are upcast to float32 exactly."""
    path = Path(path)
    cfg, version, Vp = read_model_header(path)
    n = Vp * cfg.n_embd + _per_model_without_wte(cfg)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        if version == VERSION_FP32:
            data = np.fromfile(f, dtype="<f4", count=n).astype(np.float32, copy=False)
        else:
            data = np.empty(n, dtype=np.float32)
            for i in range(0, n, _CHUNK):
                k = min(_CHUNK, n - i)
                data[i:i + k] = bf16_bits_to_fp32(np.fromfile(f, dtype="<u2", count=k))
    if data.size != n:   # the file shrank between the size check and the read
        raise LlmpyError(f"{path}: ended early while reading the weights (truncated?)")
    if Vp == cfg.padded_vocab_size:
        return cfg, data
    # another padding: keep the vocab_size real rows of wte, re-pad to llmpy's Vp
    C = cfg.n_embd
    out = FlatTensors(parameter_shapes(cfg), np)
    V = cfg.vocab_size
    out.views["wte"][:V] = data[:V * C].reshape(V, C)
    out.flat[out.offsets["wpe"]:] = data[Vp * C:]
    return cfg, out.flat


# ---------------------------------------------------------------------- tokenizer files


def write_tokenizer(path, tokens: list[bytes], eot: int = GPT2_EOT):
    """Write llm.c's tokenizer file (version 2) for a list of token byte strings."""
    if not 0 <= eot < len(tokens):
        raise LlmpyError(f"tokenizer file {path}: eot token {eot} is outside the vocabulary [0, {len(tokens)})")
    for i, t in enumerate(tokens):
        if not 1 <= len(t) <= 255:
            raise LlmpyError(f"tokenizer file {path}: token {i} is {len(t)} bytes; llm.c stores 1..255")
    h = np.zeros(HEADER_INTS, dtype="<u4")
    h[:4] = [TOKENIZER_MAGIC, 2, len(tokens), eot]
    body = b"".join(bytes([len(t)]) + bytes(t) for t in tokens)
    with atomic_file(path) as f:
        f.write(h.tobytes() + body)


def write_tokenizer_from(path, tokenizer):
    """llm.c's tokenizer file for an llmpy.Tokenizer (GPT-2's 50257 tokens)."""
    write_tokenizer(path, [tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)], tokenizer.eot)


def read_tokenizer(path) -> tuple[list[bytes], int]:
    """(the bytes of every token, the eot token id) of an llm.c tokenizer file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            h = _read_header(f, path, size, "llm.c tokenizer", "<u4")
            magic, version, n, eot = (int(v) for v in h[:4])
            if magic != TOKENIZER_MAGIC:
                raise LlmpyError(f"{path}: not an llm.c tokenizer file (magic {magic}, expected {TOKENIZER_MAGIC})")
            if version not in (1, 2):
                raise LlmpyError(f"{path}: llm.c tokenizer version {version} is not supported (1 or 2)")
            if version == 1:
                eot = GPT2_EOT
            # every token takes at least 2 bytes (length + one byte): a size
            # check bounds n before anything of size n is allocated
            if n == 0 or HEADER_BYTES + 2 * n > size:
                raise LlmpyError(f"{path}: header says {n} tokens, which cannot fit in {size} bytes "
                                 "(truncated or corrupt)")
            if not 0 <= eot < n:
                raise LlmpyError(f"{path}: eot token {eot} is outside the vocabulary [0, {n})")
            body = f.read()
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read ({e.strerror or e})") from None
    tokens, pos = [], 0
    for i in range(n):
        if pos >= len(body):
            raise LlmpyError(f"{path}: ends inside token {i} of {n} (truncated)")
        k = body[pos]
        if k == 0:
            raise LlmpyError(f"{path}: token {i} has length 0 (corrupt)")
        if pos + 1 + k > len(body):
            raise LlmpyError(f"{path}: ends inside token {i} of {n} (truncated)")
        tokens.append(body[pos + 1:pos + 1 + k])
        pos += 1 + k
    if pos != len(body):
        raise LlmpyError(f"{path}: {len(body) - pos} stray bytes after the last of {n} tokens (corrupt)")
    return tokens, eot


# ---------------------------------------------------------------------- token shards


def shard_header(ntok: int, dtype=np.uint16) -> bytes:
    """The header of a token shard holding ntok tokens of `dtype` (uint16 or uint32)."""
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:3] = (*SHARD_KINDS[np.dtype(dtype).newbyteorder("<")], ntok)
    return h.tobytes()


def read_shard_header(path: Path, fix: str) -> tuple[int, np.dtype]:
    """(token count, token dtype) of a shard, its header checked field by field
    and against the file's size; every error ends with `fix` (how to remake it)."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise LlmpyError(f"token shard {path} is {size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header (truncated?); {fix}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, ntok = (int(v) for v in header[:3])
    kinds = {m: (v, dt) for dt, (m, v) in SHARD_KINDS.items()}
    if magic not in kinds:
        raise LlmpyError(f"{path} is not a token shard (magic {magic}, expected {SHARD_MAGIC} "
                         f"or {LLAMA3_SHARD_MAGIC}); {fix}")
    expected_version, dtype = kinds[magic]
    if version != expected_version:
        raise LlmpyError(f"token shard {path} has version {version}, expected {expected_version} "
                         f"for magic {magic}; {fix}")
    expected = HEADER_BYTES + dtype.itemsize * ntok
    if ntok < 0 or size != expected:
        raise LlmpyError(f"token shard {path} is {size} bytes but its header says {ntok} tokens "
                         f"({expected} bytes; truncated or corrupt); {fix}")
    return ntok, dtype
