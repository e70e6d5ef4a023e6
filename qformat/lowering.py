"""One lowering of a record's weight tree into terms, shared by the kernel families (numpy only, no torch).

A weight tree is read as a sum of terms, each under the transforms above it::

    tree   := permute(tree) | sum(tree, ...) | scale(tree, factor) | concat(tree, ...) | term
    term   := affine(codes) | lut(codes, table) | packed | bitplanes | ternary   kind "codes"
            | vq(codes, codebooks)                                              kind "vq"
            | sparse_csr                                                        kind "sparse"
            | lowrank(a, b)                                                     kind "lowrank"
            | sign_lowrank(sign, u, v)                                          kind "signs"
    codes  := packed | bitplanes | tensor (integer)

Every node is version 1, except ``affine``, also version 2 (an additive ``offset``, lowered like scale and zero), and
``vq``, also version 2 (``vector_shape`` [p, d]: a vector is a p x d tile spanning p output rows, VPTQ's [v, 1]); a vq
term knows its ``vector_rows`` p (1 in version 1, and for a version 2 node of vector_shape [1, d], which decodes as
version 1), its codebooks are [M, K, p * d] and its codes [R / p, (C / d) * M]. A kernel that runs row vectors only
refuses ``vector_rows > 1`` in its predicate.
A ``concat`` (axis 1) lowers each part under a :class:`Columns` transform: the part's terms read the input columns
``[start, stop)`` of x (a gather, like a permutation, that narrows x to the part's width) and are as wide as their part;
a part's width is read from the record (the ``shape`` of its code leaf, vq or sparse node; :class:`Unsupported` where
the JSON does not say, e.g. a dense tensor). A kernel that does not run Columns refuses them in its predicate.
A ``scale`` is a "row" scale when a tile of its factor covers whole rows, a "column" scale when there is one factor
per input column (group [>= R, 1]: it can multiply x instead of W), else a "grid" scale.
What does not fit (dense float tensors as terms, ternary codes under affine/lut/vq, unknown codecs) raises
:class:`Unsupported` with the reason.

Two passes:

- :func:`plan` / :func:`plan_terms`: the structure alone, from the record's JSON (no tensor data), cheap enough for
  ``Kernel.supports``. Each :class:`Term` knows its ``transforms`` (outermost first), hence its input ``chain``
  (permutations and column scales) and its output ``factors`` (row and grid scales, innermost first).
- :func:`lower`: validates the record (``validate_record``), plans it, lets the kernel refuse the plan (``check``),
  then reads the data, each item once: statistics (affine scale, zero and offset, lut tables, vq codebooks, scale
  factors, low-rank matrices, outlier values), whatever their own tree, are decoded to fp32 by the reference decoder;
  permutations are checked (``check_permutation``), CSR arrays validated (:mod:`qformat.format.sparse`), code leaves
  checked as the reference decoder checks them (padding bits, ternary bytes, integer code ranges). Errors are the
  reference decoder's (same codes, same fields), with the record's name.

A kernel family keeps only its predicate ("can I run these terms") and its repacking of the lowered data; shared
helpers for both: :func:`finest_group` / :func:`fold_factors` (nested scales, e.g. NVFP4's per-tensor scale over its
block scales, as one factor grid).
Arrays are handed out as the reference decoder returns them (the decoder's ownership rule: stored tensors and their
fp32 views are read-only, computed fp32 arrays writable), never copied here: copy before writing. A permutation or
scale factor may be shared by several terms and is always read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .errors import FormatError
from .format import QuantizedTensor, bitpack, validate_record
from .format.codecs import CodecRegistry, Context, check_permutation
from .format.sparse import validate_csr

CODE_SOURCES = ("packed", "bitplanes", "tensor")  # codes of affine, lut, vq and sign_lowrank
CODE_TERMS = ("packed", "bitplanes", "ternary")  # code leaves that are terms by themselves (their values are codes)
KNOWN_VERSION = 1
# codecs with versions besides KNOWN_VERSION (affine 2: offset; vq 2: vector_shape)
KNOWN_VERSIONS = {"affine": frozenset({1, 2}), "vq": frozenset({1, 2})}


class Unsupported(Exception):
    """The tree (or its data, e.g. integer codes wider than 16 bits) uses something a kernel does not implement."""


class Param(NamedTuple):
    """A per-tile parameter: fp32 values on a grid of [gr, gc] tiles ([1, 1]: one value for the whole matrix)."""

    values: np.ndarray
    group: tuple[int, int]


@dataclass(eq=False)
class Codes:
    """An integer-code leaf. ``data`` (the stored tensor, checked) and ``top`` are filled by :func:`lower`."""

    node: dict
    path: str
    codec: str  # "packed" | "bitplanes" | "ternary" | "tensor"
    data: np.ndarray | None = None  # packed rows, bit-planes, ternary bytes or integer codes, as stored
    top: int = 0  # integer tensors: the largest code (0 when empty)

    @property
    def bits(self) -> int | None:
        """Declared code width (packed, bitplanes); None for ternary digits and integer tensors."""
        return self.node["bits"] if self.codec in ("packed", "bitplanes") else None

    @property
    def shape(self) -> tuple[int, int]:
        if self.codec == "tensor":
            assert self.data is not None
            return self.data.shape[0], self.data.shape[1]
        return self.node["shape"][0], self.node["shape"][1]

    def values(self) -> np.ndarray:
        """The integer codes [R, C], exactly as the reference decoder returns them (packed, bitplanes, tensor)."""
        assert self.data is not None, "not lowered"
        cols = self.shape[1]
        if self.codec == "packed":
            return bitpack.unpack_codes(self.data, self.node["bits"], cols, bitpack.code_dtype(self.node["bits"]))
        if self.codec == "bitplanes":
            return bitpack.unpack_bitplanes(self.data, cols, None, bitpack.code_dtype(self.node["bits"]))
        if self.codec == "tensor":
            return self.data
        raise ValueError("ternary digits are values in {-1, 0, 1}, not codes")


@dataclass(eq=False)
class Permute:
    """Input-channel permutation: the terms below read x[..., perm]."""

    node: dict
    path: str
    child: Node | None = None
    perm: np.ndarray | None = None  # int64 [C], checked (read-only)


@dataclass(eq=False)
class Columns:
    """A ``concat`` part: the terms below read x[..., start:stop], the part's block of the concat's columns."""

    node: dict  # the concat node
    path: str  # the part's path, e.g. weight/input/parts[1]
    start: int
    stop: int
    child: Node | None = None

    @property
    def index(self) -> np.ndarray:
        """The input columns the part reads, as a gather index (int64, read-only)."""
        return _frozen(np.arange(self.start, self.stop, dtype=np.int64))


@dataclass(eq=False)
class Concat:
    """Parts side by side along the columns: each a :class:`Columns` over its block."""

    node: dict
    path: str
    parts: list[Columns] = field(default_factory=list)


@dataclass(eq=False)
class Scale:
    """w = input * factor on [gr, gc] tiles; ``kind`` "row", "column" (one value per input column) or "grid"."""

    node: dict
    path: str
    kind: str
    group: tuple[int, int]
    child: Node | None = None
    factor: np.ndarray | None = None  # fp32, decoded (read-only)

    @property
    def param(self) -> Param:
        assert self.factor is not None, "not lowered"
        return Param(self.factor, self.group)


@dataclass(eq=False)
class Sum:
    """Terms summed left to right (as the reference decoder sums them)."""

    node: dict
    path: str
    terms: list[Node] = field(default_factory=list)


@dataclass(eq=False)
class Term:
    """One term of the sum, under ``transforms`` (the permutes and scales above it, outermost first)."""

    kind: str  # "codes" | "vq" | "sparse" | "lowrank" | "signs"
    node: dict
    path: str
    transforms: tuple[Permute | Scale | Columns, ...] = ()
    codes: Codes | None = None  # codes, vq: the code leaf; signs: the sign leaf
    # filled by lower(), by kind
    scale: Param | None = None  # affine
    zero: Param | None = None  # affine (None: no zero)
    offset: Param | None = None  # affine version 2: w = (q - zero) * scale + offset (None: no offset)
    table: np.ndarray | None = None  # lut: [T] or [Gr, Gc, T]
    books: np.ndarray | None = None  # vq: [M, K, p * d] (p = vector_rows; row-major over the [p, d] tile)
    vector_rows: int = 1  # vq: p, the output rows one vector spans (version 2's vector_shape [p, d]; 1 in version 1)
    row_ptr: np.ndarray | None = None  # sparse: int64 [R + 1], validated
    col_idx: np.ndarray | None = None  # sparse: int64 [nnz], validated
    values: np.ndarray | None = None  # sparse: fp32 [nnz]
    row_of: np.ndarray | None = None  # sparse: int64 [nnz], the row of every value
    a: np.ndarray | None = None  # lowrank: [R, k]
    b: np.ndarray | None = None  # lowrank: [k, C]
    u: np.ndarray | None = None  # signs: [R, k]
    v: np.ndarray | None = None  # signs: [k, C]

    @property
    def codec(self) -> str:
        return self.node["codec"]

    @property
    def chain(self) -> tuple[Permute | Scale | Columns, ...]:
        """Transforms of the input, outermost first: permutations, concat parts' column blocks and column scales."""
        return tuple(t for t in self.transforms if isinstance(t, (Permute, Columns)) or t.kind == "column")

    @property
    def width(self) -> int | None:
        """The term's own column count when it lies in a concat part (its innermost part's width), else None."""
        blocks = [t for t in self.transforms if isinstance(t, Columns)]
        return blocks[-1].stop - blocks[-1].start if blocks else None

    @property
    def factors(self) -> list[Scale]:
        """Output factors, innermost first: row and grid scales."""
        return [t for t in reversed(self.transforms) if isinstance(t, Scale) and t.kind != "column"]


