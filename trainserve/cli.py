"""The ``trainserve`` command. Each subcommand lives in its own module exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Subcommand modules, in the order they are listed in --help.
SUBCOMMAND_MODULES = ("trainserve.demo", "trainserve.server.cli", "trainserve.rl.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainserve", description=__doc__)
    from trainserve import __version__

    parser.add_argument("--version", action="version", version=f"trainserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
