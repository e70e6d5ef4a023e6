"""JSON text that ordinary serializers refuse to write: duplicate keys, raw tokens, lone surrogates, deep nesting."""

from __future__ import annotations

import json
from typing import Any


class Raw(str):
    """A JSON token written verbatim (``1e400``, ``NaN``, ``4.0``, ``[[[...]]]``)."""


class Pairs(list):
    """A JSON object as a list of (key, value) pairs, so a key can appear twice."""


def nested(depth: int, kind: str = "list") -> Raw:
    """A value nested ``depth`` levels deep, written without recursion."""
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "0" + "}" * depth)


class TooLarge(ValueError):
    """The text would exceed the size limit (a runaway mutation, e.g. copies of copies)."""


def dumps(value: Any, ascii_only: bool = True, max_chars: int = 1 << 28) -> str:
    """Compact JSON. With ``ascii_only`` False, non-ASCII characters (lone surrogates included) are kept as they are,
    so a surrounding JSON string escapes them instead. Raises TooLarge past ``max_chars``."""
    out: list[str] = []
    size = 0
    stack: list[Any] = [value]
    # An explicit stack: mutated values can nest deeper than Python's recursion limit.
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, Pairs)):
            pairs = list(item.items()) if isinstance(item, dict) else list(item)
            parts: list[Any] = [_Token("{")]
            for i, (key, child) in enumerate(pairs):
                if i:
                    parts.append(_Token(","))
                parts.extend([_Token(json.dumps(str(key), ensure_ascii=ascii_only) + ":"), child])
            parts.append(_Token("}"))
            stack.extend(reversed(parts))
            continue
        if isinstance(item, (list, tuple)):
            parts = [_Token("[")]
            for i, child in enumerate(item):
                if i:
                    parts.append(_Token(","))
                parts.append(child)
            parts.append(_Token("]"))
            stack.extend(reversed(parts))
            continue
        if isinstance(item, _Token):
            text = item.text
        elif isinstance(item, Raw):
            text = str(item)
        elif isinstance(item, str):
            text = json.dumps(item, ensure_ascii=ascii_only)
        elif item is None or isinstance(item, bool):
            text = {None: "null", True: "true", False: "false"}[item]
        elif isinstance(item, int):
            text = str(item)
        elif isinstance(item, float):
            text = json.dumps(item)  # NaN/Infinity come out as the (invalid) JSON tokens on purpose
        else:
            raise TypeError(f"cannot write {type(item).__name__} as JSON")
        out.append(text)
        size += len(text)
        if size > max_chars:
            raise TooLarge(f"JSON text over {max_chars} characters")
    return "".join(out)


class _Token:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text
