"""The CUDA backend's Llama ops (contract.LLAMA_OPS) and a whole Llama
training step, run on the CPU by cudasim as tests/test_cuda_host.py runs
GPT-2's (read its docstring: NumPy stands in for CuPy's arrays, the real .cu
files are compiled by g++, every launch is checked against the kernel's C
signature, writes out of bounds are caught, threads run in a shuffled order).

The reference is the NumPy backend (llmpy/ops/cpu.py), itself checked
against float64 finite differences (tests/test_llama_ops.py) and
transformers (tests/test_llama_vs_transformers.py): fp32 within 1e-5 per
op and 1e-4 for a training step, bf16 within the GPT-2 tolerances.
"""
from __future__ import annotations

import numpy as np
import pytest

import cudasim
from llmpy.ops import cpu
from test_cuda_host import BF16, cuda, rel_err, steps_match_cpu  # noqa: F401  (cuda: the fixture)

pytestmark = pytest.mark.skipif(cudasim.available() is not None, reason=str(cudasim.available()))
needs_bf16 = pytest.mark.skipif(BF16 is None, reason="bf16 tests need ml_dtypes")
BOTH_MATMULS = pytest.mark.parametrize("cuda", ["cublaslt", "cublas"], indirect=True)
HEADS = pytest.mark.parametrize("NH,NKV", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])


