"""Which codec trees the Numba kernels handle, decided from the record alone (no tensor data).

A weight tree is read as a sum of terms, each under a chain of input transforms:

    tree   := permute(tree) | sum(tree, ...) | scale(tree, factor) | term
    term   := affine(codes) | lut(codes, table) | packed | bitplanes | ternary        -> fused code dot
            | vq(codes, codebooks)                                                      -> codebook dot
            | sparse_csr                                                                -> y += CSR x
            | lowrank(a, b)                                                             -> y += a (b x)
            | sign_lowrank(sign, u, v)                                                  -> 1-bit dot against v*x
    codes  := packed | bitplanes | tensor (integer)

``permute`` becomes a gather of x; a ``scale`` whose factor is per input column (group [>=R, 1]) becomes a
multiplication of x; other scale factors multiply into the terms below them (per row, or on a row/column-group grid
for code, codebook and sparse terms, which must then see the factor's columns unpermuted). Statistics (scales, zeros,
tables, codebooks, factors, low-rank matrices, outlier values) may be any tree: they are small and decoded once by
the reference decoder at prepare time. What does not fit (dense float tensors as terms, grid factors over low-rank
terms) is refused and left to the torch reference path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CODE_LEAVES = ("packed", "bitplanes", "ternary")
CODE_SOURCES = ("packed", "bitplanes", "tensor")
KNOWN_VERSION = 1


class Unsupported(Exception):
    """The tree uses something the Numba kernels do not implement."""


@dataclass(frozen=True)
class Factor:
    """A multiplicative factor: a node (or a JSON number) on a [gr, gc] tile grid, at ``path`` in the tree."""

    value: Any
    group: tuple[int, int]
    path: str
    kind: str  # "row" (gc covers every column), "column" (one value per input column), "grid"


@dataclass
class TermSpec:
    kind: str  # "codes" | "vq" | "sparse" | "lowrank" | "signs"
    node: dict
    path: str
    factors: list[Factor] = field(default_factory=list)
    chain: tuple[tuple[str, Any, str], ...] = ()  # ("perm", node, path) | ("mul", Factor, path), outermost first


def _codec(node: Any, path: str) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("codec"), str):
        raise Unsupported(f"{path}: not a codec node")
    if node.get("version") != KNOWN_VERSION:
        raise Unsupported(f"{path}: {node['codec']} version {node.get('version')!r}")
    return node["codec"]


def _group(node: dict, key: str = "group_shape") -> tuple[int, int]:
    value = node.get(key)
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value)):
        raise Unsupported(f"{key} {value!r}")
    return value[0], value[1]


def _check_codes(node: Any, path: str, allowed: tuple[str, ...] = CODE_SOURCES) -> None:
    codec = _codec(node, path)
    if codec not in allowed:
        raise Unsupported(f"{path}: codes from {codec}")
    bits = node.get("bits", 1)
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise Unsupported(f"{path}: {bits!r}-bit codes")


def plan_terms(record: dict) -> list[TermSpec]:
    """The terms of ``record``'s weight tree; raises :class:`Unsupported` with the reason when it does not fit."""
    if not isinstance(record, dict) or not isinstance(record.get("shape"), list) or len(record["shape"]) < 2:
        raise Unsupported("not a record")
    rows = record["shape"][0]
    cols = 1
    for d in record["shape"][1:]:
        cols *= d
    return _walk(record.get("weight"), "weight", rows, cols)


def _walk(node: Any, path: str, rows: int, cols: int) -> list[TermSpec]:
    codec = _codec(node, path)
    if codec == "permute":
        terms = _walk(node.get("input"), f"{path}/input", rows, cols)
        for term in terms:
            term.chain = (("perm", node, path),) + term.chain
        return terms
    if codec == "sum":
        terms_in = node.get("terms")
        if not isinstance(terms_in, list) or not terms_in:
            raise Unsupported(f"{path}: sum without terms")
        return [t for i, sub in enumerate(terms_in) for t in _walk(sub, f"{path}/terms[{i}]", rows, cols)]
    if codec == "scale":
        gr, gc = _group(node)
        kind = "row" if gc >= cols else "column" if gc == 1 and gr >= rows else "grid"
        factor = Factor(node.get("factor"), (gr, gc), f"{path}/factor", kind)
        terms = _walk(node.get("input"), f"{path}/input", rows, cols)
        for term in terms:
            if kind == "column":
                term.chain = (("mul", factor, path),) + term.chain
                continue
            if kind == "grid":
                if term.chain:
                    raise Unsupported(f"{path}: a grouped scale over a permuted or column-scaled input")
                if term.kind in ("lowrank", "signs"):
                    raise Unsupported(f"{path}: a grouped scale over {term.kind}")
            term.factors.append(factor)
        return terms
    if codec == "affine":
        _check_codes(node.get("codes"), f"{path}/codes")
        _group(node)
        return [TermSpec("codes", node, path)]
    if codec == "lut":
        _check_codes(node.get("codes"), f"{path}/codes")
        if "group_shape" in node:
            _group(node)
        return [TermSpec("codes", node, path)]
    if codec in CODE_LEAVES:
        _check_codes(node, path, CODE_LEAVES)
        return [TermSpec("codes", node, path)]
    if codec == "vq":
        _check_codes(node.get("codes"), f"{path}/codes")
        return [TermSpec("vq", node, path)]
    if codec == "sparse_csr":
        return [TermSpec("sparse", node, path)]
    if codec == "lowrank":
        return [TermSpec("lowrank", node, path)]
    if codec == "sign_lowrank":
        _check_codes(node.get("sign"), f"{path}/sign")
        return [TermSpec("signs", node, path)]
    raise Unsupported(f"{path}: {codec} as a term (dense or unknown)")


def why_unsupported(record: dict) -> str | None:
    """None when the Numba kernels handle ``record``, else the reason."""
    try:
        plan_terms(record)
    except Unsupported as exc:
        return str(exc)
    return None
