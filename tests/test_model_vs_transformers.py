"""llmpy.GPT against Hugging Face transformers' GPT2LMHeadModel (the PyTorch reference).

Both models get the same weights (llmpy's init, with every layernorm parameter
and bias moved away from its default so that a missing or swapped one shows),
and are compared in float32: logits, loss, every parameter's gradient, ten
AdamW steps, gradient accumulation, and checkpoints written by one and read by
the other. Also the learning-rate schedules and gradient clipping of
llmpy.optim against torch's. Tolerances: relative L2 error, DESIGN.md section 3.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

import llmpy  # noqa: E402
from llmpy.errors import LlmpyError  # noqa: E402
from llmpy.optim import AdamW, clip_scale, global_norm, lr_at  # noqa: E402

VOCAB = 100          # padded to 128 in llmpy: the padded rows must stay invisible
BLOCK = 16
STEP_RTOL = 1e-4     # whole forward/backward/step vs PyTorch
LN_NAMES = ("ln1w", "ln1b", "ln2w", "ln2b", "lnfw", "lnfb")
BIAS_NAMES = ("qkvb", "attprojb", "fcb", "fcprojb")
# HF names of the 2-D weight matrices (decayed by AdamW); everything else is not
DECAYED_SUFFIXES = ("wte.weight", "wpe.weight", "c_attn.weight", "c_proj.weight", "c_fc.weight")


# ---------------------------------------------------------------------------- helpers

def rel_err(a, b):
    """Relative L2 error of a against the reference b."""
    a = np.asarray(a.detach() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = np.linalg.norm(b)
    assert denom > 0, "reference is all zeros: the check would be meaningless"
    return float(np.linalg.norm(a - b) / denom)


def make_llmpy(n_layer=2, n_head=4, n_embd=64, seed=0, vocab=VOCAB, block=BLOCK):
    """A tiny llmpy GPT with every layernorm weight/bias and every bias perturbed,
    and weights scaled up from GPT-2's 0.02 init so that activations are O(1):
    attention is far from uniform, GELU works in its curved region and the
    softmax is peaked, so a subtly wrong op cannot hide behind small numbers."""
    cfg = llmpy.GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = llmpy.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    C = n_embd
    for name, std in (("wte", 0.3), ("wpe", 0.3), ("qkvw", 1.2 / math.sqrt(C)), ("attprojw", 0.5 / math.sqrt(C)),
                      ("fcw", 1.5 / math.sqrt(C)), ("fcprojw", 0.5 / math.sqrt(4 * C))):
        v = model.params.views[name]
        if name == "wte":
            v = v[:vocab]           # the padded rows stay zero
        v[...] = std * rng.standard_normal(v.shape, dtype=np.float32)
    for name in LN_NAMES:
        v = model.params.views[name]
        base = 1.0 if name.endswith("w") else 0.0
        v[...] = base + 0.2 * rng.standard_normal(v.shape, dtype=np.float32)
    for name in BIAS_NAMES:
        v = model.params.views[name]
        v[...] = 0.05 * rng.standard_normal(v.shape, dtype=np.float32)
    return model


def hf_config(cfg):
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)


def make_hf(model):
    """GPT2LMHeadModel with llmpy's weights; asserts only the tied lm_head is missing."""
    hm = transformers.GPT2LMHeadModel(hf_config(model.config))
    res = hm.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=False)
    assert set(res.missing_keys) == {"lm_head.weight"}, res.missing_keys
    assert not res.unexpected_keys, res.unexpected_keys
    assert hm.lm_head.weight is hm.transformer.wte.weight, "LM head must stay tied to wte"
    hm.eval()   # no dropout anyway (all pdrop = 0)
    return hm


def batch(rng, B, T, vocab=VOCAB):
    ids = rng.integers(0, vocab, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, vocab, size=(B, T), dtype=np.int64)
    return ids, targets


