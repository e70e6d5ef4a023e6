"""docs/plugins.md is checked against the code, as tests/test_spec.py checks spec/: every name it promises exists.

Checked: dotted ``qformat.…`` names (modules, then attributes), hook names ``qformat_register_*``, environment
variables ``QFORMAT_*`` (read somewhere in the code), harness functions ``check_*`` of :mod:`qformat.testing`,
contract attributes written ``Class.attr`` or ``Class`` followed by a list of attributes, names imported from
``qformat`` in the Python examples, and ``qformat <subcommand> --option`` command lines.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import re
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
SOURCES = [ROOT / "qformat", ROOT / "plugins", ROOT / "kernels", ROOT / "conformance"]

# Classes a plugin author meets, by the short name the page uses for them.
CONTRACTS = {
    **{name: f"qformat.plugin.{name}" for name in (
        "Method", "MethodConfig", "LayerInput", "Kernel", "PreparedWeight", "Codec", "Context", "NodeInfo",
        "TensorInfo", "CodecRegistry", "RecordBuilder", "QuantizedTensor", "Transform", "TransformConfig",
        "BlockInput", "BlockResult", "InputTransform", "ColumnScale", "ScalePair", "Importer", "ImportedModel",
        "Exporter", "ExportReport", "ExportedTensor")},
    "Plugins": "qformat.plugins.Plugins", "PluginInfo": "qformat.plugins.PluginInfo",
}
_CLASS = "|".join(sorted(CONTRACTS, key=len, reverse=True))


def spans(text: str) -> list[str]:
    """Inline code spans (outside fenced blocks)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def code_blocks(text: str, tag: str) -> list[str]:
    return re.findall(rf"^```{tag}\n(.*?)^```", text, re.S | re.M)


def has_attribute(obj: Any, name: str) -> bool:
    """An attribute, a method, or a (dataclass) field without a class-level default."""
    if hasattr(obj, name):
        return True
    if isinstance(obj, type):
        if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            return True
        return any(name in getattr(klass, "__annotations__", {}) for klass in obj.__mro__)
    return False


