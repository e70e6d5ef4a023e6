"""Reading a record's tree for the exporters: decode any node of it with the format's own codecs, and take an
``affine`` node apart into its integer codes and its scale, zero and offset per tile, so an exporter can decide, by
construction, whether a target layout expresses the record exactly (the exporters then check that decision by
dequantizing what they wrote with the target's own library).

Parameters are read as the reference decoder reads them (``_param`` in ``qformat/format/codecs.py``): a JSON number
is a ``[1, 1]`` constant, a node is decoded and converted to fp32. :meth:`Affine.per_block` re-tiles a parameter grid
to the blocks of a target layout (``width`` consecutive columns of one row): a group of any shape ``[gr, gc]`` is
the same values repeated over rows and columns, so it re-tiles exactly when no block straddles two groups with
different values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qformat.format import signature
from qformat.plugin import CORE_CODECS, CodecRegistry, FormatError, QuantizedTensor


class NotExpressible(Exception):
    """The target cannot hold this record (or this node of it) exactly; the message says why."""


class Tree:
    """One record opened for reading its nodes (validated once, as the reference decoder validates it)."""

    def __init__(self, qt: QuantizedTensor, registry: CodecRegistry = CORE_CODECS) -> None:
        self.qt = qt
        self.registry = registry
        self.weight: dict[str, Any] = qt.record["weight"]
        self.shape = tuple(int(d) for d in qt.record["shape"])
        self.ctx = qt.context(registry)
        self.ctx.infer(self.weight, "weight")
        self.signature = signature(self.weight)

    @property
    def name(self) -> str:
        return self.qt.name

    def decode(self, node: Any, fld: str) -> np.ndarray:
        """A node's output (int codes or fp32 values), as the reference decoder computes it."""
        try:
            return self.ctx.decode(node, fld)
        except FormatError as exc:
            raise NotExpressible(f"field {fld!r} does not decode: {exc}") from None

    def kind(self, node: Any) -> str:
        return self.ctx.info_of(node, "node").kind

    def values(self, value: Any, fld: str) -> np.ndarray | None:
        """A parameter (``scale``, ``zero``, ``offset``, ``factor``) as its fp32 grid; None when absent."""
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return np.full((1, 1), value, dtype=np.float32)
        return np.asarray(self.decode(value, fld), dtype=np.float32)

    def stored(self, node: Any) -> np.ndarray | None:
        """The stored array of a ``tensor`` leaf (its own dtype), or None for any other node."""
        if isinstance(node, dict) and node.get("codec") == "tensor":
            return np.asarray(self.ctx.load(node, "tensor"))
        return None

    def reference(self) -> np.ndarray:
        """The record's fp32 reference decode."""
        return self.qt.decode(self.registry)


@dataclass
class Affine:
    """An ``affine`` node taken apart: ``codes`` [R, C] (unsigned ints), its ``bits``, the tile ``group`` and the
    fp32 parameter grids (``zero`` and ``offset`` None when absent)."""

    codes: np.ndarray
    bits: int
    group: tuple[int, int]
    scale: np.ndarray
    zero: np.ndarray | None
    offset: np.ndarray | None
    version: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def per_block(self, grid: np.ndarray, width: int, what: str) -> np.ndarray:
        """``grid`` (over tiles of ``group``) as one value per row and block of ``width`` columns: fp32
        ``[R, C // width]``. Raises :class:`NotExpressible` when a block holds two different values."""
        return per_block(grid, self.group, self.shape, width, what)


def per_block(grid: np.ndarray, group: tuple[int, int], shape: tuple[int, int], width: int, what: str) -> np.ndarray:
    rows, cols = shape
    if cols % width:
        raise NotExpressible(f"rows of {cols} columns are not whole blocks of {width}")
    grid = np.asarray(grid, dtype=np.float32)
    blocks = cols // width
    if grid.shape == (1, 1):
        return np.full((rows, blocks), grid[0, 0], dtype=np.float32)
    gr, gc = group
    tile = np.arange(cols, dtype=np.int64).reshape(blocks, width) // gc
    if (tile == tile[:, :1]).all():
        per_col = grid[:, tile[:, 0]]
    else:
        spread = grid[:, tile]  # [G_rows, blocks, width]
        bits = spread.view(np.uint32)
        if not (bits == bits[..., :1]).all():
            raise NotExpressible(f"the {what} changes inside blocks of {width} columns (groups of {gc} columns)")
        per_col = spread[..., 0]
    if gr == 1 and per_col.shape[0] == rows:
        return np.ascontiguousarray(per_col)
    return np.ascontiguousarray(per_col[np.arange(rows) // gr])


def affine_parts(tree: Tree, node: dict[str, Any]) -> Affine:
    """Take an ``affine`` node apart; :class:`NotExpressible` for any other node or non-integer codes."""
    if not isinstance(node, dict) or node.get("codec") != "affine":
        raise NotExpressible(f"the tree is {tree.signature}, not an affine map of integer codes")
    if tree.kind(node["codes"]) != "int":
        raise NotExpressible("the affine codes are not integers")
    codes = np.asarray(tree.decode(node["codes"], "codes"))
    if codes.ndim != 2:
        raise NotExpressible(f"the affine codes are {codes.ndim}-D")
    return Affine(codes, int(node["bits"]), tuple(int(v) for v in node["group_shape"]),
                  tree.values(node.get("scale"), "scale"), tree.values(node.get("zero"), "zero"),
                  tree.values(node.get("offset"), "offset"), int(node.get("version", 1)))


def f16_exact(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` (fp32) as float16, raising :class:`NotExpressible` unless every value survives the round trip bit
    for bit (NaN payloads included)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        half = values.astype(np.float16)
    if not np.array_equal(half.astype(np.float32).view(np.uint32), values.view(np.uint32)):
        bad = int(np.count_nonzero(half.astype(np.float32).view(np.uint32) != values.view(np.uint32)))
        raise NotExpressible(f"{bad} {what} value(s) are not exactly representable in fp16")
    return half


def integer_valued(values: np.ndarray, what: str) -> np.ndarray:
    """fp32 ``values`` that must all be integers: as int32."""
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all() or not np.array_equal(np.round(values), values) or (
            values.size and np.abs(values).max() > 1 << 24):
        raise NotExpressible(f"the {what} is not an integer (a float zero point)")
    return values.astype(np.int32)
