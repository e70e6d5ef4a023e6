"""Partial loads (spec/partial.md): a record read from a prefix of its bytes, at fewer terms of its stack.

``keep_terms(record, K)`` cuts the record's *stack* (its ``sum`` weight, or the ``sum`` directly under an outer
``scale``: BitStack's input-channel scale) to its first K terms, a plain record any kernel runs; the dropped terms'
tensors are never read (memory-mapped: never paged in). BCQ's planes and BitStack's blocks are such terms.

The model-wide choice: :func:`stack_order` ranks every record's optional terms (level by level, by the gain per
byte its writer recorded in ``info.stack_gains``), :func:`plan_terms` keeps the longest prefix of that ranking that
fits a byte budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import FormatError
from .codecs import CORE_CODECS, CodecRegistry, Context, TensorInfo

TensorInfoOf = Callable[[str], "TensorInfo | None"]


def stack_node(record: Mapping[str, Any]) -> dict | None:
    """The record's stack: its ``sum`` weight, or the ``sum`` that is the input of an outer ``scale``; else None."""
    node = record.get("weight")
    if isinstance(node, dict) and node.get("codec") == "scale":
        node = node.get("input")
    return node if isinstance(node, dict) and node.get("codec") == "sum" else None


def stack_size(record: Mapping[str, Any]) -> int:
    """Terms in the record's stack (1 for a record without one: it loads whole)."""
    node = stack_node(record)
    return len(node["terms"]) if node is not None else 1


