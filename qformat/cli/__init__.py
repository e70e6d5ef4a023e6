"""The `qformat` command. Each group of subcommands lives in its own module exposing ``add_parsers(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import QformatError, shorten

# Modules contributing subcommands; each defines add_parsers(subparsers) and sets `func` on its parsers.
COMMAND_MODULES = ("format_cmds", "convert_cmds", "export_cmds", "runtime_cmds", "kernel_cmds", "hub_cmds")


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


def describe_os_error(exc: OSError) -> str:
    """One line: what failed and on which path (shortened: a 1000-character name must not flood the terminal)."""
    what = exc.strerror or type(exc).__name__
    paths = [shorten(os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else p)
             for p in (exc.filename, exc.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else f"{what}: {shorten(exc)}"


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
    except OSError as exc:  # a path given (or named inside a model folder) that the system cannot open or use
        print(f"qformat: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qformat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