Node = Permute | Scale | Sum | Concat | Columns | Term


@dataclass(eq=False)
class Plan:
    """A record's weight tree as terms: ``root`` keeps the tree (sums, permutes, scales), ``terms`` its leaves."""

    rows: int
    cols: int
    root: Node
    terms: list[Term]


@dataclass(eq=False)
class Lowered(Plan):
    """A plan with its data read and checked (:func:`lower`)."""

    name: str = ""


# ---------------------------------------------------------------------------------------------------------------
# the structural pass

def plan(record: Any) -> Plan:
    """The terms of ``record``'s weight tree, from its JSON alone; raises :class:`Unsupported` with the reason."""
    shape = record.get("shape") if isinstance(record, dict) else None
    if (not isinstance(shape, list) or len(shape) < 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise Unsupported("not a record")
    rows, cols = shape[0], 1
    for d in shape[1:]:
        cols *= d
    terms: list[Term] = []
    root = _walk(record.get("weight"), "weight", rows, cols, (), terms)
    return Plan(rows, cols, root, terms)


def plan_terms(record: Any) -> list[Term]:
    """The terms of ``record`` (see :func:`plan`)."""
    return plan(record).terms


def _codec(node: Any, path: str) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("codec"), str):
        raise Unsupported(f"{path}: not a codec node")
    version = node.get("version")
    if type(version) is not int or version not in KNOWN_VERSIONS.get(node["codec"], (KNOWN_VERSION,)):
        raise Unsupported(f"{path}: {node['codec']} version {node.get('version')!r}")
    return node["codec"]