def keep_terms(record: Mapping[str, Any], count: int) -> dict:
    """A copy of ``record`` whose stack keeps its first ``count`` terms (all when ``count`` >= their number; a
    record without a stack is returned unchanged). ``storage_bytes`` is left as it was:
    ``QuantizedTensor.keep_terms`` recounts it from what the cut tree reads."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FormatError("bad_field", f"keep_terms must be an integer >= 1, got {count!r}", field="keep_terms")
    out = copy.deepcopy(dict(record))
    node = stack_node(out)
    if node is not None:
        node["terms"] = node["terms"][:count]
    return out


def referenced(node: Any, tensor_info: TensorInfoOf, registry: CodecRegistry = CORE_CODECS) -> dict[str, TensorInfo]:
    """The tensors a (sub)tree reads, in first-use order, as the codecs themselves report them (plugin codecs
    included: their tensor fields are theirs to name)."""
    ctx = Context(registry, tensor_info)
    ctx.infer(node, "weight")
    return ctx.referenced


def term_bytes(record: Mapping[str, Any], tensor_info: TensorInfoOf, registry: CodecRegistry = CORE_CODECS
               ) -> list[int]:
    """Bytes each stack term adds (tensors first read by that term; term 0 also carries everything outside the
    stack); a record without a stack is one term of all its bytes."""
    node = stack_node(record)
    if node is None:
        return [sum(t.nbytes for t in referenced(record["weight"], tensor_info, registry).values())]
    seen = referenced(keep_terms(record, 1)["weight"], tensor_info, registry)
    sizes = [sum(t.nbytes for t in seen.values())]
    for term in node["terms"][1:]:
        new = {n: t for n, t in referenced(term, tensor_info, registry).items() if n not in seen}
        seen.update(new)
        sizes.append(sum(t.nbytes for t in new.values()))
    return sizes


# -- model-wide budgets ------------------------------------------------------------------------------------------

TermBytes = Callable[[str, int], int]  # (record name, term index) -> bytes that term adds


def stack_order(records: Mapping[str, Mapping[str, Any]], term_bytes: TermBytes) -> list[tuple[str, int]]:
    """Every optional term (index >= 1) of every stack, in the order a loader adds them: level by level (all terms
    1 before any term 2, as BitStack's levels), within a level by the writer's ``info.stack_gains[i]`` per byte,
    largest first (no gains: by index, then name). Deterministic."""
    entries = []
    for name, record in records.items():
        gains = (record.get("info") or {}).get("stack_gains")
        for i in range(1, stack_size(record)):
            gain = float(gains[i]) if isinstance(gains, list) and i < len(gains) else 0.0
            entries.append((i, -gain / max(1, term_bytes(name, i)), name))
    return [(name, i) for i, _, name in sorted(entries)]


def plan_terms(records: Mapping[str, Mapping[str, Any]], term_bytes: TermBytes, base_bytes: int, budget: int
               ) -> tuple[dict[str, int], int]:
    """(terms to keep per stacked record, total bytes) for the longest prefix of :func:`stack_order` whose bytes,
    on top of ``base_bytes`` (everything else, with every stack at one term), fit ``budget``. Raises ValueError when
    even ``base_bytes`` does not fit."""
    if base_bytes > budget:
        raise ValueError(f"the smallest load needs {base_bytes / 2**20:.1f} MiB (every stack at 1 term), over the "
                         f"budget of {budget / 2**20:.1f} MiB")
    keep = {name: 1 for name, record in records.items() if stack_node(record) is not None}
    total = base_bytes
    for name, i in stack_order(records, term_bytes):
        size = term_bytes(name, i)
        if total + size > budget:
            break
        keep[name] = i + 1
        total += size
    return keep, total


# -- fewer bit-planes (use_planes) as a plain record -------------------------------------------------------------

def use_planes(record: Mapping[str, Any], tensors: Mapping[str, Any], planes: int) -> tuple[dict, dict]:
    """(record, tensors) decoding like ``use_planes=planes`` (spec/partial.md) while reading only the kept planes:
    every ``affine`` or ``lut`` over a ``bitplanes`` code of more bits becomes one over a ``planes``-bit code.

    With k planes dropped the code is ``q'·2^k + 2^(k-1)`` (q' the kept planes read as a code), so an affine
    ``(q − z)·s`` equals ``(q' − z')·s'`` with ``z' = (z − 2^(k-1)) / 2^k`` and ``s' = s·2^k``, exactly in fp32
    (integer and dyadic differences, the same real product); a lut's table keeps its entries at those codes. The
    zero may be a number, a ``packed`` or integer ``tensor`` node, the scale a number or a ``tensor`` node; anything
    else is refused (the reference decoder's ``use_planes`` still reads it). New statistics are fp32 tensors.
    """
    import numpy as np

    from . import bitpack

    if isinstance(planes, bool) or not isinstance(planes, int) or planes < 1:
        raise FormatError("bad_field", f"use_planes must be an integer >= 1, got {planes!r}", field="use_planes")
    out = copy.deepcopy(dict(record))
    arrays = dict(tensors)

    def fp32(role_name: str, values: Any) -> dict:
        arrays[role_name] = np.ascontiguousarray(values, dtype=np.float32)
        return {"codec": "tensor", "version": 1, "tensor": role_name}

    def visit(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{path}[{i}]")
            return
        if not isinstance(node, dict):
            return
        codes = node.get("codes") if node.get("codec") in ("affine", "lut") else None
        if isinstance(codes, dict) and codes.get("codec") == "bitplanes" and codes["bits"] > planes:
            dropped = codes["bits"] - planes
            step, half = float(2 ** dropped), float(2 ** (dropped - 1))
            name = codes["tensor"]
            arrays[name] = tensors[name][:planes]  # a view: a memory-mapped file pages in only these planes
            codes["bits"] = planes
            if node["codec"] == "affine":
                node["bits"] = planes
                zero = node.get("zero", 0.0)
                if isinstance(zero, (int, float)):
                    node["zero"] = (float(zero) - half) / step
                elif zero.get("codec") == "packed":
                    z = bitpack.unpack_codes(tensors[zero["tensor"]], zero["bits"], zero["shape"][1], np.float64)
                    node["zero"] = fp32(zero["tensor"], (z - half) / step)
                elif zero.get("codec") == "tensor" and np.issubdtype(tensors[zero["tensor"]].dtype, np.integer):
                    node["zero"] = fp32(zero["tensor"], (tensors[zero["tensor"]].astype(np.float64) - half) / step)
                else:
                    raise FormatError("bad_field", "use_planes as a record: the affine zero must be a number or "
                                      "integer codes", field=f"{path}/zero")
                scale = node["scale"]
                if isinstance(scale, (int, float)):
                    node["scale"] = float(scale) * step
                elif scale.get("codec") == "tensor":
                    node["scale"] = fp32(scale["tensor"], tensors[scale["tensor"]].astype(np.float32) * np.float32(step))
                else:
                    raise FormatError("bad_field", "use_planes as a record: the affine scale must be a number or a "
                                      "stored tensor", field=f"{path}/scale")
            else:
                table = node["table"]
                if table.get("codec") != "tensor":
                    raise FormatError("bad_field", "use_planes as a record: a lut table must be a stored tensor",
                                      field=f"{path}/table")
                index = (np.arange(2 ** planes) << dropped) | (2 ** (dropped - 1))
                arrays[table["tensor"]] = np.ascontiguousarray(tensors[table["tensor"]][..., index])
            return
        for key, value in node.items():
            visit(value, f"{path}/{key}")

    visit(out["weight"], "weight")
    kept = {name: arrays[name] for name in tensors}  # the rewrite keeps every tensor name, changing some arrays
    out["storage_bytes"] = sum(int(a.nbytes) for a in kept.values())
    return out, kept