def hf_loss(hm, ids, targets):
    logits = hm(torch.from_numpy(ids)).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    return logits, loss


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.fixture(scope="module")
def pair():
    """(llmpy model, HF model with the same weights): n_layer=2, n_head=4, n_embd=64."""
    model = make_llmpy(seed=3)
    return model, make_hf(model)


# ---------------------------------------------------------------------------- forward / backward

def _compare_forward_backward(model, hm, ids, targets):
    logits, loss = model.forward(ids, targets)
    assert logits.dtype == np.float32
    logits = logits.copy()                       # backward() turns the buffer into dlogits
    model.zero_grad()
    model.backward()
    hm.zero_grad()
    hlogits, hloss = hf_loss(hm, ids, targets)
    hloss.backward()

    assert rel_err(logits, hlogits) < STEP_RTOL
    assert abs(loss - hloss.item()) / abs(hloss.item()) < STEP_RTOL

    grads = model.grads_dict()
    hf_params = dict(hm.named_parameters())
    assert set(grads) == set(hf_params) - {"lm_head.weight"}
    assert "lm_head.weight" not in hf_params or hf_params["lm_head.weight"] is hf_params["transformer.wte.weight"]
    errs = {}
    for name, g in grads.items():
        p = hf_params[name]
        assert p.grad is not None, name
        assert g.shape == tuple(p.grad.shape), name
        assert np.all(np.isfinite(g)), name
        errs[name] = rel_err(g, p.grad)
    bad = {k: v for k, v in errs.items() if not v < STEP_RTOL}
    assert not bad, f"gradients off: {bad}"
    return errs


@pytest.mark.parametrize("T", [BLOCK, 7])
def test_logits_loss_and_grads_match_transformers(pair, rng, T):
    """Logits, mean loss and every parameter gradient (B=3; T = block_size and
    shorter) agree with GPT2LMHeadModel within 1e-4; grads_dict() has exactly
    HF's parameter names (the tied lm_head aside)."""
    model, hm = pair
    ids, targets = batch(rng, 3, T)
    _compare_forward_backward(model, hm, ids, targets)
    # the padded vocabulary rows of wte never get a gradient
    assert not np.any(model.grads.wte[model.config.vocab_size:])


def test_forward_without_targets_matches_transformers(pair, rng):
    """forward(ids) without targets returns the same logits and no loss."""
    model, hm = pair
    ids, _ = batch(rng, 2, 5)
    logits, loss = model.forward(ids)
    assert loss is None
    with torch.no_grad():
        ref = hm(torch.from_numpy(ids)).logits
    assert rel_err(logits, ref) < STEP_RTOL


@pytest.mark.parametrize("n_layer,n_head,n_embd", [(3, 1, 32), (1, 2, 48)])
def test_other_shapes_match_transformers(rng, n_layer, n_head, n_embd):
    """Other model shapes (one head; one layer) agree with transformers too."""
    model = make_llmpy(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seed=n_layer)
    hm = make_hf(model)
    ids, targets = batch(rng, 2, 9)
    _compare_forward_backward(model, hm, ids, targets)


def test_gradient_accumulation_equals_full_batch(rng):
    """zero_grad(); two backward(loss_scale=0.5) on the two halves of a batch give
    the same gradients as one backward() on the whole batch."""
    model = make_llmpy(seed=5)
    ids, targets = batch(rng, 4, 12)
    model.zero_grad()
    model.forward(ids, targets)
    model.backward()
    full = model.grads_dict()

    model.zero_grad()
    model.forward(ids[:2], targets[:2])
    model.backward(loss_scale=0.5)
    model.forward(ids[2:], targets[2:])
    model.backward(loss_scale=0.5)
    accum = model.grads_dict()
    for name in full:
        assert rel_err(accum[name], full[name]) < 1e-5, name