def _group(node: dict, path: str) -> tuple[int, int]:
    value = node.get("group_shape")
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise Unsupported(f"{path}: group_shape {value!r}")
    return value[0], value[1]


def _code_leaf(node: Any, path: str, allowed: tuple[str, ...] = CODE_SOURCES) -> Codes:
    codec = _codec(node, path)
    if codec not in allowed:
        raise Unsupported(f"{path}: codes from {codec}")
    bits = node.get("bits", 1)
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise Unsupported(f"{path}: {bits!r}-bit codes")
    return Codes(node, path, codec)


def _walk(node: Any, path: str, rows: int, cols: int, above: tuple[Permute | Scale | Columns, ...],
          terms: list[Term]) -> Node:
    codec = _codec(node, path)
    if codec == "concat":
        parts = node.get("parts")
        if not isinstance(parts, list) or not parts or node.get("axis") != 1:
            raise Unsupported(f"{path}: concat without parts or along axis {node.get('axis')!r}")
        cat, start = Concat(node, path), 0
        for i, sub in enumerate(parts):
            where = f"{path}/parts[{i}]"
            width = _width(sub, where)
            item = Columns(node, where, start, start + width)
            item.child = _walk(sub, where, rows, width, above + (item,), terms)
            cat.parts.append(item)
            start += width
        if start != cols:
            raise Unsupported(f"{path}: parts {start} columns wide in {cols}")
        return cat
    if codec == "permute":
        item = Permute(node, path)
        item.child = _walk(node.get("input"), f"{path}/input", rows, cols, above + (item,), terms)
        return item
    if codec == "sum":
        parts = node.get("terms")
        if not isinstance(parts, list) or not parts:
            raise Unsupported(f"{path}: sum without terms")
        total = Sum(node, path)
        total.terms = [_walk(sub, f"{path}/terms[{i}]", rows, cols, above, terms) for i, sub in enumerate(parts)]
        return total
    if codec == "scale":
        gr, gc = _group(node, path)
        kind = "row" if gc >= cols else "column" if gc == 1 and gr >= rows else "grid"
        scale = Scale(node, path, kind, (gr, gc))
        scale.child = _walk(node.get("input"), f"{path}/input", rows, cols, above + (scale,), terms)
        return scale
    term = _term(node, codec, path)
    term.transforms = above
    terms.append(term)
    return term