def _r(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _run_both(cuda, name, args, outs, fill=None):
    """op `name` on both backends: args(outputs) -> the arguments; outs: the
    outputs' initial arrays (NaN-poisoned unless given, as `fill`). Returns
    (cpu outputs, cuda outputs)."""
    ref = [o.copy() for o in outs]
    got = [o.copy() for o in outs]
    getattr(cpu, name)(*args(ref))
    getattr(cuda, name)(*args(got))
    return ref, got


def _nan(*shape):
    return np.full(shape, np.nan, np.float32)


def test_rmsnorm_and_swiglu_and_embedding_match_cpu(cuda):
    rng = np.random.default_rng(0)
    N, C, I, V = 26, 24, 20, 40
    x, x2, w = _r(rng, N, C), _r(rng, N, C), 1 + 0.2 * _r(rng, C)
    ids = rng.integers(0, 10, (2, 13))
    ids[0, :5] = 3                                   # a repeated token: its gradients add up
    wte = _r(rng, V, C)
    cases = [
        ("rmsnorm_forward", lambda o: (o[0], o[1], x, w, 1e-5), [_nan(N, C), _nan(N)]),
        ("residual_rmsnorm_forward", lambda o: (o[0], o[1], o[2], x, x2, w, 1e-6), [_nan(N, C), _nan(N, C), _nan(N)]),
        ("swiglu_forward", lambda o: (o[0], _r(np.random.default_rng(1), N, 2 * I)), [_nan(N, I)]),
        ("embedding_forward", lambda o: (o[0], ids, wte), [_nan(2, 13, C)]),
    ]
    for name, args, outs in cases:
        ref, got = _run_both(cuda, name, args, outs)
        for g, c in zip(got, ref):
            assert rel_err(g, c) <= 1e-5, name
    # backward: swiglu overwrites both halves; the embedding scatter-adds, acc or not
    inp, dout = _r(rng, N, 2 * I), _r(rng, N, I)
    ref, got = _run_both(cuda, "swiglu_backward", lambda o: (o[0], dout, inp), [_nan(N, 2 * I)])
    assert rel_err(got[0], ref[0]) <= 1e-5
    dout3 = _r(rng, 2, 13, C)
    for acc in (False, True):
        ref, got = _run_both(cuda, "embedding_backward", lambda o: (o[0], dout3, ids, acc),
                             [_r(rng, V, C) if acc else _nan(V, C)])
        assert rel_err(got[0], ref[0]) <= 1e-5, acc


@pytest.mark.parametrize("path", ["fused", "two kernels"])
@pytest.mark.parametrize("acc", [False, True])
def test_rmsnorm_backward_over_many_chunks(cuda, monkeypatch, acc, path):
    # N = 300 rows: three chunks of LN_ROWS_PER_CHUNK (the last one partial),
    # so the column sums cross chunks; dinp is ADDED to, dweight (+)= by acc.
    # "two kernels": the path for rows wider than the fused kernel's registers
    # (Llama 3.2 3B and up), forced by telling the host the rows are too wide.
    if path == "two kernels":
        monkeypatch.setattr(cuda.rmsnorm, "LN_BWD_COLS_PER_THREAD", 0)
    rng = np.random.default_rng(2)
    N, C = 300, 40
    x, w, dout = _r(rng, N, C), 1 + 0.2 * _r(rng, C), _r(rng, N, C)
    rstd = np.empty(N, np.float32)
    cpu.rmsnorm_forward(np.empty((N, C), np.float32), rstd, x, w, 1e-5)
    dinp0, dw0 = _r(rng, N, C), _r(rng, C)
    scratch = np.empty((2, N, C), np.float32)
    ref, got = _run_both(cuda, "rmsnorm_backward", lambda o: (o[0], o[1], dout, x, w, rstd, scratch, acc),
                         [dinp0, dw0 if acc else _nan(C)])
    assert rel_err(got[0], ref[0]) <= 1e-5 and rel_err(got[1], ref[1]) <= 1e-5


def test_rope_rotates_the_heads_of_qkv_in_place(cuda):
    # the model's call: the NH + NKV heads of each qkv row rotated where they
    # lie (a strided view), v untouched; the backward in place too
    rng = np.random.default_rng(3)
    B, T, NH, NKV, hs = 2, 7, 4, 2, 8
    from llmpy.llama import rope_table
    from llmpy.llama_layout import LlamaConfig
    cos, sin = rope_table(LlamaConfig(n_head=NH, n_kv_head=NKV, n_embd=NH * hs, rope_theta=1e4), 16)
    cos, sin = cos[:T], sin[:T]
    qkv = _r(rng, B, T, (NH + 2 * NKV) * hs)
    for name in ("rope_forward", "rope_backward"):
        ref, got = qkv.copy(), qkv.copy()
        for op, buf in ((getattr(cpu, name), ref), (getattr(cuda, name), got)):
            heads = buf.reshape(B, T, NH + 2 * NKV, hs)[:, :, :NH + NKV]
            op(heads, heads, cos, sin)
        assert rel_err(got, ref) <= 1e-6, name
        assert np.array_equal(got[..., (NH + NKV) * hs:], qkv[..., (NH + NKV) * hs:]), "v was touched"
    # out apart from inp, laid out alike
    inp = qkv.reshape(B, T, NH + 2 * NKV, hs)[:, :, :NH]
    outs = [np.full_like(qkv, np.nan), np.full_like(qkv, np.nan)]
    for op, buf in ((cpu.rope_forward, outs[0]), (cuda.rope_forward, outs[1])):
        op(buf.reshape(B, T, NH + 2 * NKV, hs)[:, :, :NH], inp, cos, sin)
    assert rel_err(outs[1][..., :NH * hs], outs[0][..., :NH * hs]) <= 1e-6
    assert np.all(np.isnan(outs[1][..., NH * hs:])), "wrote outside the rotated heads"
    # a layout the kernel cannot index is refused, not read wrongly
    swapped = inp.transpose(0, 2, 1, 3)                 # (B, NH, T, hs): heads a row apart
    with pytest.raises(ValueError, match="rope"):
        cuda.rope_forward(swapped, swapped, cos[:NH], sin[:NH])


@BOTH_MATMULS
@HEADS
def test_gqa_attention_matches_cpu(cuda, NH, NKV):
    rng = np.random.default_rng(4)
    B, T, hs = 2, 11, 8
    W = (NH + 2 * NKV) * hs
    qkv, dout = _r(rng, B, T, W), _r(rng, B, T, NH * hs)
    ref, got = _run_both(cuda, "gqa_attention_forward", lambda o: (o[0], o[1], qkv, NH, NKV),
                         [_nan(B, T, NH * hs), _nan(B, NH, T, T)])
    for g, c in zip(got, ref):
        assert rel_err(g, c) <= 1e-5
    att = ref[1]
    ref, got = _run_both(cuda, "gqa_attention_backward",
                         lambda o: (o[0], dout, qkv, att, o[1], NH, NKV), [_nan(B, T, W), _nan(B, NH, T, T)])
    assert rel_err(got[0], ref[0]) <= 1e-5
    for part, sl in (("dq", np.s_[..., :NH * hs]), ("dk", np.s_[..., NH * hs:(NH + NKV) * hs]),
                     ("dv", np.s_[..., (NH + NKV) * hs:])):
        assert rel_err(got[0][sl], ref[0][sl]) <= 1e-5, part


def _llama_cfg(NKV=2, tied=True, **kw):
    from llmpy.llama_layout import LlamaConfig
    return LlamaConfig(block_size=32, vocab_size=200, n_layer=2, n_head=4, n_kv_head=NKV, n_embd=32,
                       intermediate_size=40, rope_theta=1e4, tie_word_embeddings=tied, **kw)


@BOTH_MATMULS
@pytest.mark.parametrize("NKV,tied", [(2, True), (4, False), (1, True)], ids=["gqa-tied", "mha-untied", "mqa"])
def test_llama_training_step_matches_cpu(cuda, NKV, tied):
    # two AdamW steps of the whole model on each backend, from the same init,
    # as test_cuda_host holds GPT-2 to (Llama 3.1's rope scaling on)
    from llmpy.llama import Llama
    cfg = _llama_cfg(NKV, tied, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16})
    steps_match_cpu(cuda, lambda device: Llama(cfg, device=device, seed=3))


