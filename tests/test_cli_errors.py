"""Every subcommand, fed wrong, missing and contradictory arguments, answers
with at most three lines on stderr, exit code 2 and no traceback. The bad
arguments are generated from the parser itself: every option of every
subcommand gets a value of the wrong type, a value outside its choices, and
(for numbers) a negative one; every positional a path that does not exist."""
from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from llmpy.cli import build_parser, main

MISSING = "/nonexistent/llmpy-test"


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _valid_base(name, tmp):
    """Arguments that make `name` reach its own checks, but can never run for long:
    every path is one that does not exist."""
    return {"prepare": [MISSING], "train": ["--data", MISSING, "--out", str(tmp / "out")],
            "sample": [MISSING], "eval": [MISSING, "--data", MISSING], "convert": [MISSING, str(tmp / "o"), "--to", "hf"],
            "bench": ["--model", "nope"]}[name]


def _bad_cases():
    cases = []
    for name, parser in _subparsers().items():
        if any(not a.option_strings and a.required for a in parser._actions):
            cases.append((name, [], "nothing"))     # (train and bench without arguments are real runs)
        cases.append((name, ["--no-such-flag"], "an unknown flag"))
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            if action.choices is not None:
                cases.append((name, [flag, "not-a-choice"], f"{flag} outside its choices"))
            elif action.type in (int, float):
                cases.append((name, [flag, "x"], f"{flag} not a number"))
                cases.append((name, [flag, "-7"], f"{flag} negative"))
            cases.append((name, [flag], f"{flag} without its value"))
    cases += [("train", ["--resume", "--overwrite"], "contradictory"),
              ("train", ["--dtype", "bf16"], "bf16 on the CPU"),
              ("train", ["--stop-at", "9", "--steps", "3"], "stop after the end"),
              ("eval", [MISSING], "neither --data nor --hellaswag"),
              ("eval", [MISSING, "--data", "a", "--hellaswag", "b"], "both --data and --hellaswag")]
    return cases


CASES = _bad_cases()


def test_the_generator_covers_every_subcommand_and_option():
    names = {name for name, _, _ in CASES}
    assert names == set(_subparsers()) and len(CASES) > 100


@pytest.mark.parametrize("name, extra, what", CASES, ids=[f"{n}: {w}" for n, _, w in CASES])
def test_bad_arguments_get_one_line_and_exit_2(name, extra, what, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")            # nothing here may reach for the network
    # flags that are themselves the error come last, so they win over the base's
    argv = [name, *(extra if extra == [] else _valid_base(name, tmp_path)), *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:           # argparse's own exit
            code = e.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (argv, code, err.getvalue())
    assert 1 <= len(lines) <= 3, (argv, lines)
    assert "Traceback" not in err.getvalue(), argv
