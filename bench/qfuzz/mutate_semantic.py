"""Mutations that know what fields mean: tile grids, shapes, CSR and permutation data, amplifying records."""

from __future__ import annotations

import numpy as np

from .mutate_base import (
    FLOAT_DTYPES,
    HUGE_DIMS,
    INT_DTYPES,
    MutatorBase,
    float_bits,
    int_range,
    short,
)
from .sample import DTYPES


class SemanticMutations(MutatorBase):
    """Mutations that keep a record consistent while pushing one field to an edge."""

    def m_group_shape(self) -> str | None:
        nodes = [n for n in self.nodes_of("affine", "lut", "scale") if "group_shape" in n[3]]
        if not nodes:
            return None
        name, _, _, node = self.choice(nodes)
        shape = self.out_shape(node)
        old = node.get("group_shape")
        dims = []
        for i in range(2):
            keep = old[i] if isinstance(old, list) and len(old) == 2 else 1
            options = [keep, keep, 1] + HUGE_DIMS
            if shape and len(shape) == 2:
                options += [shape[i], shape[i] + 1, 2 * shape[i]]
            dims.append(self.choice(options))
        node["group_shape"] = dims
        resized = []
        if shape and len(shape) == 2 and self.rng.random() < 0.85:
            grid = (-(-shape[0] // dims[0]), -(-shape[1] // dims[1]))
            for key in ("scale", "zero", "factor", "table"):
                param = node.get(key)
                if not (isinstance(param, dict) and param.get("codec") == "tensor"):
                    continue
                current = self.s.array(param.get("tensor")) if isinstance(param.get("tensor"), str) else None
                if current is None or current.shape == (1, 1):
                    continue
                want = grid + current.shape[2:] if key == "table" else grid
                if int(np.prod(want, dtype=object)) > 1 << 20:
                    continue
                dtype = self.s.entry(param["tensor"])["dtype"]
                data = self.random_float(dtype, want) if dtype in FLOAT_DTYPES else np.zeros(want, DTYPES[dtype])
                self.s.set_tensor(param["tensor"], dtype, data)
                resized.append(key)
        return f"{name}: {node.get('codec')} group_shape {old} -> {dims}, resized {resized}"

    def m_node_shape(self) -> str | None:
        nodes = [n for n in self.nodes_of("packed", "bitplanes", "ternary", "vq", "sparse_csr") if "shape" in n[3]]
        if not nodes:
            return None
        name, _, _, node = self.choice(nodes)
        old = node.get("shape")
        if not (isinstance(old, list) and len(old) == 2 and all(type(d) is int for d in old)):
            return None
        i = self.rng.randrange(2)
        new = list(old)
        new[i] = self.choice([0, 1, old[i] - 1, old[i] + 1, old[i] * 8] + HUGE_DIMS)
        node["shape"] = new
        codec = node.get("codec")
        fixed = ""
        if codec in ("packed", "bitplanes", "ternary") and self.rng.random() < 0.7 and isinstance(node.get("tensor"),
                                                                                                  str):
            bits = node.get("bits") if type(node.get("bits")) is int and 1 <= node.get("bits") <= 16 else 1
            rows, cols = new
            if codec == "packed":
                want: tuple[int, ...] = (rows, (cols * bits + 7) // 8)
            elif codec == "bitplanes":
                want = (bits, rows, (cols + 7) // 8)
            else:
                want = (rows, -(-cols // 5))
            if 0 <= int(np.prod(want, dtype=object)) <= 1 << 22:
                self.s.set_tensor(node["tensor"], "U8", np.zeros(want, np.uint8))
                fixed = f", tensor resized to {list(want)}"
        return f"{name}: {codec} shape {old} -> {new}{fixed}"

    def m_csr(self) -> str | None:
        nodes = self.nodes_of("sparse_csr")
        if not nodes or self.rng.random() < 0.25:
            spots = [(n, p, k, node) for n, p, k, node in self.nodes() if node.get("codec") != "sum"]
            if not spots:
                return None
            name, parent, key, node = self.choice(spots)
            shape = self.out_shape(node)
            if not shape or len(shape) != 2:
                return None
            parent[key] = {"codec": "sum", "version": 1, "terms": [node, self.new_csr(name, *shape)]}
            nodes = [(name, parent[key]["terms"], 1, parent[key]["terms"][1])]
        name, _, _, node = self.choice(nodes)
        ptr_ref = self.int_tensor_of(node, "row_ptr")
        idx_ref = self.int_tensor_of(node, "col_idx")
        if ptr_ref is None or idx_ref is None:
            return None
        (ptr_name, ptr), (idx_name, idx) = ptr_ref, idx_ref
        rows = len(ptr) - 1 if ptr.ndim == 1 else 0
        nnz = int(idx.size)
        cols = node["shape"][1] if isinstance(node.get("shape"), list) and len(node["shape"]) == 2 else 1
        what = self.choice(["wrap", "wrap", "extreme", "decreasing", "end_off", "idx", "idx", "idx_order", "nnz"])
        big = self.choice([2**63 - 1, 2**62, 2**63 - 2, 2**40])
        if what == "wrap" and rows >= 2:
            new = np.full(rows + 1, nnz, np.int64)
            new[0] = 0
            new[1] = big
            new[2] = -2 if rows >= 3 else nnz
            if rows >= 3 and self.rng.random() < 0.5:
                new[1:-1] = [self.choice([big, -big, -2, 2**63 - 1, -2**63]) for _ in range(rows - 1)]
            self.s.set_tensor(ptr_name, "I64", new)
            return f"{name}: row_ptr I64 {short(new)} (wraps around int64), nnz={nnz}"
        if what == "extreme":
            dtype = self.s.entry(ptr_name)["dtype"]
            lo, hi = int_range(dtype) if dtype in INT_DTYPES else (-2**31, 2**31 - 1)
            new = ptr.astype(np.int64).copy()
            if new.size:
                new[self.rng.randrange(new.size)] = self.choice([lo, hi, -1, nnz + 1, hi - 1])
            self.s.set_tensor(ptr_name, dtype if dtype in INT_DTYPES else "I32", new)
            return f"{name}: row_ptr {short(new)}"
        if what == "decreasing":
            new = np.zeros(rows + 1, np.int64)
            new[-1] = nnz
            if rows >= 2:
                new[1] = nnz + self.rng.randrange(1, 5)
            self.s.set_tensor(ptr_name, self.choice(["I32", "I64"]), new)
            return f"{name}: row_ptr {short(new)}"
        if what == "end_off":
            new = ptr.astype(np.int64).copy()
            if new.size:
                new[-1] += self.choice([-1, 1, 2**31])
            self.s.set_tensor(ptr_name, "I64", new)
            return f"{name}: row_ptr ends at {new[-1] if new.size else None} with nnz={nnz}"
        if what == "idx" and nnz:
            dtype = self.s.entry(idx_name)["dtype"]
            lo, hi = int_range(dtype) if dtype in INT_DTYPES else (-2**31, 2**31 - 1)
            new = idx.astype(np.int64).copy()
            new[self.rng.randrange(nnz)] = self.choice([lo, hi, -1, cols, cols - 1, cols + 1, 0])
            self.s.set_tensor(idx_name, dtype if dtype in INT_DTYPES else "I32",
                              new.astype(DTYPES.get(dtype, np.dtype("<i4"))))
            return f"{name}: col_idx {short(new)} (cols={cols})"
        if what == "idx_order" and nnz >= 2:
            new = idx.copy()
            new[:] = new[::-1] if self.rng.random() < 0.5 else new[0]
            self.s.set_tensor(idx_name, self.s.entry(idx_name)["dtype"], new)
            return f"{name}: col_idx reordered {short(new)}"
        if what == "nnz":
            n = self.choice([0, 1, nnz + 1, max(nnz - 1, 0), 1000])
            dtype = self.s.entry(idx_name)["dtype"]
            new_idx = np.minimum(np.arange(n), max(cols - 1, 0)).astype(DTYPES.get(dtype, np.dtype("<i4")))
            self.s.set_tensor(idx_name, dtype, new_idx)
            values = node.get("values")
            if isinstance(values, dict) and values.get("codec") == "tensor" and isinstance(values.get("tensor"), str):
                vdtype = self.s.entry(values["tensor"])["dtype"] if self.s.entry(values["tensor"]) else "F16"
                if vdtype in FLOAT_DTYPES:
                    self.s.set_tensor(values["tensor"], vdtype, self.random_float(vdtype, (n,)))
            return f"{name}: nnz {nnz} -> {n} (col_idx and values resized)"
        return None

    def m_perm(self) -> str | None:
        nodes = self.nodes_of("permute")
        if not nodes:
            return None
        name, _, _, node = self.choice(nodes)
        ref = self.int_tensor_of(node, "perm")
        if ref is None or ref[1].ndim != 1:
            return None
        perm_name, perm = ref
        n = perm.size
        dtype = self.s.entry(perm_name)["dtype"]
        what = self.choice(["dup", "neg", "n", "extreme_i64", "reverse", "len", "retype"])
        new = perm.astype(np.int64).copy()
        if what == "dup" and n >= 2:
            new[self.rng.randrange(n)] = new[self.rng.randrange(n)]
        elif what == "neg" and n:
            new[self.rng.randrange(n)] = -1
        elif what == "n" and n:
            new[self.rng.randrange(n)] = n
        elif what == "extreme_i64" and n:
            new[self.rng.randrange(n)] = self.choice([2**63 - 1, -2**63, 2**31 - 1, -2**31, 2**32 + 1])
            dtype = "I64"
        elif what == "reverse":
            new = new[::-1].copy()
        elif what == "len":
            new = np.arange(self.choice([0, 1, n + 1, max(n - 1, 0)]))
        elif what == "retype":
            dtype = self.choice(["U8", "U32", "U64", "F32", "I8", "BOOL", "I32", "I64", "U16", "I16"])
        else:
            return None
        if dtype in INT_DTYPES or dtype == "BOOL":
            lo, hi = int_range(dtype) if dtype in INT_DTYPES else (0, 1)
            data = np.clip(new, max(lo, -2**63), min(hi, 2**63 - 1)).astype(DTYPES[dtype]) if what != "extreme_i64" else new.astype(DTYPES[dtype])
        else:
            data = float_bits(new.astype(np.float32), dtype)
        self.s.set_tensor(perm_name, dtype, data)
        return f"{name}: perm {what} -> {dtype} {short(data)}"

    def pick_record_for_generator(self) -> tuple[str, dict] | None:
        records = self.records()
        return self.choice(records) if records else None

    def m_gen_lowrank(self) -> str | None:
        target = self.pick_record_for_generator()
        if target is None:
            return None
        name, record = target
        total = self.choice([2**20, 2**24 + 1, 2**27, 2**30, 2**32, 2**34, 2**34 + 2**18])
        rows = 1 << self.rng.randrange(4, 18)
        cols = max(1, total // rows)
        if rows > 2**18 or cols > 2**18:
            rows = cols = int(total**0.5)
        k = self.choice([1, 1, 2, 4])
        a = self.tensor_node(name, "F16", self.random_float("F16", (rows, k)))
        b = self.tensor_node(name, "F16", self.random_float("F16", (k, cols)))
        weight: dict = {"codec": "lowrank", "version": 1, "a": a, "b": b}
        note = ""
        if self.rng.random() < 0.3:
            weight = {"codec": "sum", "version": 1, "terms": [weight] * self.choice([2, 16, 64])}
            note = f" summed {len(weight['terms'])} times"
        self.replace_weight(name, record, weight, [rows, cols])
        return f"{name}: lowrank [{rows}, {k}] @ [{k}, {cols}] ({rows * cols} weights){note}"

    def m_gen_empty_csr(self) -> str | None:
        target = self.pick_record_for_generator()
        if target is None:
            return None
        name, record = target
        rows = self.choice([1, 3, 2**10, 2**14, 2**16])
        cols = self.choice([2**10, 2**18, 2**20, 2**30, 2**39])
        ptr = np.zeros(rows + 1, np.int64)
        node = {"codec": "sparse_csr", "version": 1, "shape": [rows, cols],
                "row_ptr": self.new_tensor(name, self.choice(["I32", "I64"]), ptr),
                "col_idx": self.new_tensor(name, "I32", np.zeros(0, np.int32)),
                "values": self.tensor_node(name, "F16", np.zeros(0, np.uint16))}
        self.replace_weight(name, record, node, [rows, cols])
        return f"{name}: empty sparse_csr of [{rows}, {cols}]"

    def m_gen_vq(self) -> str | None:
        target = self.pick_record_for_generator()
        if target is None:
            return None
        name, record = target
        rows = self.choice([1, 2**10, 2**14, 2**17])
        d = self.choice([1, 2**10, 2**14, 2**17])
        m, k = self.choice([(1, 1), (1, 2), (2, 1)])
        codes = self.np.integers(0, k, (rows, m)).astype(np.uint8)
        node = {"codec": "vq", "version": 1, "shape": [rows, d],
                "codes": self.tensor_node(name, "U8", codes),
                "codebooks": self.tensor_node(name, "F16", self.random_float("F16", (m, k, d)))}
        self.replace_weight(name, record, node, [rows, d])
        return f"{name}: vq of [{rows}, {d}] from codes [{rows}, {m}] and books [{m}, {k}, {d}]"

    def m_gen_sum(self) -> str | None:
        target = self.pick_record_for_generator()
        if target is None:
            return None
        name, record = target
        side = self.choice([256, 1024, 2048, 4096])
        a = self.tensor_node(name, "F16", self.random_float("F16", (side, 64)))
        b = self.tensor_node(name, "F16", self.random_float("F16", (64, side)))
        term = {"codec": "lowrank", "version": 1, "a": a, "b": b}
        n = self.choice([8, 64])
        self.replace_weight(name, record, {"codec": "sum", "version": 1, "terms": [term] * n}, [side, side])
        return f"{name}: sum of {n} references to one [{side}, 64] @ [64, {side}] product"
