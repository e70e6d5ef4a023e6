"""The `qformat` command. Each group of subcommands lives in its own module exposing ``add_parsers(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import QformatError

# Modules contributing subcommands; each defines add_parsers(subparsers) and sets `func` on its parsers.
COMMAND_MODULES = ("format_cmds", "convert_cmds", "runtime_cmds", "kernel_cmds", "hub_cmds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformat", description="Convert, inspect, verify and run qformat models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QformatError as exc:
        print(f"qformat: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qformat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
