"""What every file mutation shares: the case's random source, the sample, value tables and tree helpers."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np

from .jsontext import Pairs, Raw
from .sample import DTYPES, MISSING, FileSample, tensor_refs

CODECS = ["tensor", "packed", "bitplanes", "ternary", "affine", "lut", "scale", "vq", "sparse_csr", "lowrank",
          "sign_lowrank", "sum", "permute", "reshape"]
FIELDS = ["codec", "version", "tensor", "bits", "shape", "codes", "scale", "zero", "group_shape", "table", "input",
          "factor", "codebooks", "row_ptr", "col_idx", "values", "a", "b", "sign", "u", "v", "terms", "perm"]
EXTREME_INTS = [0, -1, 1, 2, 3, 7, 8, 15, 16, 17, 255, 256, 65535, 65536, 2**24 + 1, 2**31 - 1, 2**31, 2**32 - 1,
                2**32, 2**34, 2**34 + 1, 2**40 - 1, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                -2**31, -2**63, -2**63 - 1, 10**30, 10**300]
HUGE_DIMS = [2**16, 2**20, 2**24, 2**31 - 1, 2**31, 2**32, 2**39, 2**40 - 1, 2**40, 2**62, 2**63 - 1]
ODD_VALUES: list[Any] = [None, True, False, "", "x", "\ud800", 1.5, 4.0, -0.0, 1e308, Raw("1e400"), Raw("-1e400"),
                         Raw("NaN"), Raw("Infinity"), Raw("1E2"), Raw("4.0"), Raw("-0"), [], {}, [1], [[1, 2]],
                         {"codec": "tensor"}, {"codec": "tensor", "version": 1, "tensor": ""}, 10**400, -(10**400)]
ODD_NAMES = ["\ud800", "\udfff", "a\ud800b", "\udc80\udcff", "x\x00y", "", ".", "..", "/", "a/../b", "/etc/passwd",
             "\u202egnp.exe", "\U0001f600", "e\u0301", "\u00e9", "\ufeffname", "\\", " ", "name\n", "\u0000",
             "A" * 10000, "__metadata__", "qformat", "records"]
NEST_DEPTHS = [20, 100, 500, 900, 950, 980, 990, 995, 1000, 1200, 5000, 100000]
CHAIN_DEPTHS = [15, 16, 17, 40, 200, 400, 470, 480, 490, 495, 500, 1000]
MAX_TREE = 2_000_000  # JSON values a case may serialize (shared subtrees are written out once per reference)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INT_DTYPES = ("U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")
BAD_DTYPES = ["F8_E4M3", "F8_E5M2", "C64", "U1", "I128", "", "f32", "float32", "BOOL", "STR", "F4"]


def int_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(DTYPES[dtype])
    return int(info.min), int(info.max)


class MutatorBase:
    """The sample under mutation, the case's random source, and helpers that find and build nodes and tensors."""

    def __init__(self, rng: random.Random, sample: FileSample) -> None:
        self.rng = rng
        self.s = sample
        self.np = np.random.default_rng(rng.getrandbits(64))
        self.fresh = 0
        self.paths: dict[int, str] = {}  # id(JSON container) -> its path, filled by locations()

    def choice(self, seq: Any) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def odd(self) -> Any:
        """An odd JSON value (a fresh copy: later mutations may edit it in place)."""
        return deepcopy_value(self.choice(ODD_VALUES))

    def records(self) -> list[tuple[str, dict]]:
        return [(k, v) for k, v in self.s.records().items() if isinstance(v, dict)]

    def locations(self) -> list[tuple[Any, Any, Any]]:
        """(parent, key, value) for every JSON position in the qformat metadata (objects and lists)."""
        out: list[tuple[Any, Any, Any]] = []
        if self.s.qmeta is MISSING:
            return out
        self.paths = {id(self.s.qmeta): ""}
        stack: list[Any] = [self.s.qmeta]
        while stack and len(out) < 20000:
            item = stack.pop()
            children = item.items() if isinstance(item, dict) else enumerate(item) if type(item) is list else ()
            for key, value in children:
                out.append((item, key, value))
                if isinstance(value, (dict, list)) and not isinstance(value, Pairs):
                    self.paths.setdefault(id(value), self.where(item, key))
                    stack.append(value)
        return out

    def where(self, parent: Any, key: Any) -> str:
        """The JSON path of ``parent[key]`` in the qformat metadata, for descriptions (after :meth:`locations`)."""
        base = self.paths.get(id(parent), "?")
        part = f"[{key}]" if type(parent) is list else f"/{str(key)[:40]}"
        return (base + part).lstrip("/")

    def nodes(self) -> list[tuple[str, Any, Any, dict]]:
        """(record name, parent, key, node) for every node (a dict with a codec) under a record's weight."""
        out = []
        for name, record in self.records():
            stack: list[tuple[Any, Any, Any]] = [(record, "weight", record.get("weight"))]
            while stack and len(out) < 50000:
                parent, key, node = stack.pop()
                if isinstance(node, dict):
                    if "codec" in node:
                        out.append((name, parent, key, node))
                    stack.extend((node, k, v) for k, v in node.items() if isinstance(v, (dict, list)))
                elif type(node) is list:
                    stack.extend((node, i, v) for i, v in enumerate(node) if isinstance(v, (dict, list)))
        return out

    def nodes_of(self, *codecs: str) -> list[tuple[str, Any, Any, dict]]:
        return [n for n in self.nodes() if n[3].get("codec") in codecs]

    def new_tensor(self, record: str, dtype: str, array: np.ndarray) -> str:
        self.fresh += 1
        name = f"{record}.fz{self.fresh}"
        self.s.set_tensor(name, dtype, array)
        return name

    def tensor_node(self, record: str, dtype: str, array: np.ndarray) -> dict:
        return {"codec": "tensor", "version": 1, "tensor": self.new_tensor(record, dtype, array)}

    def out_shape(self, node: Any, depth: int = 0) -> tuple[int, ...] | None:
        """Best-effort output shape of a node, from its fields and stored tensors (None if unknown)."""
        if not isinstance(node, dict) or depth > 40:
            return None
        codec = node.get("codec")
        if codec == "tensor":
            entry = self.s.entry(node.get("tensor")) if isinstance(node.get("tensor"), str) else None
            shape = entry.get("shape") if entry else None
            return tuple(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else None
        if codec in ("packed", "bitplanes", "ternary", "vq", "sparse_csr", "reshape"):
            shape = node.get("shape")
            ok = isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)
            return tuple(shape) if ok else None
        inner = {"affine": "codes", "lut": "codes", "scale": "input", "permute": "input", "sign_lowrank": "sign"}
        if codec in inner:
            return self.out_shape(node.get(inner[codec]), depth + 1)
        if codec == "sum" and isinstance(node.get("terms"), list) and node["terms"]:
            return self.out_shape(node["terms"][0], depth + 1)
        if codec == "lowrank":
            a, b = self.out_shape(node.get("a"), depth + 1), self.out_shape(node.get("b"), depth + 1)
            return (a[0], b[-1]) if a and b and len(a) == 2 and len(b) == 2 else None
        return None

    def json_weight(self) -> int:
        """How many JSON values the qformat metadata expands to (shared subtrees count every time), capped."""
        return tree_size(self.s.qmeta if self.s.qmeta is not MISSING else None, MAX_TREE)

    def random_float(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        values = self.np.standard_normal(shape).astype(np.float32) * 0.05
        return float_bits(values, dtype)

    def replace_weight(self, name: str, record: dict, weight: dict, shape: list[int]) -> None:
        """Give a record a new tree; the tensors only the old tree used are dropped."""
        for ref in sorted(set(tensor_refs(record.get("weight")))):
            if ref.startswith(name + ".") and ref not in set(tensor_refs(weight)):
                self.drop_tensor(ref)
        record["weight"] = weight
        record["shape"] = shape

    def drop_tensor(self, name: str) -> None:
        self.s.entries = [(k, v) for k, v in self.s.entries if k != name]
        self.s.blobs.pop(name, None)

    def int_tensor_of(self, node: dict, key: str) -> tuple[str, np.ndarray] | None:
        name = node.get(key)
        array = self.s.array(name) if isinstance(name, str) else None
        return (name, array) if array is not None else None
    def new_csr(self, name: str, rows: int, cols: int, nnz: int | None = None) -> dict:
        nnz = min(rows * cols, self.rng.randrange(0, 6)) if nnz is None else nnz
        flat = np.sort(self.np.choice(rows * cols, size=nnz, replace=False)) if nnz else np.zeros(0, np.int64)
        r, c = np.divmod(flat, cols)
        ptr = np.zeros(rows + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=rows), out=ptr[1:])
        return {"codec": "sparse_csr", "version": 1, "shape": [rows, cols],
                "row_ptr": self.new_tensor(name, self.choice(["I32", "I64"]), ptr),
                "col_idx": self.new_tensor(name, self.choice(["I32", "I16", "U16"]) if cols < 32768 else "I32", c),
                "values": self.tensor_node(name, "F16", self.random_float("F16", (nnz,)))}

    def rename_refs(self, tree: Any, old_prefix: str, new_prefix: str) -> None:
        renames: dict[str, str] = {}
        stack = [tree]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for key, value in list(item.items()):
                    if key in ("tensor", "row_ptr", "col_idx", "perm") and isinstance(value, str) \
                            and value.startswith(old_prefix):
                        renames[value] = item[key] = new_prefix + value[len(old_prefix):]
                    elif isinstance(value, (dict, list)):
                        stack.append(value)
            elif type(item) is list:
                stack.extend(item)
        self.s.entries = [(renames.get(k, k), v) for k, v in self.s.entries]
        self.s.blobs = {renames.get(k, k): v for k, v in self.s.blobs.items()}

    def pick_tensor(self, dtypes: tuple[str, ...] | None = None) -> tuple[str, np.ndarray, str] | None:
        names = []
        for name in self.s.tensor_names():
            entry = self.s.entry(name)
            if entry and (dtypes is None or entry.get("dtype") in dtypes) and self.s.blobs.get(name):
                names.append(name)
        if not names:
            return None
        name = self.choice(names)
        array = self.s.array(name)
        return (name, array, self.s.entry(name)["dtype"]) if array is not None else None



def tree_size(value: Any, budget: int) -> int:
    """JSON values under ``value``, counting a shared subtree once per reference; stops counting at ``budget``."""
    count, stack = 0, [value]
    while stack and count < budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(v for pair in item for v in (pair if isinstance(item, Pairs) else (pair,)))
    return count


def deepcopy_value(value: Any) -> Any:
    return copy.deepcopy(value)


def short(array: np.ndarray) -> str:
    flat = np.asarray(array).reshape(-1)
    text = ", ".join(str(int(v)) if np.issubdtype(flat.dtype, np.integer) else str(v) for v in flat[:6])
    return f"[{text}{', ...' if flat.size > 6 else ''}]"


def float_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values as the storage array of a float dtype (BF16 as raw uint16 bits)."""
    values = np.asarray(values, dtype=np.float32)
    if dtype == "BF16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(DTYPES[dtype])


def float_specials(dtype: str) -> list[Any]:
    if dtype == "BF16":
        return [0x7FC0, 0x7F80, 0xFF80, 0x8000, 0x7F7F, 0x0001, 0xFFFF]
    info = np.finfo(DTYPES[dtype])
    return [np.nan, np.inf, -np.inf, -0.0, info.max, info.min, info.smallest_subnormal, -np.nan]