def test_zero_grad_discards_previous_gradients(rng):
    """After zero_grad() the next backward overwrites: gradients of batch 2 alone,
    with nothing left of batch 1."""
    model = make_llmpy(seed=6)
    (i1, t1), (i2, t2) = batch(rng, 2, 8), batch(rng, 2, 8)
    model.zero_grad()
    model.forward(i2, t2)
    model.backward()
    ref = model.grads.flat.copy()
    model.zero_grad()
    model.forward(i1, t1)
    model.backward()
    model.zero_grad()
    model.forward(i2, t2)
    model.backward()
    np.testing.assert_array_equal(model.grads.flat, ref)


# ---------------------------------------------------------------------------- AdamW

def _adamw_run_vs_torch(rng, steps, max_norm=None):
    """Train an llmpy model and its HF twin side by side; with max_norm, clip as
    train.py does (clip_scale folded into AdamW.step) and as torch does
    (clip_grad_norm_ before the step). Returns both models and the lr."""
    lr, betas, eps, wd = 1e-3, (0.9, 0.95), 1e-8, 0.1
    model = make_llmpy(seed=7)
    hm = make_hf(model)
    opt = AdamW(model, betas=betas, eps=eps, weight_decay=wd)
    decay, no_decay = [], []
    for name, p in hm.named_parameters():
        (decay if name.endswith(DECAYED_SUFFIXES) else no_decay).append(p)
    assert len(decay) == 2 + 4 * model.config.n_layer
    hopt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)
    losses, clipped = [], 0
    for step in range(steps):
        ids, targets = batch(rng, 4, BLOCK)
        model.zero_grad()
        _, loss = model.forward(ids, targets)
        model.backward()
        hopt.zero_grad()
        _, hloss = hf_loss(hm, ids, targets)
        hloss.backward()
        if max_norm is None:
            opt.step(lr, step + 1)
        else:
            norm = global_norm(model)
            hnorm = torch.nn.utils.clip_grad_norm_(hm.parameters(), max_norm).item()
            assert norm == pytest.approx(hnorm, rel=1e-5)
            clipped += norm > max_norm
            opt.step(lr, step + 1, grad_scale=clip_scale(norm, max_norm))
        hopt.step()
        losses.append(hloss.item())
        assert abs(loss - hloss.item()) / abs(hloss.item()) < STEP_RTOL, f"step {step}: {loss} vs {hloss.item()}"
    assert losses[-1] < losses[0]           # the reference actually trained
    if max_norm is not None:
        assert clipped >= steps // 2        # the clipping path was exercised
    return model, hm, lr


def _assert_same_weights(model, hm, lr, steps):
    sd = model.state_dict()
    hsd = {k: v.numpy() for k, v in hm.state_dict().items() if k in sd}
    assert set(hsd) == set(sd)
    # The key third of every c_attn.bias has a gradient that is mathematically 0
    # (adding a constant to all keys shifts every score of a row by the same
    # q.b, which the softmax ignores); in float32 it is rounding noise (~1e-8,
    # the size of eps), which Adam normalizes into O(lr) steps of random sign
    # that no two implementations share. Those entries are compared apart: both
    # gradients must be noise, and the weights within the steps * lr Adam can move them.
    C = model.config.n_embd
    for l in range(model.config.n_layer):
        name = f"transformer.h.{l}.attn.c_attn.bias"
        g = hm.get_parameter(name).grad.numpy()
        assert np.linalg.norm(g[C:2 * C]) < 1e-5 * np.linalg.norm(g[:C]), "key-bias gradient is not ~0"
        assert np.max(np.abs(sd[name][C:2 * C] - hsd[name][C:2 * C])) < 2 * steps * lr
        sd[name] = np.concatenate([sd[name][:C], sd[name][2 * C:]])
        hsd[name] = np.concatenate([hsd[name][:C], hsd[name][2 * C:]])
    errs = {k: rel_err(sd[k], hsd[k]) for k in sd}
    bad = {k: v for k, v in errs.items() if not v < STEP_RTOL}
    assert not bad, f"weights after {steps} steps off: {bad}"