def _width(node: Any, path: str) -> int:
    """A concat part's column count from its JSON (validation checks it against the data)."""
    codec = _codec(node, path)
    if codec in ("affine", "lut"):
        return _width(node.get("codes"), f"{path}/codes")
    if codec in ("permute", "scale"):
        return _width(node.get("input"), f"{path}/input")
    if codec == "sum" and isinstance(node.get("terms"), list) and node["terms"]:
        return _width(node["terms"][0], f"{path}/terms[0]")
    if codec == "concat" and isinstance(node.get("parts"), list):
        return sum(_width(sub, f"{path}/parts[{i}]") for i, sub in enumerate(node["parts"]))
    shape = node.get("shape")
    if codec in ("packed", "bitplanes", "ternary", "vq", "sparse_csr") and isinstance(shape, list) and len(shape) == 2:
        width = shape[1]
        if isinstance(width, int) and not isinstance(width, bool) and width >= 1:
            return width
    raise Unsupported(f"{path}: the width of a {codec} concat part is not in the record")


def _term(node: dict, codec: str, path: str) -> Term:
    if codec == "affine":
        _group(node, path)
        return Term("codes", node, path, codes=_code_leaf(node.get("codes"), f"{path}/codes"))
    if codec == "lut":
        if "group_shape" in node:
            _group(node, path)
        return Term("codes", node, path, codes=_code_leaf(node.get("codes"), f"{path}/codes"))
    if codec in CODE_TERMS:
        return Term("codes", node, path, codes=_code_leaf(node, path, CODE_TERMS))
    if codec == "vq":
        rows_per_vector = _vector_rows(node, path)
        return Term("vq", node, path, codes=_code_leaf(node.get("codes"), f"{path}/codes"),
                    vector_rows=rows_per_vector)
    if codec == "sparse_csr":
        return Term("sparse", node, path)
    if codec == "lowrank":
        return Term("lowrank", node, path)
    if codec == "sign_lowrank":
        return Term("signs", node, path, codes=_code_leaf(node.get("sign"), f"{path}/sign"))
    raise Unsupported(f"{path}: {codec} as a term (dense or unknown)")


def _vector_rows(node: dict, path: str) -> int:
    """p of a vq node's vector_shape [p, d] (version 2), 1 in version 1 (validation checks the rest with the data)."""
    if node["version"] == 1:
        return 1
    value = node.get("vector_shape")
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise Unsupported(f"{path}: vector_shape {value!r}")
    return value[0]


