"""The spec (spec/), its JSON Schema and the reference implementation (qformat.format) agree.

Checks: the schema is a valid 2020-12 schema and rejects what the spec forbids; every JSON example in spec/*.md
validates; records built by RecordBuilder for every codec validate; codec names agree across schema, registry and
components.md; error codes agree between the code and errors.md; byte-level examples match both the reference packer
and an independent implementation of the spec's bit rules written here; full record examples decode with the
reference decoder to the values an independent decoder (written from the spec text, below) computes.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ml_dtypes
import numpy as np
import pytest

from qformat.errors import FormatError, UnknownCodecError
from qformat.format import (
    CORE_CODECS,
    QuantizedTensor,
    RecordBuilder,
    TensorInfo,
    bitpack,
    decode_record,
    ternary_dict,
    validate_record,
    write_file,
)
from qformat.format.dtypes import NUMPY_BY_NAME, dtype_name

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"
FORMAT_SRC = ROOT / "qformat" / "format"
SCHEMA = json.loads((SPEC / "record.schema.json").read_text())
CORE = {name for name, (_, owner) in CORE_CODECS.names().items() if owner == "qformat"}
FP32_U = 2.0 ** -24


# ---------------------------------------------------------------------------------------------------------------
# spec parsing helpers

def fenced(path: Path, tag: str) -> list[str]:
    return re.findall(rf"^```{tag}\n(.*?)^```", path.read_text(), re.S | re.M)


def spec_docs() -> list[Path]:
    return sorted(SPEC.glob("*.md"))


def json_examples() -> list[tuple[str, Any]]:
    return [(f"{p.name}#{i}", json.loads(text)) for p in spec_docs() for i, text in enumerate(fenced(p, "json"))]


def kind_of(example: Any) -> str | None:
    if not isinstance(example, dict):
        return None
    if "records" in example and "format_version" in example:
        return "metadata"
    if "quant_method" in example:
        return "quantization_config"
    if "weight" in example and "shape" in example:
        return "record"
    if "codec" in example:
        return "node"
    return None


def record_examples_with_tensors() -> list[tuple[str, dict, dict[str, tuple[str, tuple[int, ...]]]]]:
    """Record examples immediately followed by a ```tensors block (name dtype shape per line)."""
    out = []
    for path in spec_docs():
        text = path.read_text()
        pattern = r"^```json\n(.*?)^```\s*\n+^```tensors\n(.*?)^```"
        for i, (record_text, tensors_text) in enumerate(re.findall(pattern, text, re.S | re.M)):
            tensors = {}
            for line in tensors_text.strip().splitlines():
                name, dtype, shape = line.split(" ", 2)
                tensors[name] = (dtype, tuple(json.loads(shape)))
            out.append((f"{path.name}#{i}", json.loads(record_text), tensors))
    return out


def validator(defn: str | None = None) -> jsonschema.Draft202012Validator:
    schema = SCHEMA if defn is None else {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"],
                                          "$ref": f"#/$defs/{defn}"}
    return jsonschema.Draft202012Validator(schema)


VALIDATORS = {"metadata": validator(), "record": validator("record"), "node": validator("node"),
              "quantization_config": validator("quantization_config")}


def walk_nodes(node: Any) -> Iterator[dict]:
    if isinstance(node, dict) and "codec" in node:
        yield node
        for key, value in node.items():
            if key in ("terms", "parts"):
                for term in value:
                    yield from walk_nodes(term)
            elif isinstance(value, dict):
                yield from walk_nodes(value)


# ---------------------------------------------------------------------------------------------------------------
# an independent decoder, written from spec/components.md (not from qformat.format)

def stream_codes(row: np.ndarray, bits: int, cols: int) -> list[int]:
    """Spec bit stream: stream bit k is bit k % 8 of byte k // 8; codes LSB first; padding must be zero."""
    stream = int.from_bytes(bytes(np.asarray(row, dtype=np.uint8)), "little")
    assert stream >> (cols * bits) == 0, "nonzero padding"
    return [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(cols)]


def stream_bytes(codes: list[int], bits: int) -> bytes:
    stream = sum(int(c) << (j * bits) for j, c in enumerate(codes))
    return stream.to_bytes((len(codes) * bits + 7) // 8, "little")


def ternary_bytes(values: list[int]) -> bytes:
    digits = [v + 1 for v in values] + [0] * (-len(values) % 5)
    return bytes(sum(d * 3 ** i for i, d in enumerate(digits[k:k + 5])) for k in range(0, len(digits), 5))


def grid(params: np.ndarray, group: list[int], shape: tuple[int, int]) -> np.ndarray:
    if params.shape == (1, 1):
        return np.broadcast_to(params, shape)
    rows = np.arange(shape[0]) // group[0]
    cols = np.arange(shape[1]) // group[1]
    return params[rows[:, None], cols[None, :]]


def as_f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float32)


class SpecDecoder:
    """Decodes a node tree following the spec's formulas; matrix products in float64 (then rounded)."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors
        self.has_product = False

    def value(self, v: Any) -> np.ndarray:
        if isinstance(v, (int, float)):
            return np.full((1, 1), np.float32(np.float64(v)))
        return as_f32(self(v))

    def __call__(self, node: dict) -> np.ndarray:
        return getattr(self, "d_" + node["codec"])(node)

    def d_tensor(self, node: dict) -> np.ndarray:
        t = self.tensors[node["tensor"]]
        return as_f32(t) if t.dtype.kind == "f" or t.dtype == ml_dtypes.bfloat16 else t.astype(np.int64)

    def d_packed(self, node: dict) -> np.ndarray:
        rows, cols = node["shape"]
        data = self.tensors[node["tensor"]]
        return np.array([stream_codes(data[r], node["bits"], cols) for r in range(rows)], dtype=np.int64)

    def d_bitplanes(self, node: dict) -> np.ndarray:
        rows, cols = node["shape"]
        bits, planes = node["bits"], self.tensors[node["tensor"]]
        out = np.zeros((rows, cols), dtype=np.int64)
        for p in range(bits):
            plane = np.array([stream_codes(planes[p, r], 1, cols) for r in range(rows)], dtype=np.int64)
            out += plane << (bits - 1 - p)
        return out

    def d_ternary(self, node: dict) -> np.ndarray:
        rows, cols = node["shape"]
        data = self.tensors[node["tensor"]]
        out = np.zeros((rows, cols), dtype=np.int64)
        for r in range(rows):
            for j, byte in enumerate(data[r]):
                assert byte < 243
                for i in range(5):
                    if 5 * j + i < cols:
                        out[r, 5 * j + i] = (int(byte) // 3 ** i) % 3 - 1
        return out

    def d_ternary_dict(self, node: dict) -> np.ndarray:
        """Per the spec: codewords index the dictionary whose bytes hash to the SHA-256 components.md gives."""
        stated = re.search(r"SHA-256\s+`([0-9a-f]{64})`", (ROOT / "spec" / "components.md").read_text()).group(1)
        assert ternary_dict.digest() == stated
        symbols, lengths = ternary_dict.dictionary()
        rows, cols = node["shape"]
        words, ptr = self.tensors[node["tensor"]], self.tensors[node["row_ptr"]]
        out = np.zeros((rows, cols), dtype=np.int64)
        for r in range(rows):
            pairs = [int(p) for w in words[int(ptr[r]):int(ptr[r + 1])] for p in symbols[w, :lengths[w]]]
            assert len(pairs) == -(-cols // 2)
            flat = [v for p in pairs for v in (p % 3, p // 3)]
            assert len(flat) == cols or flat[-1] == 0  # the pad weight of an odd row is symbol 0
            out[r] = flat[:cols]
        return out

    def d_affine(self, node: dict) -> np.ndarray:
        q = self(node["codes"])
        assert q.min() >= 0 and q.max() < 1 << node["bits"]
        scale = grid(self.value(node["scale"]), node["group_shape"], q.shape)
        w = q.astype(np.float32)
        if "zero" in node:
            w = w - grid(self.value(node["zero"]), node["group_shape"], q.shape)
        w = w * scale
        if "offset" in node:  # version 2: added after the product, a rounding of its own
            w = w + grid(self.value(node["offset"]), node["group_shape"], q.shape)
        return w

    def d_lut(self, node: dict) -> np.ndarray:
        q, table = self(node["codes"]), as_f32(self(node["table"]))
        assert q.min() >= 0 and q.max() < table.shape[-1]
        if table.ndim == 1:
            return table[q]
        gr, gc = node["group_shape"]
        rows = np.arange(q.shape[0])[:, None] // gr if table.shape[0] > 1 else np.zeros((q.shape[0], 1), int)
        cols = np.arange(q.shape[1])[None, :] // gc if table.shape[1] > 1 else np.zeros((1, q.shape[1]), int)
        return table[rows, cols, q]

    def d_scale(self, node: dict) -> np.ndarray:
        x = as_f32(self(node["input"]))
        return x * grid(as_f32(self(node["factor"])), node["group_shape"], x.shape)

    def d_vq(self, node: dict) -> np.ndarray:
        rows, cols = node["shape"]
        books, q = as_f32(self(node["codebooks"])), self(node["codes"])
        m, _, width = books.shape
        p, d = node.get("vector_shape", [1, width])  # version 2: p x d tiles, entries row-major
        out = np.zeros((rows, cols), dtype=np.float32)
        for i in range(rows // p):
            for j in range(cols // d):
                acc = books[0][q[i, j * m]]
                for k in range(1, m):
                    acc = acc + books[k][q[i, j * m + k]]
                out[i * p:(i + 1) * p, j * d:(j + 1) * d] = acc.reshape(p, d)
        return out

    def d_sparse_csr(self, node: dict) -> np.ndarray:
        rows, cols = node["shape"]
        ptr, idx = self.tensors[node["row_ptr"]], self.tensors[node["col_idx"]]
        values = as_f32(self(node["values"]))
        out = np.zeros((rows, cols), dtype=np.float32)
        for r in range(rows):
            for i in range(int(ptr[r]), int(ptr[r + 1])):
                out[r, int(idx[i])] = values[i]
        return out

    def product(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        self.has_product = True
        return (as_f32(a).astype(np.float64) @ as_f32(b).astype(np.float64)).astype(np.float32)

    def d_lowrank(self, node: dict) -> np.ndarray:
        return self.product(self(node["a"]), self(node["b"]))

    def d_sign_lowrank(self, node: dict) -> np.ndarray:
        sign = self(node["sign"])
        magnitude = self.product(self(node["u"]), self(node["v"]))
        return np.where(sign == 1, magnitude, -magnitude)

    def d_sum(self, node: dict) -> np.ndarray:
        out = as_f32(self(node["terms"][0]))
        for term in node["terms"][1:]:
            out = out + as_f32(self(term))
        return out

    def d_permute(self, node: dict) -> np.ndarray:
        x = as_f32(self(node["input"]))
        perm = self.tensors[node["perm"]].astype(np.int64)
        assert sorted(perm.tolist()) == list(range(x.shape[1]))
        out = np.empty_like(x)
        out[:, perm] = x
        return out

    def d_concat(self, node: dict) -> np.ndarray:
        assert node["axis"] == 1 and 1 <= len(node["parts"]) <= 64
        parts = [self(p) for p in node["parts"]]
        assert all(p.dtype == np.float32 and p.ndim == 2 and p.shape[0] == parts[0].shape[0] for p in parts)
        out = np.empty((parts[0].shape[0], sum(p.shape[1] for p in parts)), dtype=np.float32)
        offset = 0
        for part in parts:  # w[r, o_k + j] = part_k[r, j], column by column
            for j in range(part.shape[1]):
                out[:, offset + j] = part[:, j]
            offset += part.shape[1]
        return out

    def d_reshape(self, node: dict) -> np.ndarray:
        x = as_f32(self(node["input"]))
        rows, cols = node["shape"]
        assert x.ndim == 2 and x.size == rows * cols
        flat = [x[k // x.shape[1], k % x.shape[1]] for k in range(rows * cols)]  # row-major, element by element
        return np.array(flat, dtype=np.float32).reshape(rows, cols)


def assert_decodes_like_spec(qt: QuantizedTensor) -> np.ndarray:
    reference = qt.decode()
    spec = SpecDecoder(qt.tensors)
    expected = spec(qt.record["weight"]).reshape(qt.record["shape"])
    assert reference.dtype == np.float32 and reference.shape == tuple(qt.record["shape"])
    if spec.has_product:  # matrix products: the spec allows any summation order (composition.md)
        np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    else:
        np.testing.assert_array_equal(reference.view(np.uint32), expected.view(np.uint32))
    return reference


# ---------------------------------------------------------------------------------------------------------------
# building valid tensors for the spec's record examples

def make_tensors(record: dict, listed: dict[str, tuple[str, tuple[int, ...]]],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid contents for every tensor the record references, of the dtype and shape the example lists."""
    out: dict[str, np.ndarray] = {}

    def last_dim(node: dict, axis: int) -> int:
        return listed[node["tensor"]][1][axis]

    def put(name: str, array: np.ndarray) -> None:
        dtype, shape = listed[name]
        assert dtype_name(array) == dtype and array.shape == shape, (name, dtype_name(array), array.shape, listed[name])
        out[name] = array

    def fill(node: dict, bound: int | None) -> None:
        codec = node["codec"]
        if codec == "tensor":
            dtype, shape = listed[node["tensor"]]
            np_dtype = NUMPY_BY_NAME[dtype]
            if dtype in ("F16", "BF16", "F32", "F64"):
                array = (rng.standard_normal(shape) * 0.5).astype(np_dtype)
            elif bound is not None:
                array = rng.integers(0, bound, size=shape).astype(np_dtype)
            else:
                array = rng.integers(-2, 3, size=shape).astype(np_dtype)
            put(node["tensor"], array)
        elif codec in ("packed", "bitplanes"):
            limit = min(1 << node["bits"], bound or 1 << node["bits"])
            codes = rng.integers(0, limit, size=node["shape"])
            pack = bitpack.pack_codes if codec == "packed" else bitpack.pack_bitplanes
            put(node["tensor"], pack(codes, node["bits"]))
        elif codec == "ternary":
            put(node["tensor"], bitpack.pack_ternary(rng.integers(-1, 2, size=node["shape"])))
        elif codec == "affine":
            fill(node["codes"], 1 << node["bits"])
            for key in ("scale", "zero", "offset"):
                if isinstance(node.get(key), dict):
                    fill(node[key], None)
        elif codec == "lut":
            fill(node["table"], None)
            fill(node["codes"], last_dim(node["table"], -1))
        elif codec == "vq":
            fill(node["codebooks"], None)
            fill(node["codes"], last_dim(node["codebooks"], 1))
        elif codec == "sparse_csr":
            rows, cols = node["shape"]
            nnz = listed[node["col_idx"]][1][0]
            flat = np.sort(rng.choice(rows * cols, size=nnz, replace=False))
            ptr = np.zeros(rows + 1, dtype=NUMPY_BY_NAME[listed[node["row_ptr"]][0]])
            np.cumsum(np.bincount(flat // cols, minlength=rows), out=ptr[1:])
            put(node["row_ptr"], ptr)
            put(node["col_idx"], (flat % cols).astype(NUMPY_BY_NAME[listed[node["col_idx"]][0]]))
            fill(node["values"], None)
        elif codec == "permute":
            n = listed[node["perm"]][1][0]
            put(node["perm"], rng.permutation(n).astype(NUMPY_BY_NAME[listed[node["perm"]][0]]))
            fill(node["input"], None)
        else:
            children = (node["terms"] if codec == "sum" else node["parts"] if codec == "concat"
                        else [v for v in node.values() if isinstance(v, dict)])
            for child in children:
                fill(child, 2 if codec == "sign_lowrank" and child is node["sign"] else None)

    fill(record["weight"], None)
    return out


def record_name(tensor_names: list[str]) -> str:
    parts = [n.split(".") for n in tensor_names]
    common = []
    for column in zip(*parts, strict=False):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    return ".".join(common)


# ---------------------------------------------------------------------------------------------------------------
# (1) the schema itself

def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for defn in SCHEMA["$defs"]:
        jsonschema.Draft202012Validator.check_schema({"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{defn}"})


GOOD_NODE = {"codec": "affine", "version": 1, "bits": 4, "group_shape": [1, 32], "zero": 8,
             "codes": {"codec": "packed", "version": 1, "tensor": "w.codes", "bits": 4, "shape": [4, 64]},
             "scale": {"codec": "tensor", "version": 1, "tensor": "w.scale"}}


@pytest.mark.parametrize("mutate", [
    lambda n: n.update(version=3),
    lambda n: n.update(offset=0.5),
    lambda n: n.update(version=2, offset="0.5"),
    lambda n: n.update(version=2, offset=1e39),
    lambda n: n.update(version=True),
    lambda n: n.update(extra=1),
    lambda n: n.pop("scale"),
    lambda n: n.update(bits=17),
    lambda n: n.update(group_shape=[1, 0]),
    lambda n: n.update(zero="8"),
    lambda n: n.update(zero=1e39),
    lambda n: n["codes"].update(codec="packd"),
    lambda n: n["codes"].update(bits=0),
    lambda n: n["codes"].pop("version"),
    lambda n: n["scale"].update(tensor=""),
    lambda n: n.update(codes={"codec": "sum", "version": 1, "terms": []}),
    lambda n: n.update(codec="acme.thing", version=0),
], ids=["version3", "v1_offset", "offset_string", "offset_overflows_fp32", "version_bool", "unknown_field", "missing_scale", "bits17", "group0", "zero_string",
        "zero_overflows_fp32", "dotless_unknown_codec", "bits0", "no_version", "empty_name", "empty_sum",
        "plugin_version0"])
def test_schema_rejects_what_the_spec_forbids(mutate: Callable[[dict], Any]):
    assert VALIDATORS["node"].is_valid(GOOD_NODE)
    node = copy.deepcopy(GOOD_NODE)
    mutate(node)
    assert not VALIDATORS["node"].is_valid(node)


def test_schema_affine_version_2_adds_offset():
    for offset in (0.5, -3, {"codec": "tensor", "version": 1, "tensor": "w.m"}):
        assert VALIDATORS["node"].is_valid({**GOOD_NODE, "version": 2, "offset": offset})
    assert VALIDATORS["node"].is_valid({**GOOD_NODE, "version": 2})  # the offset is optional in version 2


def test_schema_plugin_escape_hatch():
    plugin = {"codec": "acme.qmoe_dict", "version": 3, "stream": "w.stream", "anything": [1, 2]}
    assert VALIDATORS["node"].is_valid(plugin)
    assert VALIDATORS["node"].is_valid({**GOOD_NODE, "codes": {**plugin}})
    # a core name never falls through to the hatch, whatever its fields
    assert not VALIDATORS["node"].is_valid({"codec": "packed", "version": 1, "stream": "w.stream"})


def test_schema_record_and_metadata_envelopes():
    record = {"shape": [4, 64], "dtype": "F16", "storage_bytes": 136, "weight": GOOD_NODE}
    assert VALIDATORS["record"].is_valid(record)
    for bad in ({**record, "shape": [64]}, {**record, "dtype": "F64"}, {**record, "storage_bytes": -1},
                {**record, "info": []}, {**record, "extra": 1}, {k: v for k, v in record.items() if k != "weight"}):
        assert not VALIDATORS["record"].is_valid(bad)
    assert VALIDATORS["metadata"].is_valid({"format_version": 1, "records": {"w": record}})
    assert not VALIDATORS["metadata"].is_valid({"format_version": 2, "records": {"w": record}})
    assert not VALIDATORS["metadata"].is_valid({"format_version": 1, "records": {"w": record}, "x": 1})


# ---------------------------------------------------------------------------------------------------------------
# (2) every JSON example in the spec validates

def test_every_json_example_is_classified_and_valid():
    examples = json_examples()
    assert len(examples) >= 25
    for where, example in examples:
        kind = kind_of(example)
        assert kind is not None, f"{where}: JSON example is neither metadata, record, node nor quantization_config"
        errors = sorted(VALIDATORS[kind].iter_errors(example), key=lambda e: list(e.path))
        assert not errors, f"{where} ({kind}): {errors[0].message}"


def test_examples_use_only_envelope_version_1_and_core_or_namespaced_codecs():
    for where, example in json_examples():
        root = example.get("weight", example) if isinstance(example, dict) else example
        for node in walk_nodes(root):
            assert node["codec"] in CORE or "." in node["codec"], where


# ---------------------------------------------------------------------------------------------------------------
# (3) records built by the reference builder validate (and decode as the spec says)

def built_records(rng: np.random.Generator) -> list[QuantizedTensor]:
    out = []

    b = RecordBuilder("m.dense.weight", (6, 10), "F16")
    out.append(b.finish(b.tensor("w", rng.standard_normal((6, 10)).astype(np.float16))))

    b = RecordBuilder("m.affine.weight", (6, 40), "BF16")
    codes = b.packed("codes", rng.integers(0, 8, (6, 40)), 3)
    zero = b.packed("zero", rng.integers(0, 8, (6, 3)), 3)
    scale = b.tensor("scale", (rng.random((6, 3)) + 0.1).astype(np.float16))
    out.append(b.finish(b.affine(codes, scale=scale, zero=zero, bits=3, group_shape=(1, 16)), info={"m": "rtn"}))

    b = RecordBuilder("m.planes.weight", (5, 12))
    planes = b.bitplanes("planes", rng.integers(0, 16, (5, 12)), 4)
    out.append(b.finish(b.affine(planes, scale=0.25, zero=7.5, bits=4, group_shape=(5, 12))))

    b = RecordBuilder("m.ternary.weight", (4, 11))
    trits = b.ternary("trits", rng.integers(-1, 2, (4, 11)))
    out.append(b.finish(b.scale(trits, b.tensor("s", np.full((1, 1), 0.5, np.float32)), (4, 11))))

    b = RecordBuilder("m.stream.weight", (4, 11))
    words, ptr = ternary_dict.encode(rng.choice(3, size=(4, 11), p=[0.8, 0.1, 0.1]))
    stream = b.node("ternary_dict", 1, tensor=b.store("codewords", words), row_ptr=b.store("row_ptr", ptr),
                    shape=[4, 11], dictionary="qmoe")
    out.append(b.finish(b.lut(stream, b.tensor("levels", np.array([[[0.0, -0.5, 0.5]]] * 4, np.float32)), (1, 11))))

    b = RecordBuilder("m.lut.weight", (4, 16))
    codes = b.packed("codes", rng.integers(0, 16, (4, 16)), 4)
    nf4 = b.lut(codes, b.tensor("table", np.linspace(-1, 1, 16).astype(np.float32)))
    out.append(b.finish(b.scale(nf4, b.tensor("absmax", rng.random((4, 2)).astype(np.float32)), (1, 8))))

    b = RecordBuilder("m.lut3.weight", (4, 9))
    codes = b.packed("codes", rng.integers(0, 5, (4, 9)), 3)  # 5 levels used, table padded to 2^3 entries
    table = b.tensor("tables", rng.standard_normal((2, 3, 8)).astype(np.float16))
    out.append(b.finish(b.lut(codes, table, group_shape=(2, 4))))

    b = RecordBuilder("m.vq.weight", (3, 8))
    codes = b.packed("codes", rng.integers(0, 4, (3, 4 * 3)), 2)
    books = b.tensor("books", rng.standard_normal((3, 4, 2)).astype(np.float16))
    out.append(b.finish(b.vq(codes, books)))

    b = RecordBuilder("m.outliers.weight", (6, 20))
    dense = np.where(rng.random((6, 20)) < 0.1, rng.standard_normal((6, 20)), 0.0)
    base = b.affine(b.packed("codes", rng.integers(0, 4, (6, 20)), 2), scale=0.5, bits=2, group_shape=(6, 20))
    sparse = b.sparse_from_dense("outliers", dense)
    lowrank = b.lowrank(b.tensor("a", rng.standard_normal((6, 2)).astype(np.float16)),
                        b.tensor("b", rng.standard_normal((2, 20)).astype(np.float16)))
    inner = b.sum([base, sparse, lowrank])
    out.append(b.finish(b.permute(inner, rng.permutation(20))))

    b = RecordBuilder("m.bitstack.weight", (5, 9))
    blocks = [b.sign_lowrank(b.packed(f"b{i}.sign", rng.integers(0, 2, (5, 9)), 1),
                             b.tensor(f"b{i}.u", rng.standard_normal((5, 1)).astype(np.float16)),
                             b.tensor(f"b{i}.v", rng.standard_normal((1, 9)).astype(np.float16))) for i in range(2)]
    out.append(b.finish(b.sum(blocks)))

    b = RecordBuilder("m.reshape.weight", (6, 10))  # HQQ axis 0: groups of 4 along the flattened weight
    codes = b.packed("codes", rng.integers(0, 16, (4, 15)), 4)
    stats = {k: b.tensor(k, (rng.random((1, 15)) + 0.1).astype(np.float16)) for k in ("scale", "zero")}
    out.append(b.finish(b.reshape(b.affine(codes, bits=4, group_shape=(4, 1), **stats))))

    b = RecordBuilder("m.concat.weight", (5, 24))  # SliM-LLM: groups of 8 at 2, 3 and 4 bits, permuted back
    parts = [b.affine(b.packed(f"b{k}.codes", rng.integers(0, 1 << k, (5, 8)), k), bits=k, group_shape=(1, 8),
                      scale=b.tensor(f"b{k}.scale", (rng.random((5, 1)) + 0.1).astype(np.float16)),
                      zero=b.packed(f"b{k}.zero", rng.integers(0, 1 << k, (5, 1)), k)) for k in (2, 3, 4)]
    out.append(b.finish(b.permute(b.concat(parts), rng.permutation(24))))
    return out


def test_builder_records_for_every_codec_validate_against_the_schema(tmp_path: Path):
    records = built_records(np.random.default_rng(7))
    used = {node["codec"] for qt in records for node in walk_nodes(qt.record["weight"])}
    assert used == CORE
    for qt in records:
        errors = list(VALIDATORS["record"].iter_errors(qt.record))
        assert not errors, f"{qt.name}: {errors[0].message}"
    path = write_file(tmp_path / "all.safetensors", {"m.bias": np.zeros(3, np.float32)}, records)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(json.loads(raw[8:8 + header_len])["__metadata__"]["qformat"])
    assert not list(VALIDATORS["metadata"].iter_errors(metadata))


def test_builder_records_decode_as_the_spec_says():
    for qt in built_records(np.random.default_rng(11)):
        assert_decodes_like_spec(qt)


# ---------------------------------------------------------------------------------------------------------------
# (4) codec names: schema == registry == components.md

def test_codec_names_agree_between_schema_registry_and_components():
    defs = SCHEMA["$defs"]
    schema_codecs = {d["properties"]["codec"]["const"]: name for name, d in defs.items()
                     if "const" in d.get("properties", {}).get("codec", {})}
    assert all(name == codec for codec, name in schema_codecs.items())
    assert set(schema_codecs) == CORE
    branches = {ref["$ref"].rsplit("/", 1)[1] for ref in defs["node"]["oneOf"]}
    assert branches == CORE | {"plugin_node"}
    for codec in CORE:
        versions, _ = CORE_CODECS.names()[codec]
        version = defs[codec]["properties"]["version"]
        assert set(version["enum"] if "enum" in version else [version["const"]]) == set(versions), codec
        required = set(defs[codec]["required"]) - {"codec", "version"}
        assert required == set(CORE_CODECS.get(codec).required), codec
        optional = set(defs[codec]["properties"]) - set(defs[codec]["required"])
        assert optional == set(CORE_CODECS.get(codec).optional), codec
    sections = re.findall(r"^## `([^`]+)`\s*$", (SPEC / "components.md").read_text(), re.M)
    assert len(sections) == len(set(sections))
    assert set(sections) == CORE


# ---------------------------------------------------------------------------------------------------------------
# (5) error codes: code == errors.md

RAISERS = {"FormatError", "UnknownCodecError", "error", "fail"}


def raised_codes() -> set[str]:
    codes: set[str] = set()
    for path in sorted(FORMAT_SRC.glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            params = {a.arg for f in ast.walk(func) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for a in f.args.args + f.args.kwonlyargs}  # nested helpers like fail(code, ...) included
            assigned: dict[str, set[str]] = {}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    strings = {c.value for c in ast.walk(node.value)
                               if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                    assigned.setdefault(node.targets[0].id, set()).update(strings)
            for call in [n for n in ast.walk(func) if isinstance(n, ast.Call) and n.args]:
                fn = call.func
                called = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if called not in RAISERS:
                    continue
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    codes.add(first.value)
                elif isinstance(first, ast.Name) and first.id in assigned:
                    codes |= assigned[first.id]
                else:  # only pass-through parameters may be non-literal
                    assert isinstance(first, ast.Name) and first.id in params, f"{path.name}:{call.lineno}"
    return codes


def test_error_codes_in_code_and_errors_md_agree():
    documented = re.findall(r"^\| `([a-z_]+)` \|", (SPEC / "errors.md").read_text(), re.M)
    assert len(documented) == len(set(documented)), "a code is documented twice"
    raised = raised_codes()
    assert {"truncated", "bad_offsets", "unknown_codec", "nonzero_padding"} <= raised  # the scan works
    assert raised == set(documented), (f"undocumented: {sorted(raised - set(documented))}; "
                                       f"never raised: {sorted(set(documented) - raised)}")


def test_error_codes_cited_in_the_spec_are_defined():
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (SPEC / "errors.md").read_text(), re.M))
    for path in spec_docs():
        for cited in re.findall(r"`([a-z]+(?:_[a-z]+)+)`", path.read_text()):
            if cited.startswith(("bad_", "unsupported_", "missing_", "nonzero_", "code_", "index_", "limit_")):
                assert cited in documented, f"{path.name} cites undefined error {cited}"


# ---------------------------------------------------------------------------------------------------------------
# (6) byte-level examples

def bytes_examples() -> list[tuple[str, dict[str, str]]]:
    out = []
    for i, text in enumerate(fenced(SPEC / "components.md", "bytes")):
        fields = dict(line.split(": ", 1) for line in text.strip().splitlines())
        out.append((f"components.md bytes#{i}", fields))
    return out


def test_byte_examples_cover_every_layout():
    layouts = [f["layout"] for _, f in bytes_examples()]
    assert {"packed", "bitplanes", "ternary"} <= set(layouts)
    bits = {int(f["bits"]) for _, f in bytes_examples() if f["layout"] == "packed"}
    assert {1, 2, 3, 4, 5, 8, 12, 16} <= bits


@pytest.mark.parametrize("where,fields", bytes_examples(), ids=[w for w, _ in bytes_examples()])
def test_byte_example(where: str, fields: dict[str, str]):
    layout = fields["layout"]
    expected = bytes.fromhex(fields["hex"])
    dtype, shape_text = fields["stored"].split(" ", 1)
    shape = tuple(json.loads(shape_text))
    assert dtype == "U8"
    if layout == "ternary":
        values = np.array(json.loads(fields["values"]))
        stored = bitpack.pack_ternary(values)
        independent = b"".join(ternary_bytes(row) for row in values.tolist())
        decoded, valid = bitpack.unpack_ternary(stored, values.shape[1])
        assert valid and np.array_equal(decoded, values)
    else:
        codes = np.array(json.loads(fields["codes"]))
        bits = int(fields["bits"])
        if layout == "packed":
            stored = bitpack.pack_codes(codes, bits)
            independent = b"".join(stream_bytes(row, bits) for row in codes.tolist())
            assert np.array_equal(bitpack.unpack_codes(stored, bits, codes.shape[1]), codes)
            assert bitpack.padding_bits_are_zero(stored, bits, codes.shape[1])
        else:
            stored = bitpack.pack_bitplanes(codes, bits)
            independent = b"".join(stream_bytes([(c >> (bits - 1 - p)) & 1 for c in row], 1)
                                   for p in range(bits) for row in codes.tolist())
            assert np.array_equal(bitpack.unpack_bitplanes(stored, codes.shape[1]), codes)
            if "use_planes" in fields:
                keep = int(fields["use_planes"])
                want = np.array(json.loads(fields["decodes"]))
                spec_rule = ((codes >> (bits - keep)) << (bits - keep)) | (1 << (bits - keep - 1))
                assert np.array_equal(spec_rule, want)
                assert np.array_equal(bitpack.unpack_bitplanes(stored, codes.shape[1], keep), want)
    assert stored.dtype == np.uint8 and stored.shape == shape, where
    assert stored.tobytes() == expected, f"{where}: reference packs {stored.tobytes().hex(' ').upper()}"
    assert independent == expected, f"{where}: the spec's rule gives {independent.hex(' ').upper()}"


# ---------------------------------------------------------------------------------------------------------------
# (7) full record examples decode

def test_full_record_examples_decode_with_the_reference_decoder():
    examples = record_examples_with_tensors()
    methods = {ex["info"]["method"] for _, ex, _ in examples if "info" in ex}
    assert {"spqr", "nf4", "gptq", "aqlm", "vptq", "bitstack", "lq_lora", "qmoe_ternary", "bitnet"} <= methods
    rng = np.random.default_rng(3)
    for where, record, listed in examples:
        tensors = make_tensors(record, listed, rng)
        assert set(tensors) == set(listed), f"{where}: the tensors block lists unreferenced tensors"
        name = record_name(list(listed))

        referenced = validate_record(name, record, QuantizedTensor(name, record, tensors).tensor_info)  # includes storage_bytes and tensor-name checks
        assert set(referenced) == set(listed), where
        assert_decodes_like_spec(QuantizedTensor(name, record, tensors))


def example_by_method(method: str) -> tuple[dict, dict[str, np.ndarray], str]:
    for _, record, listed in record_examples_with_tensors():
        if record.get("info", {}).get("method") == method:
            tensors = make_tensors(record, listed, np.random.default_rng(5))
            return record, tensors, record_name(list(listed))
    raise AssertionError(f"no {method} example")


def test_spqr_example_matches_the_spqr_formula():
    record, t, name = example_by_method("spqr")
    p = name + "."
    q = bitpack.unpack_codes(t[p + "codes"], 3, 64).astype(np.float32)

    def stat(kind: str) -> np.ndarray:  # 3-bit statistic, second-level F16 scale/zero per 16 rows
        codes = bitpack.unpack_codes(t[p + kind + ".codes"], 3, 4).astype(np.float32)
        rows = np.arange(32) // 16
        return (codes - as_f32(t[p + kind + ".zero"])[rows]) * as_f32(t[p + kind + ".scale"])[rows]

    s, z = stat("scale"), stat("zero")
    groups = np.arange(64) // 16
    base = (q - z[:, groups]) * s[:, groups]
    ptr, idx, vals = t[p + "outliers.row_ptr"], t[p + "outliers.col_idx"], as_f32(t[p + "outliers.values"])
    outliers = np.zeros((32, 64), np.float32)
    for r in range(32):
        outliers[r, idx[ptr[r]:ptr[r + 1]]] = vals[ptr[r]:ptr[r + 1]]
    permuted = base + outliers
    expected = np.empty_like(permuted)
    expected[:, t[p + "perm"].astype(np.int64)] = permuted
    got = QuantizedTensor(name, record, t).decode()
    np.testing.assert_array_equal(got, expected)
    assert record["storage_bytes"] * 8 / (32 * 64) == pytest.approx(5.078125)


def test_nf4_double_quant_example_matches_the_bitsandbytes_formula():
    record, t, name = example_by_method("nf4")
    p = name + "."
    q = bitpack.unpack_codes(t[p + "codes"], 4, 256)
    nf4, dyn = as_f32(t[p + "nf4"]), as_f32(t[p + "absmax.map"])
    block2 = np.arange(128) // 64  # 256 absmax values = 64 rows x 4 per second-level block
    s2 = as_f32(t[p + "absmax.scale"])[block2]  # [128, 1]
    offset = as_f32(t[p + "absmax.offset"])  # [1, 4]
    ones = as_f32(t[p + "absmax.ones"])  # [128, 1]
    absmax = dyn[t[p + "absmax.codes"]] * s2 + ones * offset
    expected = nf4[q] * absmax[:, np.arange(256) // 64]
    got = QuantizedTensor(name, record, t).decode()
    np.testing.assert_array_equal(got, expected)


def test_hqq_axis_0_example_matches_the_hqq_formula():
    """((M - zero) * scale).reshape(R, C) with M = W.reshape(64, 192), as HQQ dequantizes axis-0 groups."""
    record, t, name = next((r, make_tensors(r, listed, np.random.default_rng(5)), record_name(list(listed)))
                           for _, r, listed in record_examples_with_tensors()
                           if r.get("info", {}).get("format") == "hqq")
    p = name + "."
    m = bitpack.unpack_codes(t[p + "codes"], 4, 192).astype(np.float32)
    expected = ((m - as_f32(t[p + "zero"])) * as_f32(t[p + "scale"])).reshape(96, 128)
    got = QuantizedTensor(name, record, t).decode()
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert record["storage_bytes"] * 8 / (96 * 128) == 4.5


def test_gguf_q4_k_example_matches_the_gguf_formula():
    """(d * sc) * q - dmin * mn in fp32, as gguf-py's Q4_K dequantization computes it, bit for bit."""
    record, t, name = example_by_method("gguf")
    p = name + "."
    q = bitpack.unpack_codes(t[p + "codes"], 4, 512).astype(np.float32)
    sc = bitpack.unpack_codes(t[p + "scale.codes"], 6, 16).astype(np.float32)
    mn = bitpack.unpack_codes(t[p + "offset.codes"], 6, 16).astype(np.float32)
    d = as_f32(t[p + "scale.d"])
    dmin = -as_f32(t[p + "offset.neg_dmin"])  # stored negated: exact
    sub = np.arange(16) // 8
    d_sub, dm = d[:, sub] * sc, dmin[:, sub] * mn
    block = np.arange(512) // 32
    expected = d_sub[:, block] * q - dm[:, block]
    got = QuantizedTensor(name, record, t).decode()
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert record["weight"]["version"] == 2
    assert record["storage_bytes"] * 8 / (4 * 512) == 4.5


# ---------------------------------------------------------------------------------------------------------------
# container.md's header example is what write_file writes

def test_container_header_example_is_byte_exact(tmp_path: Path):
    b = RecordBuilder("l.weight", (2, 4))
    codes = b.packed("codes", np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), 2)
    scale = b.tensor("scale", np.ones((2, 1), np.float16))
    qt = b.finish(b.affine(codes, scale=scale, bits=2, group_shape=(1, 4)), info={"method": "rtn"})
    path = write_file(tmp_path / "x.safetensors", {"l.bias": np.zeros(2, np.float32)}, [qt])
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + header_len]
    (documented,) = fenced(SPEC / "container.md", "text")
    text = header.rstrip(b" ").decode()
    assert header_len % 8 == 0 and header_len - len(text.encode()) < 8
    assert text == documented.strip()
    assert f"{header_len - len(text.encode())} spaces of padding to {header_len} bytes" in (SPEC / "container.md").read_text()
    example = next(ex for where, ex in json_examples() if where.startswith("container.md") and kind_of(ex) == "metadata")
    assert json.loads(json.loads(header)["__metadata__"]["qformat"]) == example


# ---------------------------------------------------------------------------------------------------------------
# extending.md: the plugin example runs, and readers without it reject with unknown_codec

def test_extending_example_plugin_codec():
    (source,) = fenced(SPEC / "extending.md", "python")
    namespace: dict[str, Any] = {}
    exec(compile(source, "extending.md", "exec"), namespace)
    registry = CORE_CODECS.copy()  # an extendable copy: the core registry itself is read-only
    namespace["qformat_register_codecs"](register=lambda codec: registry.register(codec, owner="example"))
    assert "example.shift" in registry.names()

    (node,) = [ex for where, ex in json_examples() if where.startswith("extending.md")]
    assert VALIDATORS["node"].is_valid(node)
    base = np.arange(6, dtype=np.float16).reshape(2, 3)
    tensors = {"w.base": base}
    record = {"shape": [2, 3], "dtype": "F16", "storage_bytes": base.nbytes, "weight": node}

    def info(key: str) -> TensorInfo | None:
        return TensorInfo("F16", (2, 3), base.nbytes) if key in tensors else None

    got = decode_record("w", record, info, tensors.__getitem__, registry)
    np.testing.assert_array_equal(got, base.astype(np.float32) + np.float32(0.5))
    with pytest.raises(FormatError) as bad:
        validate_record("w", {**record, "weight": {**node, "offset": "x"}}, info, registry)
    assert bad.value.code == "bad_field" and bad.value.field == "weight/offset"
    with pytest.raises(UnknownCodecError) as unknown:
        validate_record("w", record, info, CORE_CODECS)
    assert unknown.value.code == "unknown_codec" and "example.shift" in str(unknown.value)
    with pytest.raises(UnknownCodecError) as version:
        validate_record("w", {**record, "weight": {**node, "version": 2}}, info, registry)
    assert version.value.code == "unsupported_codec_version"


def test_limits_in_record_md_match_the_reference():
    from qformat.format import codecs, container, qfile, record, safetensors_io

    text = (SPEC / "record.md").read_text()
    assert f"| {codecs.MAX_DEPTH} |" in text and f"| {codecs.MAX_NODES} |" in text
    assert codecs.MAX_ELEMENTS == 1 << 34 and "2^34" in text
    assert f"| {record.MAX_EXPANSION} |" in text
    limits = text[text.index("## Limits"):]
    assert codecs.MAX_WORK == 1 << 36 and "| decode work of a record (below) | 2^36 |" in limits
    assert record.FREE_WORK == 1 << 24 and "decode work exceeds 2^24 | 256 |" in limits
    assert codecs.MAX_DIM == 1 << 40 and "< 2^40 (`bad_field`)" in limits
    assert SCHEMA["$defs"]["dims2"]["items"]["maximum"] == codecs.MAX_DIM - 1
    assert safetensors_io.MAX_HEADER_BYTES == 100 * 1024 * 1024 and "100 MiB" in text
    assert qfile.MAX_METADATA_BYTES == 64 * 1024 * 1024 and container.MAX_JSON_BYTES == 64 * 1024 * 1024
    assert f"{safetensors_io.MAX_TENSORS:,}" in text
    assert math.isclose(3.4028234663852886e38, float(np.finfo(np.float32).max))


# ---------------------------------------------------------------------------------------------------------------
# components.md: error cases and edge values stated in words (not in a byte or JSON example)

def tensor_node(role: str) -> dict:
    return {"codec": "tensor", "version": 1, "tensor": f"w.{role}"}


def decode_small(weight: dict, arrays: dict[str, np.ndarray], shape: tuple[int, int] = (2, 2)) -> np.ndarray:
    """Validate and decode a record ``w`` over the tensors ``w.<role>`` with the reference decoder."""
    tensors = {f"w.{role}": np.ascontiguousarray(a) for role, a in arrays.items()}
    record = {"shape": list(shape), "dtype": "F32", "storage_bytes": sum(a.nbytes for a in tensors.values()),
              "weight": weight}
    return QuantizedTensor("w", record, tensors).decode()


ONES_U8 = {"c": np.ones((2, 2), np.uint8)}
F16 = np.float16


def affine_over(codes: dict, **fields: Any) -> dict:
    return {"codec": "affine", "version": 1, "bits": 2, "group_shape": [1, 1], "scale": 1.0, "codes": codes, **fields}


@pytest.mark.parametrize("weight, arrays, code, fld", [
    pytest.param({"codec": "scale", "version": 1, "input": tensor_node("a"), "factor": 2.0, "group_shape": [1, 1]},
                 {"a": np.ones((2, 2), np.float32)}, "bad_record", "weight/factor", id="scale_factor_is_a_number"),
    pytest.param(affine_over(tensor_node("c"), zero=None), ONES_U8, "bad_field", "weight/zero", id="zero_null"),
    pytest.param(affine_over(tensor_node("c"), scale="0.5"), ONES_U8, "bad_field", "weight/scale",
                 id="scale_string"),
    pytest.param(affine_over(5), {}, "bad_record", "weight/codes", id="codes_number"),
    pytest.param({"codec": "vq", "version": 1, "shape": [2, 2], "codes": tensor_node("c"),
                  "codebooks": tensor_node("b")}, {"c": np.zeros((2, 1), np.uint8), "b": np.zeros((1, 0, 2), F16)},
                 "shape_mismatch", "weight/codebooks", id="vq_no_entries"),
    pytest.param({"codec": "vq", "version": 1, "shape": [2, 2], "codes": tensor_node("c"),
                  "codebooks": tensor_node("b")}, {"c": np.zeros((2, 1), np.uint8), "b": np.zeros((1, 1, 2), np.int8)},
                 "shape_mismatch", "weight/codebooks", id="vq_int_codebooks"),
    pytest.param(affine_over({"codec": "ternary", "version": 1, "tensor": "w.t", "shape": [2, 2]}),
                 {"t": np.array([[0], [8]], np.uint8)}, "code_out_of_range", "weight/codes",
                 id="ternary_minus_one_as_codes"),
    pytest.param(affine_over(tensor_node("c"), group_shape=[1 << 40, 1]), ONES_U8, "bad_field",
                 "weight/group_shape", id="dims_entry_2_40"),
    pytest.param({"codec": "sparse_csr", "version": 1, "shape": [2, 1 << 40], "row_ptr": "w.p", "col_idx": "w.i",
                  "values": tensor_node("v")}, {"p": np.zeros(3, np.int32), "i": np.zeros(0, np.int32),
                                                "v": np.zeros(0, F16)}, "bad_field", "weight/shape", id="dims_shape_2_40"),
])
def test_error_cases_stated_in_components_md(weight: dict, arrays: dict, code: str, fld: str):
    with pytest.raises(FormatError) as error:
        decode_small(weight, arrays)
    assert (error.value.code, error.value.field) == (code, fld), str(error.value)


def test_group_larger_than_the_output_is_one_tile_in_components_md():
    codes = {"c": np.array([[0, 1, 2], [3, 2, 1]], np.uint8), "s": np.array([[0.5, 2.0]], F16)}
    want = decode_small(affine_over(tensor_node("c"), scale=tensor_node("s"), group_shape=[2, 2]), codes, (2, 3))
    for group in ([3, 2], [1 << 39, 2]):
        got = decode_small(affine_over(tensor_node("c"), scale=tensor_node("s"), group_shape=group), codes, (2, 3))
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, [[0, 0.5, 4], [1.5, 1, 2]])