def test_adamw_ten_steps_match_torch(rng):
    """10 steps of llmpy AdamW vs torch.optim.AdamW (decay 0.1 on 2-D weights, 0 on
    biases/layernorms): the loss at every step and the final weights agree within 1e-4."""
    model, hm, lr = _adamw_run_vs_torch(rng, 10)
    _assert_same_weights(model, hm, lr, 10)


def test_adamw_with_folded_clipping_matches_torch(rng):
    """train.py's clipping (AdamW.step(grad_scale=clip_scale(norm, max_norm)))
    equals torch's clip_grad_norm_ followed by AdamW.step, over 6 steps that clip."""
    model, hm, lr = _adamw_run_vs_torch(rng, 6, max_norm=0.5)
    _assert_same_weights(model, hm, lr, 6)


# ---------------------------------------------------------------------------- checkpoints

def test_saved_model_loads_in_transformers(pair, rng, tmp_path):
    """model.save(dir) is a directory GPT2LMHeadModel.from_pretrained reads as it
    is, giving the same logits (1e-5)."""
    model, _ = pair
    model.save(tmp_path)
    hm = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    hm.eval()
    ids, _ = batch(rng, 2, BLOCK)
    logits, _ = model.forward(ids)
    with torch.no_grad():
        ref = hm(torch.from_numpy(ids)).logits
    assert ref.dtype == torch.float32
    assert rel_err(logits, ref) < 1e-5


def test_load_reads_transformers_save_pretrained(pair, rng, tmp_path):
    """llmpy.load(dir) of a directory written by save_pretrained gives the same
    logits (1e-5) and the same config."""
    model, hm = pair
    hm.save_pretrained(tmp_path)
    loaded = llmpy.load(tmp_path)
    assert loaded.config == model.config
    ids, _ = batch(rng, 2, 11)
    logits, _ = loaded.forward(ids)
    with torch.no_grad():
        ref = hm(torch.from_numpy(ids)).logits
    assert rel_err(logits, ref) < 1e-5


# ---------------------------------------------------------------------------- lr schedule

def _torch_lrs(scheduler_factory, n, max_lr=1.0):
    """lr of each of the n steps of a torch scheduler on a dummy optimizer."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = scheduler_factory(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


def test_lr_warmup_is_linear_up_to_max():
    """Warmup: lr = max_lr * (step + 1) / warmup, as torch's LinearLR from 1/warmup to 1."""
    max_lr, W = 3e-4, 8
    ours = np.array([lr_at(s, max_lr, total_steps=100, warmup_steps=W) for s in range(W)])
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / W, end_factor=1.0,
                                                                 total_iters=W - 1), W, max_lr)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    np.testing.assert_allclose(np.diff(ours), max_lr / W, rtol=1e-9)   # linear
    assert ours[-1] == pytest.approx(max_lr)
    assert lr_at(W, max_lr, 100, W) == pytest.approx(max_lr)          # decay starts from max_lr


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_decay_matches_torch_and_ends_at_min(schedule):
    """After warmup, cosine / linear decay equal torch's CosineAnnealingLR /
    LinearLR and reach min_lr_frac * max_lr exactly at the last step (and stay there)."""
    max_lr, W, total, frac = 6e-4, 5, 40, 0.1
    span = total - W - 1
    ours = np.array([lr_at(s, max_lr, total, W, schedule=schedule, min_lr_frac=frac) for s in range(W, total)])
    if schedule == "cosine":
        factory = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=span, eta_min=frac * max_lr)  # noqa: E731
    else:
        factory = lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=frac,  # noqa: E731
                                                              total_iters=span)
    ref = _torch_lrs(factory, total - W, max_lr)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    assert ours[0] == pytest.approx(max_lr)
    assert lr_at(total - 1, max_lr, total, W, schedule=schedule, min_lr_frac=frac) == pytest.approx(frac * max_lr)
    assert lr_at(total + 10, max_lr, total, W, schedule=schedule, min_lr_frac=frac) == pytest.approx(frac * max_lr)
    assert np.all(np.diff(ours) <= 0)


