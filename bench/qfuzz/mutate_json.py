"""Mutations of the JSON metadata: values, keys, nesting, codecs, tensor references, subtrees, names."""

from __future__ import annotations

from typing import Any

import numpy as np

from .jsontext import Pairs, Raw, nested
from .mutate_base import (
    CHAIN_DEPTHS,
    CODECS,
    EXTREME_INTS,
    FIELDS,
    MAX_TREE,
    NEST_DEPTHS,
    ODD_NAMES,
    MutatorBase,
    deepcopy_value,
    float_bits,
)
from .sample import MISSING


class JsonMutations(MutatorBase):
    """JSON mutations (``m_*``; each returns a description, or None when it does not apply)."""

    def m_int_extreme(self) -> str | None:
        spots = [(p, k, v) for p, k, v in self.locations() if type(v) is int]
        if not spots:
            return None
        parent, key, value = self.choice(spots)
        new = self.choice(EXTREME_INTS) if self.rng.random() < 0.7 else self.choice(
            [value + 1, value - 1, value * 2, value // 2, -value, value + 8, 0])
        parent[key] = new
        return f"{self.where(parent, key)} {value} -> {str(new)[:24]}"

    def m_type_swap(self) -> str | None:
        spots = self.locations()
        if not spots:
            return None
        parent, key, value = self.choice(spots)
        new = self.odd()
        parent[key] = new
        return f"{self.where(parent, key)} {type(value).__name__} -> {str(new)[:24]!r}"

    def m_delete_key(self) -> str | None:
        spots = [(p, k) for p, k, _ in self.locations() if isinstance(p, dict)]
        if not spots:
            return None
        parent, key = self.choice(spots)
        del parent[key]
        return f"deleted {self.where(parent, key)}"

    def m_add_key(self) -> str | None:
        dicts = [v for _, _, v in self.locations() if isinstance(v, dict)] + [r for _, r in self.records()]
        if not dicts:
            return None
        target = self.choice(dicts)
        key = self.choice(FIELDS + ["info", "storage_bytes", "dtype", "zzz", "", "\ud800", "Codec"])
        donor = [v for _, k, v in self.locations() if k == key]
        # a copy: the donor may contain the target, and a cycle would never finish serializing
        target[key] = deepcopy_value(self.choice(donor)) if donor and self.rng.random() < 0.6 else self.odd()
        return f"added {key!r}"

    def m_duplicate_key(self) -> str | None:
        spots = [(p, k, v) for p, k, v in self.locations() if isinstance(v, dict) and v]
        if self.s.qmeta is not MISSING and isinstance(self.s.qmeta, dict) and self.rng.random() < 0.2:
            spots = [(None, None, self.s.qmeta)]
        if not spots:
            return None
        parent, key, value = self.choice(spots)
        pairs = list(value.items())
        dup_key, dup_value = self.choice(pairs)
        if self.rng.random() < 0.5:
            dup_value = self.odd()
        pairs.insert(self.rng.randrange(len(pairs) + 1), (dup_key, dup_value))
        if parent is None:
            self.s.qmeta = Pairs(pairs)
        else:
            parent[key] = Pairs(pairs)
        return f"key {dup_key!r} twice"

    def m_deep_nest(self) -> str | None:
        spots = self.locations()
        if not spots:
            return None
        parent, key, _ = self.choice(spots)
        depth = self.choice(NEST_DEPTHS)
        parent[key] = nested(depth, self.choice(["list", "dict"]))
        return f"{self.where(parent, key)} nested {depth} deep"

    def m_node_chain(self) -> str | None:
        records = self.records()
        if not records:
            return None
        name, record = self.choice(records)
        depth = self.choice(CHAIN_DEPTHS)
        node = record.get("weight")
        kind = self.choice(["sum", "scale"])
        for _ in range(depth):
            if kind == "sum":
                node = {"codec": "sum", "version": 1, "terms": [node]}
            else:
                node = {"codec": "scale", "version": 1, "input": node, "group_shape": [1, 1],
                        "factor": {"codec": "tensor", "version": 1, "tensor": f"{name}.fzone"}}
        if kind == "scale":
            self.s.set_tensor(f"{name}.fzone", "F16", float_bits(np.ones((1, 1), np.float32), "F16"))
        record["weight"] = node
        return f"{name}: {depth} {kind} nodes around the weight"

    def m_codec(self) -> str | None:
        nodes = self.nodes()
        if not nodes:
            return None
        _, _, _, node = self.choice(nodes)
        if self.rng.random() < 0.6:
            old, node["codec"] = node.get("codec"), self.choice(
                CODECS + ["", "Tensor", "tensor ", "x.y", "qformat.packed", "\ud800", "unknown"])
            return f"codec {old} -> {node['codec']!r}"
        node["version"] = self.choice([0, 2, -1, 2**63, 1.0, "1", None, True, Raw("1.0")])
        return f"{node.get('codec')} version -> {node['version']!r}"

    def m_tensor_ref(self) -> str | None:
        spots = [(name, node, key) for name, _, _, node in self.nodes() for key in node if key in
                 ("tensor", "row_ptr", "col_idx", "perm")]
        if not spots:
            return None
        name, node, key = self.choice(spots)
        others = self.s.tensor_names()
        options = [self.choice(others)] if others else []
        options += [name, f"{name}.nope", "", f"{name}." + self.choice(ODD_NAMES)]
        options += [r for r, _ in self.records() if r != name][:1]
        old, node[key] = node[key], self.choice(options)
        return f"{name}/{key}: {old} -> {node[key]!r}"[:120]

    def m_copy_subtree(self) -> str | None:
        nodes = self.nodes()
        if len(nodes) < 2:
            return None
        src = self.choice(nodes)[3]
        name, parent, key, dst = self.choice(nodes)
        if src is dst:
            return None
        parent[key] = deepcopy_value(src)
        return f"{name}: {dst.get('codec')} replaced by a copy of {src.get('codec')}"

    def m_repeat_refs(self) -> str | None:
        records = self.records()
        if not records:
            return None
        name, record = self.choice(records)
        weight = record.get("weight")
        n = self.choice([2, 3, 16, 64, 65])
        if self.json_weight() * 240 >= MAX_TREE:  # copies of copies would serialize to gigabytes
            return None
        if self.rng.random() < 0.5:
            record["weight"] = {"codec": "sum", "version": 1, "terms": [weight] * n}
            return f"{name}: sum of {n} copies of the weight (same tensors)"
        inner = {"codec": "sum", "version": 1, "terms": [weight] * 8}
        record["weight"] = {"codec": "sum", "version": 1, "terms": [inner] * self.choice([2, 8, 30])}
        return f"{name}: nested sums of copies of the weight"

    def m_wrap_node(self) -> str | None:
        nodes = self.nodes()
        if not nodes:
            return None
        name, parent, key, node = self.choice(nodes)
        shape = self.out_shape(node)
        if not shape or len(shape) != 2 or shape[0] * shape[1] > 1 << 20:
            return None
        rows, cols = shape
        kind = self.choice(["permute", "scale_row", "scale_col", "sum_csr", "sum_self", "lowrank", "affine_of",
                            "lut_of"])
        if kind == "permute":
            perm = self.np.permutation(cols)
            wrapped = {"codec": "permute", "version": 1, "input": node,
                       "perm": self.new_tensor(name, self.choice(["I32", "I64", "U16", "I16"]), perm)}
        elif kind in ("scale_row", "scale_col"):
            grid = (rows, 1) if kind == "scale_row" else (1, cols)
            group = [1, cols] if kind == "scale_row" else [rows, 1]
            wrapped = {"codec": "scale", "version": 1, "input": node, "group_shape": group,
                       "factor": self.tensor_node(name, "F16", self.random_float("F16", grid))}
        elif kind == "sum_csr":
            wrapped = {"codec": "sum", "version": 1, "terms": [node, self.new_csr(name, rows, cols)]}
        elif kind == "sum_self":
            if self.json_weight() * 2 >= MAX_TREE:
                return None
            wrapped = {"codec": "sum", "version": 1, "terms": [node, node]}
        elif kind == "lowrank":
            k = self.choice([1, 2, 8])
            wrapped = {"codec": "lowrank", "version": 1,
                       "a": {"codec": "lowrank", "version": 1, "a": node,
                             "b": self.tensor_node(name, "F16", self.random_float("F16", (cols, k)))},
                       "b": self.tensor_node(name, "F16", self.random_float("F16", (k, cols)))}
        else:
            bits = self.choice([1, 2, 4, 8] + ([16] if kind == "affine_of" else []))
            if rows * cols > 1 << 16:
                return None
            codes = self.np.integers(0, 1 << bits, (rows, cols)).astype(np.uint16 if bits > 8 else np.uint8)
            codes_node = self.tensor_node(name, "U16" if bits > 8 else "U8", codes)
            if kind == "affine_of":
                wrapped = {"codec": "affine", "version": 1, "codes": codes_node, "bits": bits, "scale": node,
                           "group_shape": [1, 1]}
            else:
                wrapped = {"codec": "lut", "version": 1, "codes": codes_node,
                           "table": self.tensor_node(name, "F32", self.random_float("F32", (1 << bits,)))}
                wrapped = {"codec": "sum", "version": 1, "terms": [wrapped, node]}
        parent[key] = wrapped
        return f"{name}: {node.get('codec')} wrapped ({kind})"

    def m_rename_record(self) -> str | None:
        records = self.records()
        if not records:
            return None
        old, record = self.choice(records)
        new = self.choice(ODD_NAMES + [old + self.choice(ODD_NAMES), old.upper(), old + ".weight"])
        others = [r for r, _ in records if r != old] + [n for n in self.s.tensor_names() if not n.startswith(old)]
        if others and self.rng.random() < 0.15:
            new = self.choice(others)
        table = self.s.records()
        if new in table and new != old:
            return None
        consistent = self.rng.random() < 0.8
        items = [(new if k == old else k, v) for k, v in table.items()]
        table.clear()
        table.update(items)
        if consistent:
            self.rename_refs(record.get("weight"), old + ".", new + ".")
        return f"record {old[:40]!r} -> {new[:40]!r}" + ("" if consistent else " (tensors keep old names)")

    def m_rename_tensor(self) -> str | None:
        names = self.s.tensor_names()
        if not names:
            return None
        old = self.choice(names)
        new = self.choice([old + self.choice(ODD_NAMES), self.choice(ODD_NAMES), old.rsplit(".", 1)[0],
                           old + ".", old.upper()])
        if new in self.s.blobs:
            return None
        self.s.entries = [(new if k == old else k, v) for k, v in self.s.entries]
        self.s.blobs[new] = self.s.blobs.pop(old)
        if self.rng.random() < 0.6:
            for _, _, _, node in self.nodes():
                for key in ("tensor", "row_ptr", "col_idx", "perm"):
                    if node.get(key) == old:
                        node[key] = new
            return f"tensor {old[:40]!r} -> {new[:40]!r} (references follow)"
        return f"tensor {old[:40]!r} -> {new[:40]!r}"

    def m_unicode_mode(self) -> str | None:
        if self.rng.random() < 0.5:
            self.s.ascii_inner = False
            return "qformat JSON keeps non-ASCII characters raw"
        self.s.ascii_outer = False
        return "header keeps non-ASCII characters raw (lone surrogates become invalid UTF-8)"

    def m_record_fields(self) -> str | None:
        records = self.records()
        if not records:
            return None
        name, record = self.choice(records)
        what = self.choice(["shape", "shape", "dtype", "storage_bytes", "info", "info_nest", "not_object"])
        if what == "shape":
            shape = record.get("shape")
            options: list[Any] = [[0, 4], [4], [], [1] * 9, [2**40, 1], [-1, 4], [4.0, 4], [True, 4]]
            if isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape):
                r, c = shape
                options += [[r, 1, c], [r, c, 1], [r, 1, 1, 1, 1, 1, 1, c], [c, r], [r * c, 1], [r + 1, c]]
            record["shape"] = self.choice(options)
            return f"{name}: shape {shape} -> {record['shape']}"
        if what == "dtype":
            record["dtype"] = self.choice(["F64", "I8", "f32", "", None, "BF16", "F16", "U8"])
            return f"{name}: dtype -> {record['dtype']!r}"
        if what == "storage_bytes":
            self.s.fix_storage = False
            record["storage_bytes"] = self.choice(EXTREME_INTS + [1.5, "8", None])
            return f"{name}: storage_bytes -> {str(record['storage_bytes'])[:24]}"
        if what == "info":
            record["info"] = self.choice([None, [], "x", {"a": {"b": [1, 2]}}, {"\ud800": "\udfff"}])
            return f"{name}: info -> {str(record['info'])[:30]!r}"
        if what == "info_nest":
            record["info"] = {"deep": nested(self.choice(NEST_DEPTHS), self.choice(["list", "dict"]))}
            return f"{name}: info nests deeply"
        self.s.records()[name] = self.odd()
        return f"{name}: record -> non-object"

    def m_qmeta(self) -> str | None:
        what = self.choice(["version", "extra", "records_type", "not_object", "drop", "not_json", "many_records"])
        if self.s.qmeta is MISSING and what != "many_records":
            return None
        if what == "version" and isinstance(self.s.qmeta, dict):
            self.s.qmeta["format_version"] = self.choice([0, 2, -1, 1.0, "1", None, True, 2**64, Raw("1.0")])
            return f"format_version -> {self.s.qmeta['format_version']!r}"
        if what == "extra" and isinstance(self.s.qmeta, dict):
            self.s.qmeta[self.choice(["extra", "", "\ud800"])] = 1
            return "extra key in the qformat metadata"
        if what == "records_type" and isinstance(self.s.qmeta, dict):
            self.s.qmeta["records"] = self.choice([[], None, "x", 1, [{"shape": [1, 1]}]])
            return f"records -> {self.s.qmeta['records']!r}"
        if what == "not_object":
            self.s.qmeta = self.choice([[], None, "x", 1, Raw("1e400")])
            return f"qformat metadata -> {self.s.qmeta!r}"
        if what == "drop":
            self.s.qmeta = MISSING
            return "qformat metadata removed (records' tensors become plain)"
        if what == "not_json":
            self.s.qmeta = Raw(self.choice(["{", "", "{}}", '{"a":1,}', "\x00", "{\"records\":{}}x", "NaN"]))
            return f"qformat metadata text {str(self.s.qmeta)!r}"
        if what == "many_records":
            if self.s.qmeta is MISSING:
                self.s.qmeta = {"format_version": 1, "records": {}}
            if not (isinstance(self.s.qmeta, dict) and isinstance(self.s.qmeta.get("records"), dict)):
                return None
            table = self.s.qmeta["records"]
            for i in range(self.choice([100, 5000])):
                table[f"r{i}"] = {"shape": [1, 1], "dtype": "F32", "storage_bytes": 0, "weight": {}}
            return "thousands of empty records"
        return None

    def m_metadata(self) -> str | None:
        what = self.choice(["value_type", "extra", "dup_metadata", "metadata_type", "key_unicode", "qformat_type"])
        if what == "value_type" and self.s.metadata:
            key = self.choice(list(self.s.metadata))
            self.s.metadata[key] = self.choice([1, None, {}, [], True])
            return f"__metadata__[{key!r}] -> non-string"
        if what == "extra":
            self.s.metadata[self.choice(["x", "", "\ud800", "format"])] = self.choice(["y", "\ud800", "A" * 1000])
            return "extra __metadata__ entry"
        if what == "dup_metadata":
            self.s.header_extra.append(("__metadata__", {"format": "pt"}))
            return "__metadata__ twice in the header"
        if what == "metadata_type":
            self.s.header_extra.append(("__metadata__", self.choice([[], None, "x", 1])))
            return "a second, non-object __metadata__"
        if what == "key_unicode":
            self.s.metadata["\ud800"] = "\udfff"
            return "lone surrogates in __metadata__"
        if what == "qformat_type" and self.s.qmeta is not MISSING:
            self.s.metadata["qformat"] = self.choice([1, None, {}, [], True])
            self.s.qmeta = MISSING
            return "__metadata__['qformat'] -> non-string"
        return None
