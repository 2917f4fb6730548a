"""The ``trainserve`` command. Each subcommand lives in its own module exposing ``register(subparsers)``.

``--help`` must answer at once: subcommand modules import nothing heavy at module level (no vLLM,
no engine), and value checks that need no model (``--steps 0``, a batch size that the generations
do not divide) run in the argument parser, before any import or engine start, and name the flag.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable

# Subcommand modules, in the order they are listed in --help.
SUBCOMMAND_MODULES = ("trainserve.demo", "trainserve.server.cli", "trainserve.rl.cli")

DESCRIPTION = """\
Train a LoRA adapter on a Qwen2/Llama model while a colocated vLLM engine serves the very same
base weights and generates with the adapter as it is being trained: one copy of the weights, no
saving, merging or syncing in between.

  trainserve demo     watch a tiny model learn facts through the live adapter (no download)
  trainserve serve    serve a model and its LoRA adapters over the OpenAI HTTP API
  trainserve grpo     GRPO reinforcement learning on a built-in toy task

Run 'trainserve COMMAND --help' for a command's options."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every option's default: appended as
    ``(default: X)`` unless the help already says it, ``(default: off)`` for a flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


def _number(kind: Callable[[str], int | float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
port = _number(int, lambda v: 0 <= v <= 65535, "a port number (0-65535)")


def build_parser() -> argparse.ArgumentParser:
    from trainserve import __version__

    parser = argparse.ArgumentParser(prog="trainserve", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"trainserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:  # checks across options, still before anything heavy is imported
        problem = check(args)
        if problem:
            parser.exit(2, f"trainserve {args.command}: error: {problem}\n")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