def finest_group(groups: list[tuple[int, int]], rows: int, cols: int) -> tuple[int, int] | None:
    """The tile of ``groups`` (clamped to [rows, cols]) that every other tiles exactly (its tiles nest inside
    each of theirs), or None: then their factors have no common grid no finer than one of them."""
    clamped = [(min(gr, rows), min(gc, cols)) for gr, gc in groups]
    for fr, fc in clamped:
        if all((gr == rows or gr % fr == 0) and (gc == cols or gc % fc == 0) for gr, gc in clamped):
            return fr, fc
    return None


def fold_factors(scales: list[Scale], rows: int, cols: int) -> Param:
    """The product of nested scales' factors (lowered) on their finest grid (:func:`finest_group`, which must
    exist): one factor for a kernel that applies one (e.g. NVFP4's block scales under its per-tensor scale)."""
    if len(scales) == 1:
        return scales[0].param
    group = finest_group([s.group for s in scales], rows, cols)
    if group is None:
        raise Unsupported(f"{scales[0].path}: nested scales on grids that do not nest")
    tiles = (-(-rows // group[0]), -(-cols // group[1]))
    out = np.ones(tiles, dtype=np.float32)
    for s in scales:
        values = s.param.values
        if values.shape == (1, 1):
            out *= values[0, 0]
            continue
        row_of = np.minimum(np.arange(tiles[0]) * group[0] // s.group[0], values.shape[0] - 1)
        col_of = np.minimum(np.arange(tiles[1]) * group[1] // s.group[1], values.shape[1] - 1)
        out *= values[row_of][:, col_of]
    return Param(out, group)


# ---------------------------------------------------------------------------------------------------------------
# the data pass

def lower(qt: QuantizedTensor, registry: CodecRegistry | None = None, *,
          check: Callable[[Plan], str | None] | None = None) -> Lowered:
    """Validate ``qt``, plan it, and read and check its data once (module docstring).

    ``registry``: the codecs to validate and decode statistics with (default: the format's). ``check(plan)``: the
    kernel's predicate, asked before any data is read; a reason it returns is raised as :class:`Unsupported`.
    Raises :class:`~qformat.errors.FormatError` (with the record's name) for data the reference decoder rejects.
    """
    ctx = qt.context(registry)
    validate_record(qt.name, qt.record, qt.tensor_info, ctx.registry)
    planned = plan(qt.record)
    reason = check(planned) if check is not None else None
    if reason:
        raise Unsupported(reason)
    lowered = Lowered(planned.rows, planned.cols, planned.root, planned.terms, qt.name)
    try:
        _Reader(qt, ctx).fill(lowered.root)
    except FormatError as exc:
        raise exc.at(tensor=qt.name) from None
    return lowered


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class _Reader:
    def __init__(self, qt: QuantizedTensor, ctx: Context) -> None:
        self.qt = qt
        self.ctx = ctx

    def tensor(self, node: dict, key: str) -> np.ndarray:
        return np.asarray(self.qt.tensors[node[key]])

    def value(self, value: Any, path: str) -> np.ndarray:
        """A statistic (a JSON number or a node of any tree), decoded by the reference decoder to fp32."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return np.full((1, 1), value, dtype=np.float32)
        return np.asarray(self.ctx.decode(value, path), dtype=np.float32)

    def fill(self, node: Node) -> None:
        if isinstance(node, Permute):
            perm = self.tensor(node.node, "perm").astype(np.int64)
            self.ctx.path = [node.path]
            try:
                check_permutation(self.ctx, perm)
            finally:
                self.ctx.path = []
            node.perm = _frozen(perm)
            self.fill(node.child)
        elif isinstance(node, Scale):
            node.factor = _frozen(self.value(node.node["factor"], f"{node.path}/factor"))
            self.fill(node.child)
        elif isinstance(node, Sum):
            for term in node.terms:
                self.fill(term)
        elif isinstance(node, Concat):
            for part in node.parts:
                self.fill(part)
        elif isinstance(node, Columns):
            self.fill(node.child)
        else:
            {"codes": self._codes, "vq": self._vq, "sparse": self._sparse, "lowrank": self._lowrank,
             "signs": self._signs}[node.kind](node)

    # -- terms --------------------------------------------------------------------------------------------------
    def _codes(self, term: Term) -> None:
        node, path, codec = term.node, term.path, term.codec
        assert term.codes is not None
        if codec == "affine":
            bits = node["bits"]
            self.codes(term.codes, 1 << bits, f"affine codes of {bits} bits")
            group = (node["group_shape"][0], node["group_shape"][1])
            term.scale = Param(self.value(node["scale"], f"{path}/scale"), group)
            if node.get("zero") is not None:
                term.zero = Param(self.value(node["zero"], f"{path}/zero"), group)
            if node.get("offset") is not None:
                term.offset = Param(self.value(node["offset"], f"{path}/offset"), group)
        elif codec == "lut":
            term.table = self.value(node["table"], f"{path}/table")
            entries = term.table.shape[-1]
            self.codes(term.codes, entries, f"lut with {entries} entries")
        else:
            self.codes(term.codes, None, "")

    def _vq(self, term: Term) -> None:
        assert term.codes is not None
        term.books = self.value(term.node["codebooks"], f"{term.path}/codebooks")
        entries = term.books.shape[1]
        self.codes(term.codes, entries, f"vq with {entries} entries per codebook")

    def _sparse(self, term: Term) -> None:
        node, path = term.node, term.path
        ptr = self.tensor(node, "row_ptr").astype(np.int64)
        idx = self.tensor(node, "col_idx").astype(np.int64)
        term.row_of = validate_csr(ptr, idx, node["shape"][1],
                                   lambda code, message, fld: FormatError(code, message, field=f"{path}/{fld}"))
        term.row_ptr, term.col_idx = ptr, idx
        term.values = self.value(node["values"], f"{path}/values").reshape(-1)

    def _lowrank(self, term: Term) -> None:
        term.a = self.value(term.node["a"], f"{term.path}/a")
        term.b = self.value(term.node["b"], f"{term.path}/b")

    def _signs(self, term: Term) -> None:
        assert term.codes is not None
        self.codes(term.codes, 2, "sign")
        term.u = self.value(term.node["u"], f"{term.path}/u")
        term.v = self.value(term.node["v"], f"{term.path}/v")

    # -- code leaves: the reference decoder's data checks -------------------------------------------------------
    def codes(self, codes: Codes, bound: int | None, what: str) -> None:
        """Load a code leaf and check what only its data can tell; ``bound``: the exclusive code limit its consumer
        needs (packed and bit-plane codes are within it by validation; integer tensors are checked here)."""
        node, path = codes.node, codes.path
        data = self.tensor(node, "tensor")
        if codes.codec == "packed":
            if not bitpack.padding_bits_are_zero(data, node["bits"], node["shape"][1]):
                raise FormatError("nonzero_padding", "padding bits after the last code of a row must be zero",
                                  field=f"{path}/tensor")
        elif codes.codec == "bitplanes":
            for p in range(data.shape[0]):
                if not bitpack.padding_bits_are_zero(data[p], 1, node["shape"][1]):
                    raise FormatError("nonzero_padding", f"padding bits of plane {p} must be zero",
                                      field=f"{path}/tensor")
        elif codes.codec == "ternary":
            if not _ternary_valid(data, node["shape"][1]):
                raise FormatError("code_out_of_range", "ternary bytes must be < 243 with zero pad digits",
                                  field=f"{path}/tensor")
        elif data.size:
            lo, hi = int(data.min()), int(data.max())
            if bound is not None and (lo < 0 or hi >= bound):
                raise FormatError("code_out_of_range", f"{what}: codes must lie in [0, {bound}), found [{lo}, {hi}]",
                                  field=path)
            codes.top = hi
        codes.data = data


def _ternary_valid(packed: np.ndarray, cols: int) -> bool:
    """Every byte < 3**5 and the pad digits of each row's last byte zero (``bitpack.unpack_ternary``'s test)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if not packed.size:
        return True
    used = cols - (packed.shape[1] - 1) * bitpack.TRITS_PER_BYTE  # digits in use in the last byte
    return bool(np.all(packed < 243)) and bool(np.all(packed[:, -1] < 3 ** used))