def test_llama_kv_cache_on_the_cuda_backend(cuda):
    # prefill + one token against the full forward: RoPE at absolute
    # positions and the NKV cached heads, through the CUDA ops
    from llmpy.inference import KVCache, forward_cached
    from llmpy.llama import Llama
    model = Llama(_llama_cfg(2), device="cuda", seed=4)
    ids = np.random.default_rng(6).integers(0, 200, (1, 10))
    full = model.forward(ids)[0].copy()
    cache = KVCache(model, B=1)
    first = forward_cached(model, ids[:, :6], cache, all_logits=True)
    nxt = forward_cached(model, ids[:, 6:7], cache)
    assert rel_err(first, full[:, :6]) <= 1e-5
    assert rel_err(nxt, full[:, 6]) <= 1e-5


# ---------------------------------------------------------------------------- bf16

@needs_bf16
def test_llama_ops_match_cpu_bf16(cuda):
    # each forward op in bf16 against the fp32 op on the same bf16-exact
    # inputs (cuda's flash attention off: our kernels on the probabilities)
    rng = np.random.default_rng(7)
    B, T, NH, NKV, hs, I = 2, 9, 4, 2, 8, 20
    C, N, W = NH * hs, B * T, (NH + 2 * NKV) * hs

    def r(*shape):
        b = rng.standard_normal(shape).astype(np.float32).astype(BF16)
        return b, b.astype(np.float32)

    (x, x32), (x2, x2_32), (w, w32) = r(N, C), r(N, C), r(C)
    (gu, gu32), (qkv, qkv32), (wte, wte32) = r(N, 2 * I), r(B, T, W), r(30, C)
    ids = rng.integers(0, 30, (B, T))
    cases = [  # (op, bf16 arguments, fp32 arguments, the outputs' shapes, which are float32)
        ("rmsnorm_forward", lambda o: (o[0], o[1], x, w, 1e-5), lambda o: (o[0], o[1], x32, w32, 1e-5),
         [(N, C), (N,)], [1]),
        ("residual_rmsnorm_forward", lambda o: (o[0], o[1], o[2], x, x2, w, 1e-5),
         lambda o: (o[0], o[1], o[2], x32, x2_32, w32, 1e-5), [(N, C), (N, C), (N,)], [2]),
        ("swiglu_forward", lambda o: (o[0], gu), lambda o: (o[0], gu32), [(N, I)], []),
        ("embedding_forward", lambda o: (o[0], ids, wte), lambda o: (o[0], ids, wte32), [(B, T, C)], []),
        ("gqa_attention_forward", lambda o: (o[0], o[1], qkv, NH, NKV), lambda o: (o[0], o[1], qkv32, NH, NKV),
         [(B, T, C), (B, NH, T, T)], []),
    ]
    for name, args16, args32, shapes, f32_outs in cases:
        ref = [np.empty(s, np.float32) for s in shapes]
        got = [np.full(s, np.nan, np.float32 if i in f32_outs else BF16) for i, s in enumerate(shapes)]
        getattr(cpu, name)(*args32(ref))
        getattr(cuda, name)(*args16(got))
        for g, c in zip(got, ref):
            assert rel_err(g.astype(np.float32), c) <= 1e-2, name
    cos, sin = np.cos(rng.random((T, hs // 2))).astype(np.float32), np.sin(rng.random((T, hs // 2))).astype(np.float32)
    ref, got = qkv32.copy(), qkv.copy()
    for op, buf in ((cpu.rope_forward, ref), (cuda.rope_forward, got)):
        heads = buf.reshape(B, T, NH + 2 * NKV, hs)[:, :, :NH + NKV]
        op(heads, heads, cos, sin)
    assert rel_err(got.astype(np.float32), ref) <= 1e-2


@needs_bf16
@pytest.mark.parametrize("flash", [True, False], ids=["flash", "our-attention"])
def test_llama_bf16_training_step_tracks_fp32(cuda, monkeypatch, flash):
    # a bf16 mixed-precision Llama step (GQA) on the CUDA backend against the
    # fp32 CPU reference, held to what bf16_checks holds GPT-2 to (loss,
    # gradients, master weights, stochastically rounded bf16 copy); with
    # flash attention (cuDNN's GQA, its stand-in here) and with our kernels
    import bf16_checks
    import fake_cudnn_attention
    from llmpy.llama import Llama
    if not flash:
        monkeypatch.setattr(cuda.attention, "cudnn", None)
    cfg = _llama_cfg(2)
    calls = len(fake_cudnn_attention.calls)
    bf16_checks.step_tracks_fp32(np, make=lambda device, dtype: Llama(cfg, device=device, seed=3, dtype=dtype))
    assert (len(fake_cudnn_attention.calls) > calls) == flash


@needs_bf16
def test_train_cli_fine_tunes_a_llama_directory_on_the_cuda_backend(cuda, tmp_path, capsys):
    # `llmpy train --model DIR --device cuda --dtype bf16` from a saved HF
    # Llama directory, end to end through cudasim (data, validation,
    # checkpoints, resume): the checkpoint is an HF Llama directory of fp32
    # master weights, and the Llama kernels in bf16 did the work
    import json

    from safetensors.numpy import load_file

    import fake_cudnn_attention
    from llmpy.cli import main
    from llmpy.data.prepare import prepare_pydoc
    from llmpy.formats import hf_llama
    from llmpy.llama import Llama
    from llmpy.llama_layout import LlamaConfig
    cfg = LlamaConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=48, rope_theta=1e4)
    start = Llama(cfg, seed=5)
    hf_llama.save(tmp_path / "base", cfg, start.state_dict())
    info = prepare_pydoc(tmp_path / "pydoc")
    args = ["train", "--device", "cuda", "--dtype", "bf16", "--data", str(info["train"]),
            "--val-data", str(info["val"]), "--model", str(tmp_path / "base"), "-B", "2", "-T", "16",
            "--lr", "3e-3", "--val-every", "2", "--val-steps", "1", "--sample-every", "0",
            "--checkpoint-every", "2", "--steps", "4", "--no-progress", "--out", str(tmp_path / "run")]
    calls = len(fake_cudnn_attention.calls)
    assert main(args + ["--stop-at", "2"]) == 0
    assert main(args + ["--resume"]) == 0
    assert ("rmsnorm.cu", True) in cuda.runtime._modules and ("rope.cu", True) in cuda.runtime._modules
    assert "backward" in fake_cudnn_attention.calls[calls:]        # GQA through the flash route
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[-1]
    assert all(np.isfinite(r["loss"]) for r in records)
    sd = load_file(str(tmp_path / "run" / "ckpt_00000004" / "model.safetensors"))
    assert all(t.dtype == np.float32 for t in sd.values())
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    moved = sd["model.layers.0.mlp.down_proj.weight"] - start.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert np.abs(moved).max() > 0                                 # it trained
