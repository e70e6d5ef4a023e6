"""The tensors of an imported folder in a stable order: every quantized module becomes one record named
``<module>.weight`` (built lazily, when the iteration reaches it), every other tensor passes through as stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from qformat.errors import SourceError

from ._import_safetensors import ImportFolder


def quantized_modules(folder: ImportFolder, anchor: str) -> list[str]:
    """Modules (name prefixes) holding a tensor ``<module>.<anchor>`` (``qweight``, ``weight_packed``, ...)."""
    suffix = "." + anchor
    return sorted(name[: -len(suffix)] for name in folder.names() if name.endswith(suffix))


def require(folder: ImportFolder, module: str, part: str) -> str:
    """``<module>.<part>``, which must be in the folder (a SourceError naming the field otherwise)."""
    name = f"{module}.{part}"
    if not folder.has(name):
        raise SourceError(f"module {module} has no {part} tensor", file=str(folder.path), tensor=name, field=part)
    return name


def plan_tensors(folder: ImportFolder, parts: Mapping[str, list[str]], build: Callable[[str], Any],
                 drop: set[str] | frozenset[str] = frozenset()) -> Callable[[], Iterator[tuple[str, Any]]]:
    """``parts``: module -> the names of its stored tensors that its record replaces. The record is yielded where the
    first of them comes in name order; a plain ``<module>.weight`` next to them is a SourceError. Tensors in ``drop``
    are left out."""
    consumed: dict[str, str] = {name: "" for name in drop}
    anchors: dict[str, str] = {}
    for module, names in parts.items():
        plain = f"{module}.weight"
        if folder.has(plain) and plain not in names:
            raise SourceError(f"module {module} has both a plain weight and quantized tensors", file=str(folder.path),
                              tensor=plain)
        for name in names:
            consumed[name] = module
        anchors[min(names)] = module

    def tensors() -> Iterator[tuple[str, Any]]:
        for name in folder.names():
            module = anchors.get(name)
            if module is not None:
                yield f"{module}.weight", build(module)
            elif name not in consumed:
                yield name, folder.read(name)

    return tensors


def stored_bits(folder: ImportFolder, parts: Mapping[str, list[str]], weights: int) -> float | None:
    """Bits per weight the source spends on its quantized modules: every byte of their tensors over their weights."""
    total = sum(folder.nbytes(name) for names in parts.values() for name in names)
    return total * 8 / weights if weights else None
