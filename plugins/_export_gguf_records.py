"""Which GGUF type expresses a record exactly, and its blocks.

**The GGUF importer's trees** (``_gguf_records``; ``d``/``m``/``dmin`` fp16, ``sc``/``mn`` sub-block integers) are
recognised by their structure and written back as the type they came from, so an imported GGUF exports to the same
bytes:

========================================================================================  ==========
``affine(q:4, zero 8, scale d, [1,32])``                                                   Q4_0
``affine v2(q:4, scale d, offset m, [1,32])``                                              Q4_1
``affine(q:5, zero 16, scale d, [1,32])``                                                  Q5_0
``affine v2(q:5, scale d, offset m, [1,32])``                                              Q5_1
``affine(q:8, zero 128, scale d, [1,32])``                                                 Q8_0
``affine v2(q:2, scale scale(sc:4, d, [1,16]), offset scale(mn:4, -dmin, [1,16]), [1,16])``  Q2_K
``affine(q:3, zero 4, scale affine(sc:6, zero 32, scale d, [1,16]), [1,16])``              Q3_K
``affine v2(q:4, scale scale(sc:6, d, [1,8]), offset scale(mn:6, -dmin, [1,8]), [1,32])``  Q4_K
``affine v2(q:5, ...)`` as Q4_K                                                            Q5_K
``affine(q:6, zero 32, scale affine(sc:8, zero 128, scale d, [1,16]), [1,16])``            Q6_K
``scale(lut(q:4, IQ4_NL values), d, [1,32])``                                              IQ4_NL
``scale(lut(q:4, IQ4_NL values), affine(sc:6, zero 32, scale d, [1,8]), [1,32])``          IQ4_XS
``scale(ternary, d, [1,256])``                                                             TQ1_0
``affine(q:2, zero 1, scale d, [1,256])``                                                  TQ2_0
========================================================================================  ==========

Every ``d``/``m``/``dmin`` must be exactly an fp16 value; a parameter may be stored in any grid that re-tiles to
the type's blocks (``_export_affine.per_block``).

**Any other affine tree** (our methods' ``rtn``/``gptq``/..., ``w = (q − z)·s (+ o)``), with the scale constant over
each 32-column block of a row and exactly an fp16 value, takes the smallest of these that expresses it:

- ``Q4_0`` / ``Q5_0`` / ``Q8_0`` (4.5 / 5.5 / 8.5 bits per weight) when there is no offset, the zero is an integer
  and every ``x = q − z`` fits the type's signed range ([−8, 7], [−16, 15], [−128, 127]); ``d = s``. Exact: gguf-py
  computes ``d · x`` in fp32 with ``x`` exact, the reference decoder ``(q − z) · s``: the same single product.
  Symmetric 4-bit groups of 32 (zero 8) are Q4_0, symmetric 8-bit (zero 128) Q8_0, asymmetric 4-bit Q5_0 at worst.
- ``Q4_1`` / ``Q5_1`` (5.0 / 6.0) when the codes fit 4 / 5 bits, ``d = s`` and ``m`` = the decode of ``q = 0`` in
  the block, ``((0 − z) · s) + o``, which must be exactly an fp16 value; then ``d · q + m`` is, for an integer
  zero, a single rounding of the same real number as ``(q − z) · s`` (``d · q`` and ``m`` are exact).

A group wider than 32 columns (128, a whole row) re-tiles exactly: each of its 32-column blocks repeats the scale.
Columns of a tensor must be a multiple of the block (32, or 256 for the K-quants and TQ types).

Every choice is checked afterwards (:func:`verify`): gguf-py's ``dequantize`` of the written blocks must equal the
record's reference decode bit for bit, else the record is not expressible.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _export_gguf_blocks as blocks
from ._export_affine import Affine, NotExpressible, Tree, affine_parts, f16_exact, integer_valued, per_block

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
QK_K = blocks.QK_K

# type -> (bits, zero, group columns) of the single-affine trees without offset
_ZERO_TYPES = {"Q4_0": (4, 8, 32), "Q5_0": (5, 16, 32), "Q8_0": (8, 128, 32), "TQ2_0": (2, 1, QK_K)}
_OFFSET_TYPES = {"Q4_1": (4, 32), "Q5_1": (5, 32)}
# type -> (bits, sub-block columns, sub-scale bits) of the K-quants with subtracted minimums
_K_SUB = {"Q2_K": (2, 16, 4), "Q4_K": (4, 32, 6), "Q5_K": (5, 32, 6)}
# type -> (bits, zero, sub-scale bits, sub-scale zero) of the K-quants with signed sub-scales (16-column sub-blocks)
_K_SIGNED = {"Q3_K": (3, 4, 6, 32), "Q6_K": (6, 32, 8, 128)}
# the generic affine candidates, smallest first: name, bits per weight, signed range or None (an offset type)
_GENERIC = (("Q4_0", (-8, 7)), ("Q4_1", 4), ("Q5_0", (-16, 15)), ("Q5_1", 5), ("Q8_0", (-128, 127)))


def _constant(grid: np.ndarray | None, value: float) -> bool:
    return grid is not None and grid.size > 0 and bool((grid == np.float32(value)).all())


def _codes(a: Affine, bits: int) -> np.ndarray:
    if a.bits != bits:
        raise NotExpressible(f"{a.bits}-bit codes where {bits} bits are needed")
    return a.codes.astype(np.uint8)


def _d(a: Affine, grid: np.ndarray, width: int, what: str) -> np.ndarray:
    return f16_exact(a.per_block(grid, width, what), what)


def _zero_type(a: Affine, type_name: str) -> dict[str, np.ndarray]:
    bits, zero, width = _ZERO_TYPES[type_name]
    if a.offset is not None or not _constant(a.zero, zero) or a.group[1] != width:
        raise NotExpressible(f"not {type_name}'s tree")
    q = _codes(a, bits)
    d = _d(a, a.scale, width, "scale")
    if type_name == "Q8_0":
        return {"d": d, "x": (q.astype(np.int16) - 128).astype(np.int8)}
    return {"d": d, "q": q}


def _offset_type(a: Affine, type_name: str) -> dict[str, np.ndarray]:
    bits, width = _OFFSET_TYPES[type_name]
    if a.zero is not None or a.offset is None or a.group[1] != width:
        raise NotExpressible(f"not {type_name}'s tree")
    return {"d": _d(a, a.scale, width, "scale"), "m": _d(a, a.offset, width, "offset"), "q": _codes(a, bits)}


def _sub_node(tree: Tree, node: Any, codec: str, what: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A ``scale(codes, factor, group)`` node: (integer codes, factor grid, group)."""
    if not isinstance(node, dict) or node.get("codec") != codec or tree.kind(node["input"]) != "int":
        raise NotExpressible(f"the {what} is not a {codec} of integer sub-block values")
    codes = np.asarray(tree.decode(node["input"], f"{what}/input"))
    return codes, tree.values(node["factor"], f"{what}/factor"), tuple(node["group_shape"])


