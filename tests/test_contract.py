"""Both backends implement the op contract (llmpy/ops/contract.py) exactly:
every function it lists, with the parameters it lists (inspect.signature),
and no public function it does not list; and llmpy/profile.py times the
contract's ops.

The CUDA backend is imported as tests/test_cuda_host.py does it: where CuPy
is missing, a NumPy stand-in takes its place for the import (nothing runs).
"""
from __future__ import annotations

import importlib
import inspect
import sys
import types

import numpy as np
import pytest

from llmpy import profile
from llmpy.ops import contract, cpu


@pytest.fixture
def cuda(monkeypatch):
    try:
        import cupy  # noqa: F401
        yield importlib.import_module("llmpy.ops.cuda")
        return
    except ImportError:
        pass
    fake = types.ModuleType("cupy")
    fake.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    before = set(sys.modules)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "cupy", fake)
        mod = importlib.import_module("llmpy.ops.cuda")
    yield mod
    if "llmpy.ops.cuda" not in before:          # forget the import against the stand-in
        for name in set(sys.modules) - before:
            if name == "llmpy.ops.cuda" or name.startswith("llmpy.ops.cuda."):
                sys.modules.pop(name, None)
        import llmpy.ops
        vars(llmpy.ops).pop("cuda", None)


def _parameters(fn) -> str:
    """fn's parameters as the contract spells them: names, kinds and defaults (annotations left out)."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def problems(backend, which: str) -> list[str]:
    """How `backend` (a module, or anything with attributes) departs from
    the contract for backend kind `which` ('cpu' or 'cuda'); [] if it does not."""
    want = contract.functions(which)
    have = {n: f for n, f in vars(backend).items() if not n.startswith("_") and inspect.isfunction(f)}
    out = [f"missing op {n}" for n in sorted(set(want) - set(have))]
    out += [f"op {n} is not in the contract" for n in sorted(set(have) - set(want))]
    for n in sorted(set(want) & set(have)):
        got = _parameters(have[n])
        if got != want[n].signature:
            out.append(f"{n}{got}: the contract says {n}{want[n].signature}")
    attrs = dict(contract.ATTRIBUTES, **(contract.CUDA_ATTRIBUTES if which == "cuda" else {}))
    out += [f"missing attribute {n}" for n in attrs if not hasattr(backend, n)]
    return out


def test_cpu_backend_implements_the_contract():
    assert problems(cpu, "cpu") == []
    assert cpu.name == "cpu" and cpu.xp is np


def test_cuda_backend_implements_the_contract(cuda):
    assert problems(cuda, "cuda") == []
    assert cuda.name == "cuda"
    assert isinstance(cuda.capturable, bool)


def test_the_check_can_fail():
    # a backend missing an op, with an op the contract does not have, and
    # with a misnamed parameter: each is reported
    fake = types.SimpleNamespace(**{n: f for n, f in vars(cpu).items() if inspect.isfunction(f)},
                                 **{n: getattr(cpu, n) for n in contract.ATTRIBUTES})
    del fake.gelu_backward
    fake.gelu_fast = lambda out, inp: None

    def layernorm_forward(out, mean, rstd, x, weight, bias):
        pass
    fake.layernorm_forward = layernorm_forward

    def attention_backward(dqkv, dout, qkv, att, datt, n_head):      # `out=None` missing
        pass
    fake.attention_backward = attention_backward
    found = problems(fake, "cpu")
    assert "missing op gelu_backward" in found
    assert "op gelu_fast is not in the contract" in found
    assert any(p.startswith("layernorm_forward(") for p in found)
    assert any(p.startswith("attention_backward(") for p in found)
    assert len(found) == 4
    del fake.xp
    assert "missing attribute xp" in problems(fake, "cpu")


def test_profile_times_the_contract():
    assert set(profile.OPS) == set(contract.timed_ops())
    assert set(contract.OPS) <= set(profile.OPS)       # the fused ops included
    for fused in ("residual_layernorm_forward", "crossentropy_forward_backward"):
        assert fused in profile.OPS
    for name in ("adamw_update", "adamw_step_flat", "sum_of_squares_into"):
        assert name in profile.OPS
    assert "host_sort" not in profile.OPS and "cast" not in profile.OPS   # host glue, not timed


def test_attention_saved_rule():
    bf16 = np.dtype("float16")          # any non-float32 storage type stands for bf16 here
    assert contract.attention_saved(2, 3, 5, 8, np.float32, flash=False) == ((2, 3, 5, 5), np.float32, (2, 3, 5, 5))
    assert contract.attention_saved(2, 3, 5, 8, np.float32, flash=True) == ((2, 3, 5, 5), np.float32, (2, 3, 5, 5))
    assert contract.attention_saved(2, 3, 5, 8, bf16, flash=True) == ((2, 3, 5), np.float32, (1,))
    assert contract.attention_saved(2, 3, 5, 8, bf16, flash=False) == ((2, 3, 5, 5), bf16, (2, 3, 5, 5))
    assert cpu.attention_saved(2, 3, 5, 8, np.float32) == contract.attention_saved(2, 3, 5, 8, np.float32, False)


def test_contract_imports_without_cupy():
    import subprocess
    code = ("import sys\nfrom llmpy.ops import contract, cuda_build, shared\nfrom llmpy import profile\n"
            "assert 'cupy' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_llama_ops_are_required_of_both_backends():
    # test_*_backend_implements_the_contract then holds each backend to them
    assert set(contract.LLAMA_OPS) <= set(contract.functions("cpu"))
    assert set(contract.LLAMA_OPS) <= set(contract.functions("cuda"))
    assert set(contract.LLAMA_OPS) <= set(profile.OPS)     # timed on either backend