def test_lr_cosine_without_warmup_and_constant():
    """No warmup: cosine starts at max_lr and is at the midpoint halfway; constant
    is max_lr after warmup; an unknown schedule is a ValueError (the user's
    --lr-schedule is refused earlier, by TrainConfig.check: tests/test_layout.py)."""
    max_lr, total = 1e-3, 21
    assert lr_at(0, max_lr, total) == pytest.approx(max_lr)
    assert lr_at(10, max_lr, total, min_lr_frac=0.0) == pytest.approx(0.5 * max_lr)
    assert lr_at(20, max_lr, total, min_lr_frac=0.0) == pytest.approx(0.0, abs=1e-15)
    for s in (0, 3, 10, 20, 50):
        assert lr_at(s, max_lr, total, warmup_steps=4, schedule="constant") == pytest.approx(
            max_lr * min(1.0, (s + 1) / 4))
    with pytest.raises(ValueError, match="exponential"):
        lr_at(5, max_lr, total, schedule="exponential")


# ---------------------------------------------------------------------------- clipping

def _model_with_grads(rng, seed=8):
    model = make_llmpy(seed=seed)
    ids, targets = batch(rng, 2, 8)
    model.zero_grad()
    model.forward(ids, targets)
    model.backward()
    return model


@pytest.mark.parametrize("ratio", [0.1, 2.0])
def test_clip_scale_matches_torch(rng, ratio):
    """global_norm is the pre-clip norm torch.nn.utils.clip_grad_norm_ returns, and
    gradients scaled by clip_scale are the ones it leaves (max_norm below and
    above the norm)."""
    model = _model_with_grads(rng)
    grads = model.grads_dict()
    ref64 = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert global_norm(model) == pytest.approx(ref64, rel=1e-6)
    max_norm = ratio * ref64
    tgrads = [torch.from_numpy(g.copy()) for g in grads.values()]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in tgrads]
    for p, g in zip(params, tgrads):
        p.grad = g
    tnorm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    norm = global_norm(model)
    model.grads.flat *= np.float32(clip_scale(norm, max_norm))
    assert norm == pytest.approx(tnorm, rel=1e-6)
    after = model.grads_dict()
    for (name, g), p in zip(after.items(), params):
        assert rel_err(g, p.grad) < 1e-6, name
    if ratio < 1:
        assert global_norm(model) == pytest.approx(max_norm, rel=1e-5)
    else:
        for name in grads:
            np.testing.assert_array_equal(after[name], grads[name])


def test_forward_with_loss_scale_starts_the_backward():
    # forward(..., loss_scale=s) writes dlogits in the loss's pass; the
    # gradients must be those of forward() + backward(s) (the same math in
    # another order: exp(x - max) dloss / sum instead of exp(x - lse) dloss,
    # so equal to float32 rounding), and a backward with another scale is
    # refused instead of silently using the wrong one.
    from llmpy.config import GPTConfig
    from llmpy.model import GPT
    cfg = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16)
    x = np.random.default_rng(3).integers(0, 100, (2, 16))
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=1)
    _, la = a.forward(x, x)
    a.backward(loss_scale=0.5)
    _, lb = b.forward(x, x, loss_scale=0.5)
    b.backward(loss_scale=0.5)
    assert la == lb
    np.testing.assert_allclose(a.grads.flat, b.grads.flat, rtol=1e-5, atol=1e-7)
    b.forward(x, x, loss_scale=0.5)
    with pytest.raises(LlmpyError, match="loss_scale"):
        b.backward(loss_scale=1.0)