def _k_sub(tree: Tree, a: Affine, node: dict, type_name: str) -> dict[str, np.ndarray]:
    bits, sub, sub_bits = _K_SUB[type_name]
    if a.zero is not None or a.offset is None or a.group[1] != sub:
        raise NotExpressible(f"not {type_name}'s tree")
    per = QK_K // sub
    sc, d_grid, d_group = _sub_node(tree, node["scale"], "scale", "scale")
    mn, m_grid, m_group = _sub_node(tree, node["offset"], "scale", "offset")
    rows, cols = a.shape
    if sc.shape != (rows, cols // sub) or mn.shape != sc.shape or sc.max(initial=0) >= 1 << sub_bits \
            or mn.max(initial=0) >= 1 << sub_bits:
        raise NotExpressible(f"the sub-block scales are not {sub_bits}-bit per {sub} columns")
    d = f16_exact(per_block(d_grid, d_group, sc.shape, per, "super-block scale"), "super-block scale")
    neg = f16_exact(per_block(m_grid, m_group, sc.shape, per, "super-block min"), "super-block min")
    return {"d": d, "dmin": -neg, "sc": sc.astype(np.uint8), "mn": mn.astype(np.uint8), "q": _codes(a, bits)}


def _k_signed(tree: Tree, a: Affine, node: dict, type_name: str) -> dict[str, np.ndarray]:
    bits, zero, sub_bits, sub_zero = _K_SIGNED[type_name]
    if a.offset is not None or not _constant(a.zero, zero) or a.group[1] != 16:
        raise NotExpressible(f"not {type_name}'s tree")
    inner = affine_parts(tree, node["scale"])
    rows, cols = a.shape
    if inner.shape != (rows, cols // 16) or inner.offset is not None or not _constant(inner.zero, sub_zero):
        raise NotExpressible(f"not {type_name}'s sub-block scales")
    sc = _codes(inner, sub_bits)
    d = f16_exact(inner.per_block(inner.scale, 16, "super-block scale"), "super-block scale")
    if type_name == "Q6_K":
        return {"d": d, "sc": (sc.astype(np.int16) - 128).astype(np.int8), "q": _codes(a, bits)}
    return {"d": d, "sc": sc, "q": _codes(a, bits)}


def _iq4_codes(tree: Tree, inner: dict) -> np.ndarray:
    """The 4-bit codes of a global ``lut`` over IQ4_NL's 16 values (IQ4_NL and IQ4_XS share them)."""
    table = tree.values(inner["table"], "input/table")
    if table.shape != (16,) or not np.array_equal(table, np.array(IQ4_NL_VALUES, np.float32)):
        raise NotExpressible("a lut whose table is not IQ4_NL's values")
    q = np.asarray(tree.decode(inner["codes"], "input/codes"))
    if q.max(initial=0) > 15:
        raise NotExpressible("lut codes wider than 4 bits")
    return q.astype(np.uint8)


def _iq4_xs(tree: Tree, q: np.ndarray, factor: dict) -> dict[str, np.ndarray]:
    """The factor of ``scale(lut(q:4), factor, [1,32])`` as IQ4_XS's ``affine(sc:6, zero 32, scale d, [1,8])``."""
    sub = affine_parts(tree, factor)
    rows, cols = tree.shape
    if sub.shape != (rows, cols // 32) or sub.offset is not None or not _constant(sub.zero, 32):
        raise NotExpressible("not IQ4_XS's sub-block scales")
    d = f16_exact(sub.per_block(sub.scale, QK_K // 32, "super-block scale"), "super-block scale")
    return {"d": d, "sc": _codes(sub, 6), "q": q}


def _scaled(tree: Tree) -> tuple[str, dict[str, np.ndarray]]:
    """``scale(lut(q:4, IQ4_NL), d, [1,32])`` (IQ4_NL), ``scale(lut(q:4, IQ4_NL), affine(sc:6, zero 32, scale d,
    [1,8]), [1,32])`` (IQ4_XS) or ``scale(ternary, d, [1,256])`` (TQ1_0)."""
    node = tree.weight
    inner = node["input"]
    group = tuple(node["group_shape"])
    shape = tuple(tree.shape)
    if isinstance(inner, dict) and inner.get("codec") == "lut" and group[1] == 32 and "group_shape" not in inner:
        q = _iq4_codes(tree, inner)
        if isinstance(node["factor"], dict) and node["factor"].get("codec") == "affine" and group[0] == 1:
            return "IQ4_XS", _iq4_xs(tree, q, node["factor"])
        factor = tree.values(node["factor"], "factor")
        return "IQ4_NL", {"d": f16_exact(per_block(factor, group, shape, 32, "scale"), "scale"), "q": q}
    factor = tree.values(node["factor"], "factor")
    if isinstance(inner, dict) and inner.get("codec") == "ternary" and group[1] == QK_K:
        t = np.asarray(tree.decode(inner, "input")).astype(np.int8)
        return "TQ1_0", {"d": f16_exact(per_block(factor, group, shape, QK_K, "scale"), "scale"), "t": t}
    raise NotExpressible(f"the tree is {tree.signature}, not a GGUF layout")


def native(tree: Tree) -> tuple[str, dict[str, np.ndarray]] | None:
    """The GGUF type whose importer tree this record has, with its fields; None when it has none of them."""
    node = tree.weight
    try:
        if node.get("codec") == "scale":
            return _scaled(tree)
        a = affine_parts(tree, node)
    except NotExpressible:
        return None
    candidates: list[str]
    if isinstance(node.get("scale"), dict) and node["scale"].get("codec") == "affine":
        candidates = list(_K_SIGNED)
    elif isinstance(node.get("scale"), dict) and node["scale"].get("codec") == "scale":
        candidates = list(_K_SUB)
    else:
        candidates = [*_ZERO_TYPES, *_OFFSET_TYPES]
    for type_name in candidates:
        try:
            if type_name in _K_SIGNED:
                return type_name, _k_signed(tree, a, node, type_name)
            if type_name in _K_SUB:
                return type_name, _k_sub(tree, a, node, type_name)
            if type_name in _ZERO_TYPES:
                return type_name, _zero_type(a, type_name)
            return type_name, _offset_type(a, type_name)
        except NotExpressible:
            continue
    return None


def generic(tree: Tree) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The legacy-quant layouts that express an affine record by construction, smallest first (may be empty); raises
    :class:`NotExpressible` with the reason when the record is no such affine."""
    a = affine_parts(tree, tree.weight)
    rows, cols = a.shape
    if cols % 32:
        raise NotExpressible(f"rows of {cols} columns are not whole 32-column blocks")
    s = a.per_block(a.scale, 32, "scale")
    d = f16_exact(s, "scale")
    zero = a.per_block(a.zero, 32, "zero") if a.zero is not None else None
    offset = a.per_block(a.offset, 32, "offset") if a.offset is not None else None
    q = a.codes
    found: list[tuple[str, dict[str, np.ndarray]]] = []
    reasons: list[str] = []
    x = None
    if offset is None:
        try:
            z = integer_valued(zero, "zero") if zero is not None else np.zeros(s.shape, np.int32)
            x = q.astype(np.int32) - np.repeat(z, 32, axis=1)
        except NotExpressible as exc:
            reasons.append(str(exc))
    else:
        reasons.append("an offset (no zero-only layout)")
    for type_name, spec in _GENERIC:
        if isinstance(spec, tuple):
            if x is None:
                continue
            lo, hi = spec
            if x.size and (x.min() < lo or x.max() > hi):
                reasons.append(f"q - z spans [{int(x.min())}, {int(x.max())}], wider than Q4_0/Q5_0/Q8_0's int4/5/8")
                continue
            if type_name == "Q8_0":
                found.append((type_name, {"d": d, "x": x.astype(np.int8)}))
            else:
                found.append((type_name, {"d": d, "q": (x - lo).astype(np.uint8)}))
        else:
            if q.size and int(q.max()) >= 1 << spec:
                reasons.append(f"codes reach {int(q.max())}, wider than Q4_1/Q5_1's 4/5 bits")
                continue
            zero_f = zero if zero is not None else np.zeros_like(s)
            with np.errstate(invalid="ignore", over="ignore"):
                m0 = (np.float32(0) - zero_f) * s
                if offset is not None:
                    m0 = m0 + offset
            try:
                m = f16_exact(m0.astype(np.float32), "block minimum (decode of q = 0)")
            except NotExpressible as exc:
                reasons.append(f"for Q4_1/Q5_1, {exc}")
                continue
            found.append((type_name, {"d": d, "m": m, "q": q.astype(np.uint8)}))
    if not found:
        raise NotExpressible("; ".join(dict.fromkeys(reasons)) or "no legacy GGUF layout fits")
    return found


def candidates(tree: Tree) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Every exact GGUF layout for the record, the preferred first: its importer type, else the generic ones."""
    found = native(tree)
    if found is not None:
        return [found]
    return generic(tree)


def to_blocks(type_name: str, fields: dict[str, np.ndarray]) -> np.ndarray:
    return blocks.pack(type_name, fields)


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """gguf-py's own dequantization of ``raw`` blocks (uint8 ``[R, row_bytes]``)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(raw, GGMLQuantizationType[type_name])
