"""The layout's promises (ARCHITECTURE.md): no import cycle between llmpy's
modules, every train flag declared once with a help line and its real
default, the code citing only files that are in the repository."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from llmpy.cli import build_parser
from llmpy.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "llmpy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[tuple[str, tuple]]:
    """(module, names) of every llmpy import statement in `path`: at module
    level and inside functions alike. A function-level import runs later and
    cannot deadlock an import, but a cycle through one is still two modules
    that each need the other, which the layout rules out."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update((a.name, ()) for a in node.names if a.name.startswith("llmpy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("llmpy"):
                found.add((mod, tuple(a.name for a in node.names)))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for mod, names in _imports(path):
            # `from . import x` imports the submodule x; `from .m import f` the module m
            subs = [f"{mod}.{n}" for n in names]
            deps.update(subs if subs and all(s in modules for s in subs) else [mod])
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph):
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = dfs(dep)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_llmpy_modules():
    graph = _graph()
    assert "llmpy.model" in graph and "llmpy.ops.cpu" in graph      # the walk saw the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _train_help_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions if a.dest != "help"}


def test_every_train_flag_comes_from_train_config_with_help_and_real_default():
    actions = _train_help_actions()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        a = actions[name]
        assert a.default == argparse.SUPPRESS, name       # so that --resume can tell what was typed
        assert a.help and a.help.count("\n") == 0, name
        if isinstance(f.default, bool):
            assert a.help.endswith(f"(default: {'on' if f.default else 'off'})"), (name, a.help)
        elif f.default is None:
            assert "(default: " in a.help and "(default: None)" not in a.help, (name, a.help)   # what None means
        else:
            assert a.help.endswith(f"(default: {f.default})"), (name, a.help)


def test_train_flags_parse_into_the_config():
    args = build_parser().parse_args(["train", "-B", "3", "--no-progress", "--no-cuda-graphs", "--resume",
                                      "--lr", "3e-4", "--zero-stage", "1"])
    tc = TrainConfig.from_args(args)
    assert (tc.batch_size, tc.progress, tc.cuda_graphs, tc.resume, tc.lr, tc.zero_stage) == \
        (3, False, False, True, 3e-4, 1)
    assert TrainConfig.from_args(build_parser().parse_args(["train"])) == TrainConfig()
    assert TrainConfig.given_flags(args) == {"batch_size", "progress", "cuda_graphs", "resume", "lr", "zero_stage"}


def test_resume_keeps_saved_flags_not_given_and_names_the_changed_ones():
    saved = dataclasses.replace(TrainConfig(), lr=3e-4, steps=30, batch_size=4, data="d/*.bin", stop_at=10).to_dict()
    args = build_parser().parse_args(["train", "--resume", "--lr", "1e-4", "-B", "2", "--steps", "60"])
    tc, notes = TrainConfig.from_args(args).resumed(saved, TrainConfig.given_flags(args))
    assert (tc.lr, tc.batch_size, tc.steps, tc.data, tc.stop_at, tc.resume) == (1e-4, 2, 60, "d/*.bin", None, True)
    assert notes[0] == "resume: --batch-size 4 -> 2, --lr 0.0003 -> 0.0001, --steps 30 -> 60"
    assert "--batch-size changed" in notes[1] and "not bitwise" in notes[1]
    args = build_parser().parse_args(["train", "--resume"])
    tc, notes = TrainConfig.from_args(args).resumed(saved, TrainConfig.given_flags(args))
    assert (tc.lr, tc.batch_size, tc.steps, notes) == (3e-4, 4, 30, [])


@pytest.mark.parametrize("change, message", [
    ({"lr_schedule": "step"}, "--lr-schedule 'step'"),
    ({"zero_stage": 2}, "--zero-stage 2"),
    ({"tf32": True}, "--tf32 is for fp32 matmuls on a GPU"),
    ({"batch_size": 0}, "--batch-size must be positive"),
    ({"lr": float("nan")}, "--lr must be positive"),
    ({"seed": -1}, "--seed must be >= 0"),
    ({"resume": True, "overwrite": True}, "choose one"),
])
def test_train_config_check_names_the_flag(change, message):
    from llmpy.errors import LlmpyError
    with pytest.raises(LlmpyError, match=re.escape(message)):
        dataclasses.replace(TrainConfig(), **change).check()


def test_code_cites_only_files_in_the_repository():
    for path in PKG.rglob("*"):
        if path.suffix in (".py", ".cu", ".cuh"):
            assert "DESIGN.md" not in path.read_text(), path
    assert (ROOT / "ARCHITECTURE.md").is_file()


def test_model_descriptors_as_llmc_reads_them():
    from llmpy.config import preset
    from llmpy.errors import LlmpyError
    shape = lambda n: (lambda c: (c.n_layer, c.n_head, c.n_embd, c.block_size))(preset(n))  # noqa: E731
    assert shape("d12") == (12, 12, 768, 1024) and shape("d48") == (48, 25, 1600, 1024)
    assert shape("d60") == (60, 30, 1920, 1024) and shape("d72") == (72, 30, 2880, 1024)
    assert shape("d84") == (84, 36, 3456, 1024)
    assert shape("d5") == (5, 5, 320, 1024)                      # any other depth: head size 64
    gpt3 = {384: (6, 64), 768: (12, 64), 1024: (24, 64), 1536: (24, 96), 2048: (24, 128), 2560: (32, 80),
            4096: (32, 128), 12288: (96, 128)}
    for c, (depth, hs) in gpt3.items():
        assert shape(f"gpt3:c{c}") == (depth, c // hs, c, 2048), c
    assert shape("gpt3:c5140") == (40, 40, 5120, 2048)
    assert preset("gpt3:c768", seq_len=4096).block_size == 4096
    for bad in ("gpt3:c1000", "d0", "d129", "d999", "x12", "gpt3:768"):
        with pytest.raises(LlmpyError, match="a model is one of d2, .* dN for any other depth N .* gpt3:cN"):
            preset(bad)