def resolve(dotted: str) -> str | None:
    """None when ``dotted`` names a module or an attribute chain below one, else what is missing."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            if not has_attribute(obj, attr):
                return f"{dotted}: {'.'.join(parts[:i])} has no {attr!r}"
            obj = getattr(obj, attr, None)
        return None
    return f"{dotted}: no such module"


def contract(short: str) -> Any:
    module, _, name = CONTRACTS[short].rpartition(".")
    return getattr(importlib.import_module(module), name)


@cache
def source_text() -> str:
    return "\n".join(p.read_text() for folder in SOURCES for p in sorted(folder.rglob("*.py")))


@cache
def subcommands() -> dict[str, argparse.ArgumentParser]:
    from qformat.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_example(code: str) -> ast.Module:
    """A Python example; a fragment of a function body (``return ...``) is parsed inside a function."""
    try:
        return ast.parse(code)
    except SyntaxError:
        return ast.parse("def _example():\n" + textwrap.indent(code, "    "))


def problems(text: str) -> list[str]:
    found: list[str] = []
    code_spans = spans(text)
    python = code_blocks(text, "python")
    for span in code_spans:
        for dotted in re.findall(r"^(qformat(?:\.\w+)+)", span):
            problem = resolve(dotted)
            if problem:
                found.append(problem)
    hookspecs = importlib.import_module("qformat.hookspecs")
    for hook in sorted(set(re.findall(r"\bqformat_register_\w+", text))):
        if not callable(getattr(hookspecs, hook, None)):
            found.append(f"hook {hook}: not in qformat.hookspecs")
    for variable in sorted(set(re.findall(r"\bQFORMAT_[A-Z][A-Z_]*\b", text))):
        if f'"{variable}"' not in source_text():
            found.append(f"environment variable {variable}: the code never reads it")
    testing = importlib.import_module("qformat.testing")
    for check in sorted({m for span in code_spans for m in re.findall(r"^(check_\w+)", span)}):
        if not callable(getattr(testing, check, None)):
            found.append(f"qformat.testing.{check}: no such function")
    for span in code_spans:
        for cls, attr in re.findall(rf"^({_CLASS})\.(\w+)", span):
            if not has_attribute(contract(cls), attr):
                found.append(f"{cls}.{attr}: {CONTRACTS[cls]} has no {attr!r}")
    listed = rf"`(?:qformat\.[\w.]+\.)?({_CLASS})`\s*\(((?:`\w+`(?:,\s*)?)+)\)"
    for cls, attrs in re.findall(listed, text):
        for attr in re.findall(r"`(\w+)`", attrs):
            if not has_attribute(contract(cls), attr):
                found.append(f"{cls} ({attr}): {CONTRACTS[cls]} has no {attr!r}")
    for code in python:
        for node in ast.walk(parse_example(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "qformat":
                found += [p for alias in node.names if (p := resolve(f"{node.module}.{alias.name}"))]
    for line in [s for s in code_spans if s.startswith("qformat ")] + re.findall(r"^\$ .*?(qformat .*)$", text, re.M):
        words = line.split()
        parser = subcommands().get(words[1]) if len(words) > 1 else None
        if parser is None:
            found.append(f"`{line}`: qformat has no subcommand {words[1] if len(words) > 1 else ''!r}")
            continue
        options = {o for a in parser._actions for o in a.option_strings}
        found += [f"`{line}`: qformat {words[1]} has no option {w}" for w in words[2:]
                  if w.startswith("--") and w.split("=")[0] not in options]
    return found


def test_every_name_the_page_promises_exists():
    assert problems(DOC.read_text()) == []


def test_the_page_is_really_checked():
    """The extraction finds what the page is about (an empty extraction would pass anything)."""
    text = DOC.read_text()
    assert len([s for s in spans(text) if s.startswith("qformat.plugin.")]) >= 15
    assert set(re.findall(r"\bqformat_register_\w+", text)) == {
        "qformat_register_methods", "qformat_register_transforms", "qformat_register_codecs",
        "qformat_register_kernels", "qformat_register_importers", "qformat_register_exporters"}
    assert {"QFORMAT_PLUGINS", "QFORMAT_TRACE_PLUGINS", "QFORMAT_KERNEL"} <= set(re.findall(r"QFORMAT_[A-Z_]+", text))
    assert {"check_method", "check_transform", "check_codec_vectors", "check_kernel", "check_import"} <= {
        m for s in spans(text) for m in re.findall(r"^(check_\w+)", s)}
    assert len(re.findall(rf"`({_CLASS})\.\w+", text)) >= 20
    assert code_blocks(text, "python")


@pytest.mark.parametrize(("snippet", "reported"), [
    ("`qformat.plugin.NoSuchThing`", "has no 'NoSuchThing'"),
    ("`qformat.nosuchmodule.x`", "has no 'nosuchmodule'"),
    ("`qformat_register_widgets(register)`", "hook qformat_register_widgets"),
    ("`QFORMAT_NO_SUCH_SETTING=1`", "QFORMAT_NO_SUCH_SETTING"),
    ("`check_everything(plugin)`", "qformat.testing.check_everything"),
    ("`Kernel.fly`", "Kernel.fly"),
    ("`BlockInput.teleport`", "BlockInput.teleport"),
    ("`Method` (`name`, `teleport`)", "Method (teleport)"),
    ("```python\nfrom qformat.plugin import hookimpl, Nonexistent\n```\n", "has no 'Nonexistent'"),
    ("`qformat frobnicate`", "no subcommand 'frobnicate'"),
    ("`qformat conformance --no-such-flag`", "has no option --no-such-flag"),
])
def test_the_checker_reports_what_does_not_exist(snippet, reported):
    found = problems(snippet)
    assert any(reported in p for p in found), found
