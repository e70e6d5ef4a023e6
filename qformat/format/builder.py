"""Build records in format terms. Methods call these instead of writing JSON by hand.

    b = RecordBuilder("model.layers.0.mlp.up_proj.weight", shape=(1536, 576), dtype="BF16")
    codes = b.packed("codes", q, bits=4)
    node = b.affine(codes, scale=b.tensor("scale", s.astype(np.float16)), zero=b.tensor("zero", z), bits=4,
                    group_shape=(1, 128))
    qt = b.finish(node)          # QuantizedTensor: record + tensors, validated

Every tensor is stored as ``<name>.<role>``; roles must be unique within a record.

A node of any codec, a plugin's included, is built with :meth:`RecordBuilder.node`; ``finish`` validates the tree
against the builder's ``registry`` (the core codecs unless given one that also holds the plugin's codecs):

    b = RecordBuilder(name, shape, registry=my_codecs)       # my_codecs = CORE_CODECS.copy() + your codecs
    node = b.node("rotate.hadamard", 1, input=inner, signs=b.store("signs", signs), block=64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import FormatError
from . import bitpack
from .codecs import CORE_CODECS, CodecRegistry
from .dtypes import WEIGHT_DTYPES, dtype_name
from .qfile import QuantizedTensor
from .record import matrix_shape, validate_record

Node = dict[str, Any]
Value = Node | float | int


def _node(codec: str, version: int = 1, **fields: Any) -> Node:
    return {"codec": codec, "version": version, **{k: v for k, v in fields.items() if v is not None}}


class RecordBuilder:
    def __init__(self, name: str, shape: Sequence[int], dtype: str = "F32",
                 registry: CodecRegistry = CORE_CODECS) -> None:
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(WEIGHT_DTYPES)}, got {dtype!r}")
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.matrix_shape = matrix_shape(self.shape)
        self.dtype = dtype
        self.registry = registry
        self.tensors: dict[str, np.ndarray] = {}

    # -- any codec ----------------------------------------------------------------------------------------------
    def node(self, codec: str, version: int, **fields: Any) -> Node:
        """A node of ``codec`` (core or plugin) at ``version`` with the given fields (None values are left out).

        Children are nodes, tensors are names from :meth:`store`. Nothing is checked here: :meth:`finish` validates
        the whole tree against this builder's registry.
        """
        if not isinstance(codec, str) or type(version) is not int:
            raise TypeError(f"node(codec, version, **fields) takes a codec name and an integer version, got "
                            f"{codec!r}, {version!r}")
        return _node(codec, version, **fields)

    # -- leaves -------------------------------------------------------------------------------------------------
    def store(self, role: str, array: np.ndarray) -> str:
        key = f"{self.name}.{role}"
        if key in self.tensors:
            raise ValueError(f"role {role!r} is used twice in record {self.name!r}")
        array = np.ascontiguousarray(array)
        dtype_name(array)  # raises for dtypes safetensors cannot hold
        self.tensors[key] = array
        return key

    def tensor(self, role: str, array: np.ndarray) -> Node:
        """A stored tensor used as is (floats decode to fp32, integers stay integers)."""
        return _node("tensor", tensor=self.store(role, array))

    def packed(self, role: str, codes: np.ndarray, bits: int) -> Node:
        codes = np.asarray(codes)
        return _node("packed", tensor=self.store(role, bitpack.pack_codes(codes, bits)), bits=bits,
                     shape=list(codes.shape))

    def bitplanes(self, role: str, codes: np.ndarray, bits: int) -> Node:
        codes = np.asarray(codes)
        return _node("bitplanes", tensor=self.store(role, bitpack.pack_bitplanes(codes, bits)), bits=bits,
                     shape=list(codes.shape))

    def ternary(self, role: str, values: np.ndarray) -> Node:
        values = np.asarray(values)
        return _node("ternary", tensor=self.store(role, bitpack.pack_ternary(values)), shape=list(values.shape))

    # -- value maps ---------------------------------------------------------------------------------------------
    def affine(self, codes: Node, *, scale: Value, zero: Value | None = None, bits: int,
               group_shape: Sequence[int], offset: Value | None = None) -> Node:
        """``((q - zero) * scale) + offset`` per tile. Version 2 only with an ``offset`` (GGUF's ``d * q + m``), so
        every other node stays readable by version-1 readers (spec/README.md, versioning rule 4)."""
        return _node("affine", 2 if offset is not None else 1, codes=codes, bits=bits, scale=scale, zero=zero,
                     offset=offset, group_shape=list(group_shape))

    def lut(self, codes: Node, table: Node, group_shape: Sequence[int] | None = None) -> Node:
        return _node("lut", codes=codes, table=table, group_shape=list(group_shape) if group_shape else None)

    def scale(self, inner: Node, factor: Node, group_shape: Sequence[int]) -> Node:
        return _node("scale", input=inner, factor=factor, group_shape=list(group_shape))

    def vq(self, codes: Node, codebooks: Node, shape: Sequence[int] | None = None,
           vector_shape: Sequence[int] | None = None) -> Node:
        """Additive vector codebooks. Vectors along rows ([1, d], d from the codebooks) are version 1; a
        ``vector_shape`` [p, d] with p > 1 (VPTQ's [v, 1] along output features, AQLM's [og, ig]) is version 2,
        with codebooks [M, K, p*d] and codes [R / p, (C / d) * M] (spec/components.md, vq)."""
        shape = list(shape or self.matrix_shape)
        if vector_shape is None:
            return _node("vq", codes=codes, codebooks=codebooks, shape=shape)
        p, d = (int(v) for v in vector_shape)
        stored = self.tensors.get(codebooks.get("tensor")) if codebooks.get("codec") == "tensor" else None
        if stored is not None and (stored.ndim != 3 or stored.shape[2] != p * d):
            raise ValueError(f"vector_shape {[p, d]} needs codebooks [M, K, {p * d}], got {list(stored.shape)}")
        if p == 1:  # the lowest version that expresses it (spec/README.md, versioning rule 4)
            return _node("vq", codes=codes, codebooks=codebooks, shape=shape)
        return _node("vq", 2, codes=codes, codebooks=codebooks, shape=shape, vector_shape=[p, d])

    # -- additive parts and transforms -------------------------------------------------------------------------
    def sparse_csr(self, role: str, row_ptr: np.ndarray, col_idx: np.ndarray, values: Node | np.ndarray,
                   shape: Sequence[int] | None = None) -> Node:
        if isinstance(values, np.ndarray):
            values = self.tensor(f"{role}.values", values)
        return _node("sparse_csr", row_ptr=self.store(f"{role}.row_ptr", np.asarray(row_ptr, dtype=np.int32)),
                     col_idx=self.store(f"{role}.col_idx", col_idx), values=values,
                     shape=list(shape or self.matrix_shape))

    def sparse_from_dense(self, role: str, dense: np.ndarray, value_dtype: Any = np.float16) -> Node:
        """CSR of the nonzeros of a dense matrix (zeros are not stored)."""
        rows, cols = np.nonzero(dense)
        row_ptr = np.zeros(dense.shape[0] + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=row_ptr[1:])
        idx_dtype = np.uint16 if dense.shape[1] <= 65536 else np.int32
        return self.sparse_csr(role, row_ptr, cols.astype(idx_dtype), dense[rows, cols].astype(value_dtype),
                               dense.shape)

    def lowrank(self, a: Node, b: Node) -> Node:
        return _node("lowrank", a=a, b=b)

    def sign_lowrank(self, sign: Node, u: Node, v: Node) -> Node:
        return _node("sign_lowrank", sign=sign, u=u, v=v)

    def sum(self, terms: Sequence[Node]) -> Node:
        return terms[0] if len(terms) == 1 else _node("sum", terms=list(terms))

    def permute(self, inner: Node, perm: np.ndarray, role: str = "perm") -> Node:
        perm = np.asarray(perm)
        perm_dtype = np.uint16 if perm.shape[0] <= 65536 else np.int32
        return _node("permute", input=inner, perm=self.store(role, perm.astype(perm_dtype)))

    def reshape(self, inner: Node, shape: Sequence[int] | None = None) -> Node:
        """The input's elements in row-major order laid out as ``shape`` (default: the record's matrix shape), for
        groups that run along the flattened weight: build ``inner`` over the shape whose tiles they are."""
        return _node("reshape", input=inner, shape=list(shape or self.matrix_shape))

    def concat(self, parts: Sequence[Node]) -> Node:
        """Float parts [R, C_k] side by side along the columns: [R, sum C_k] (mixed widths per column group, under
        a ``permute`` that puts the groups back in place). One part is returned as is (the lowest form)."""
        return parts[0] if len(parts) == 1 else _node("concat", parts=list(parts), axis=1)

    # -- finishing ----------------------------------------------------------------------------------------------
    def finish(self, weight: Node, info: dict[str, Any] | None = None) -> QuantizedTensor:
        """Close the record: compute storage_bytes from the real tensors and validate the whole tree."""
        record: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype, "storage_bytes": 0,
                                  "weight": weight}
        if info:
            record["info"] = info
        built = QuantizedTensor(self.name, record, dict(self.tensors))
        walk = built.context(self.registry)  # only the walk, to list what the tree references
        walk.infer(weight, "weight")
        unused = sorted(set(self.tensors) - set(walk.referenced))
        if unused:
            raise FormatError("bad_record", f"tensor {unused[0]!r} was stored but no node references it",
                              tensor=self.name)
        record["storage_bytes"] = sum(a.nbytes for a in self.tensors.values())
        validate_record(self.name, record, built.tensor_info, self.registry)
        return built