def test_value_conversion_edge_cases_in_components_md():
    # ternary codes without a -1 are valid affine codes (no bound, checked on decode only)
    ternary = affine_over({"codec": "ternary", "version": 1, "tensor": "w.t", "shape": [2, 2]})
    np.testing.assert_array_equal(decode_small(ternary, {"t": np.array([[4], [8]], np.uint8)}), [[0, 0], [1, 1]])
    # F64 beyond fp32 overflows to infinity; stored NaN is not a data error
    f64 = np.array([[1e300, np.nan], [-1e300, 0.1]], np.float64)
    with np.errstate(over="ignore"):
        got = decode_small(tensor_node("a"), {"a": f64})
    assert got[0, 0] == np.inf and np.isnan(got[0, 1]) and got[1, 0] == -np.inf and got[1, 1] == np.float32(0.1)
    # integers beyond 2^24 round to nearest even; a JSON integer constant rounds via binary64 (double rounding)
    ints = np.array([[16777217, 16777219], [-16777217, 2**62 + 1]], np.int64)
    summed = decode_small({"codec": "sum", "version": 1, "terms": [tensor_node("a")]}, {"a": ints})
    np.testing.assert_array_equal(summed, [[16777216, 16777220], [-16777216, 2.0**62]])
    x = 2**60 + 2**36 + 1  # binary64 rounds it to 2^60 + 2^36, a binary32 tie, which goes to even 2^60
    assert decode_small(affine_over(tensor_node("c"), scale=x), ONES_U8)[0, 0] == np.float32(2.0**60)
    # lowrank with k = 0: positive zeros; lut tables may be integers
    low = decode_small({"codec": "lowrank", "version": 1, "a": tensor_node("a"), "b": tensor_node("b")},
                       {"a": np.zeros((2, 0), F16), "b": np.zeros((0, 2), F16)})
    assert not low.any() and not np.signbit(low).any()
    lut = {"codec": "lut", "version": 1, "codes": tensor_node("c"), "table": tensor_node("t")}
    np.testing.assert_array_equal(decode_small(lut, {**ONES_U8, "t": np.array([5, -7], np.int8)}), np.full((2, 2), -7))


def test_u64_values_convert_from_their_exact_value():
    big = np.array([[2**64 - 1, 2**63], [1, 2]], np.uint64)
    summed = decode_small({"codec": "sum", "version": 1, "terms": [tensor_node("a")]}, {"a": big})
    np.testing.assert_array_equal(summed, np.array([[2.0**64, 2.0**63], [1, 2]], np.float32))
