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
_PROBE = """
import json, sys
from trainserve.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    results.append({"argv": argv, "code": code, "vllm": any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)})
print("PROBE " + json.dumps(results))
"""


def _probe(*argvs: list[str]) -> tuple[list[dict], str, str]:
    """Run ``trainserve.cli.main(argv)`` for each argv in one fresh interpreter."""
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(argvs))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE "):]), r.stdout, r.stderr


def test_help_answers_without_importing_vllm():
    results, out, _ = _probe(["--help"], *([c, "--help"] for c in COMMANDS))
    for result in results:
        assert result["code"] == 0 and not result["vllm"], result
    assert "Run 'trainserve COMMAND --help'" in out
    for command in COMMANDS:
        assert f"trainserve {command}" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--steps", "0"], ["--steps", ">= 1"]),
        (["demo", "--every", "-3"], ["--every"]),
        (["grpo", "--batch-size", "12"], ["--batch-size 12", "--num-generations 8"]),
        (["grpo", "--num-generations", "1", "--batch-size", "4"], ["--num-generations", ">= 2"]),
        (["grpo", "--top-p", "1.5"], ["--top-p"]),
        (["grpo", "--weights", "fp4"], ["--weights", "fp4"]),
        (["grpo", "--gradient-checkpointing", "maybe"], ["--gradient-checkpointing"]),
        (["serve", "m", "--port", "70000"], ["--port"]),
        (["serve", "m", "--max-request-bytes", "0"], ["--max-request-bytes"]),
    ],
)
def test_usage_errors_name_the_flag_before_any_import(argv, words):
    results, _, err = _probe(argv)
    assert results[0]["code"] == 2 and not results[0]["vllm"], (results, err)
    assert "Traceback" not in err
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
