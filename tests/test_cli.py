"""The ``trainserve`` command line: help that tells a user what each command does and every
option's default, answered without importing vLLM, and usage errors that name the flag before
anything heavy is imported or started."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from server_support import REPO

COMMANDS = ("demo", "serve", "grpo")
HELP_ARGVS = [["--help"], *([c, "--help"] for c in COMMANDS)]
USAGE_ERRORS = [
    (["demo", "--steps", "0"], ["--steps", ">= 1"]),
    (["demo", "--every", "-3"], ["--every"]),
    (["grpo", "--batch-size", "12"], ["--batch-size 12", "--num-generations 8"]),
    (["grpo", "--num-generations", "1", "--batch-size", "4"], ["--num-generations", ">= 2"]),
    (["grpo", "--top-p", "1.5"], ["--top-p"]),
    (["grpo", "--weights", "fp4"], ["--weights", "fp4"]),
    (["grpo", "--gradient-checkpointing", "maybe"], ["--gradient-checkpointing"]),
    (["serve", "m", "--port", "70000"], ["--port"]),
    (["serve", "m", "--max-request-bytes", "0"], ["--max-request-bytes"]),
]
# Each argv's stdout and stderr are captured on their own, so one case's message cannot satisfy
# another's check; "vllm" is read after each call (once imported, every later call shows it too).
_PROBE = """
import contextlib, io, json, sys
from trainserve.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "vllm": any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)})
print("PROBE " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def probed() -> dict[str, dict]:
    """``trainserve.cli.main(argv)`` for every argv of this module, all in one fresh interpreter
    (one interpreter start instead of one per case, the slow part here); keyed by the joined argv,
    plus "_stderr": the process's own stderr."""
    argvs = [*HELP_ARGVS, *(argv for argv, _ in USAGE_ERRORS)]
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, r.stdout[-3000:] + r.stderr[-3000:]
    results = {" ".join(x["argv"]): x for x in json.loads(line[len("PROBE "):])}
    results["_stderr"] = {"err": r.stderr}
    return results


def test_help_answers_without_importing_vllm(probed):
    for argv in HELP_ARGVS:
        result = probed[" ".join(argv)]
        assert result["code"] == 0 and not result["vllm"], result
    assert "Run 'trainserve COMMAND --help'" in probed["--help"]["out"]
    for command in COMMANDS:
        assert f"trainserve {command}" in probed[f"{command} --help"]["out"]


@pytest.mark.parametrize("argv, words", USAGE_ERRORS)
def test_usage_errors_name_the_flag_before_any_import(probed, argv, words):
    result = probed[" ".join(argv)]
    err = result["err"]
    assert result["code"] == 2 and not result["vllm"], result
    assert "Traceback" not in err and "Traceback" not in probed["_stderr"]["err"]
    for word in words:
        assert word in err, err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from trainserve.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_that_shows_its_default():
    for name, parser in _subparsers().items():
        assert parser.description and "``" not in parser.description, name  # for users, not a docstring
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings:
                shown = formatter._get_help_string(action) % {"default": action.default}
                assert "default" in shown, (name, action.option_strings, shown)


def test_grpo_weights_and_checkpointing_reach_the_loader(monkeypatch, tmp_path):
    """``trainserve grpo --weights/--gradient-checkpointing`` become from_pretrained's format flags and
    get_peft_model's checkpointing (stopped there: nothing loads)."""
    from trainserve import FastLanguageModel
    from trainserve.rl.cli import GRPORunError, run_grpo

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_load(*args, **kwargs):
        seen["load"] = kwargs
        return object(), object()

    def fake_peft(model, **kwargs):
        seen["peft"] = kwargs
        raise Stop

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(fake_load))
    monkeypatch.setattr(FastLanguageModel, "get_peft_model", staticmethod(fake_peft))
    with pytest.raises(Stop):
        run_grpo(str(tmp_path / "a"), weights="fp8", gradient_checkpointing=False, progress=False)
    assert seen["load"]["load_in_fp8"] is True and "load_in_4bit" not in seen["load"]
    assert seen["peft"]["use_gradient_checkpointing"] is False
    with pytest.raises(Stop):
        run_grpo(str(tmp_path / "b"), progress=False)  # the defaults: int4, "unsloth"
    assert seen["load"]["load_in_4bit"] is True and seen["peft"]["use_gradient_checkpointing"] == "unsloth"
    with pytest.raises(GRPORunError, match="weights must be one of"):
        run_grpo(str(tmp_path / "c"), weights="fp4", progress=False)
