"""Mutations of tensor bytes and of the safetensors container (entries, offsets, header length, bytes)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from .jsontext import Raw
from .mutate_base import (
    BAD_DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    MutatorBase,
    float_specials,
    int_range,
    short,
)
from .sample import DTYPES


class DataMutations(MutatorBase):
    """Tensor bytes and container mutations."""

    def m_flip_bytes(self) -> str | None:
        names = [n for n in self.s.tensor_names() if self.s.blobs.get(n)]
        if not names:
            return None
        name = self.choice(names)
        data = bytearray(self.s.blobs[name])
        for _ in range(self.choice([1, 1, 2, 4, 16])):
            i = self.rng.randrange(len(data))
            data[i] = self.choice([0x00, 0xFF, 0x80, 0x7F, data[i] ^ (1 << self.rng.randrange(8))])
        self.s.blobs[name] = bytes(data)
        return f"bytes of {name[-40:]}"

    def m_int_values(self) -> str | None:
        picked = self.pick_tensor(INT_DTYPES)
        if picked is None or picked[1].size == 0:
            return None
        name, array, dtype = picked
        lo, hi = int_range(dtype)
        flat = array.reshape(-1)
        for _ in range(self.choice([1, 1, 3, flat.size])):
            flat[self.rng.randrange(flat.size)] = self.choice([lo, hi, 0, -1 if lo < 0 else hi, hi // 2, lo + 1])
        self.s.set_tensor(name, dtype, flat.reshape(array.shape))
        return f"{name[-40:]} {dtype} values {short(flat)}"

    def m_float_specials(self) -> str | None:
        picked = self.pick_tensor(FLOAT_DTYPES)
        if picked is None or picked[1].size == 0:
            return None
        name, array, dtype = picked
        flat = array.reshape(-1)
        specials = float_specials(dtype)
        for _ in range(self.choice([1, 2, flat.size])):
            flat[self.rng.randrange(flat.size)] = self.choice(specials)
        self.s.set_tensor(name, dtype, flat.reshape(array.shape))
        return f"{name[-40:]} {dtype} NaN/Inf/extremes"

    def m_retype(self) -> str | None:
        names = self.s.tensor_names()
        if not names:
            return None
        name = self.choice(names)
        entry = self.s.entry(name)
        old = entry.get("dtype")
        nbytes = len(self.s.blobs[name])
        same_size = [d for d in DTYPES if old in DTYPES and DTYPES[d].itemsize == DTYPES[old].itemsize and d != old]
        r = self.rng.random()
        if r < 0.5 and same_size:
            entry["dtype"] = self.choice(same_size)
        elif r < 0.8 and old in DTYPES and isinstance(entry.get("shape"), list) and entry["shape"]:
            new = self.choice([d for d in DTYPES if d != old])
            size = DTYPES[new].itemsize
            entry["dtype"] = new
            if nbytes % size == 0 and len(entry["shape"]) >= 1:  # keep the bytes, fix the last dim
                rest = int(np.prod(entry["shape"][:-1], dtype=object)) or 1
                if (nbytes // size) % rest == 0:
                    entry["shape"] = entry["shape"][:-1] + [nbytes // size // rest]
        else:
            entry["dtype"] = self.choice(BAD_DTYPES + [1, None])
        return f"{name[-40:]} dtype {old} -> {entry['dtype']!r} shape {entry.get('shape')}"

    def m_reshape(self) -> str | None:
        picked = self.pick_tensor()
        if picked is None:
            return None
        name, array, dtype = picked
        n = array.size
        options = [(n,), (1, n), (n, 1), (1, 1, n), (0,), (0, n), (1,) * 8 + (n,) if n else (0,), ()]
        if array.ndim == 2:
            options += [array.shape[::-1], (array.shape[0] + 1, array.shape[1]), (array.shape[0], array.shape[1] - 1)]
        shape = self.choice(options)
        count = int(np.prod(shape, dtype=object))
        if count == n:
            data = array.reshape(shape)
        else:
            data = np.zeros(shape, array.dtype) if count < 1 << 22 else None
        if data is None:
            return None
        self.s.set_tensor(name, dtype, data)
        return f"{name[-40:]} reshaped {list(array.shape)} -> {list(shape)}"

    def m_tensor_set(self) -> str | None:
        what = self.choice(["drop", "dup_entry", "plain_named_like_record", "zero_size_huge", "extra_unreferenced"])
        names = self.s.tensor_names()
        records = [r for r, _ in self.records()]
        if what == "drop" and names:
            name = self.choice(names)
            self.drop_tensor(name)
            return f"dropped {name[-40:]}"
        if what == "dup_entry" and names:
            name = self.choice(names)
            entry = self.s.entry(name)
            self.s.entries.append((name, dict(entry)))
            return f"{name[-40:]} twice in the header"
        if what == "plain_named_like_record" and records:
            self.s.set_tensor(self.choice(records), "F32", np.zeros((1,), np.float32))
            return "a plain tensor with a record's name"
        if what == "zero_size_huge":
            shape = self.choice([(0, 2**40 - 1), (2**40 - 1, 0, 2**40 - 1), (0,) * 8])
            name = self.choice(["plain.empty", "", "plain.\ud800"])
            if name not in self.s.blobs:
                self.s.entries.append((name, {"dtype": self.choice(["F32", "U8", "BOOL"]), "shape": list(shape),
                                              "data_offsets": [0, 0]}))
                self.s.blobs[name] = b""
            return f"an empty plain tensor of shape {list(shape)}"
        if what == "extra_unreferenced" and records:
            record = self.choice(records)
            self.s.set_tensor(f"{record}.unused", "U8", np.zeros(3, np.uint8))
            return f"{record}.unused stored but not referenced"
        return None

    # -- container -------------------------------------------------------------------------------------------------
    def m_entry(self) -> str | None:
        names = self.s.tensor_names()
        if not names:
            return None
        name = self.choice(names)
        entry = self.s.entry(name)
        what = self.choice(["shape", "extra_key", "missing_key", "not_object", "shape_type"])
        if what == "shape":
            entry["shape"] = self.choice([[-1], [2**40], [2**64], [1] * 9, [2**20, 2**20, 2**20], [0, -1]])
        elif what == "extra_key":
            entry[self.choice(["extra", "dtype ", ""])] = 1
        elif what == "missing_key":
            entry.pop(self.choice(["dtype", "shape", "data_offsets"]))
        elif what == "not_object":
            self.s.entries = [(k, self.odd() if k == name else v) for k, v in self.s.entries]
        else:
            entry["shape"] = self.choice([[1.0], [True], ["1"], None, 5, [[1]], [Raw("1e400")]])
        return f"header entry {name[-40:]}: {what}"

    def m_offsets(self) -> str | None:
        names = self.s.tensor_names()
        if not names:
            return None
        self.s.to_bytes()  # lay out the current offsets first
        self.s.fix_offsets = False
        entry = self.s.entry(self.choice(names))
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return None
        what = self.choice(["shift", "swap", "reverse", "extreme", "overlap", "type"])
        if what == "shift":
            d = self.choice([-8, -1, 1, 2, 8])
            entry["data_offsets"] = [offsets[0] + d, offsets[1] + d]
        elif what == "swap" and len(names) >= 2:
            other = self.s.entry(self.choice(names))
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        elif what == "reverse":
            entry["data_offsets"] = [offsets[1], offsets[0]]
        elif what == "extreme":
            entry["data_offsets"] = [self.choice([0, offsets[0], 2**63, 2**64 - 1, -1]),
                                     self.choice([offsets[1], 2**63, 2**64, 2**64 + 16, 0])]
        elif what == "overlap":
            entry["data_offsets"] = [0, offsets[1] - offsets[0]]
        else:
            entry["data_offsets"] = self.choice([[0], [0, 1, 2], "0,1", None, [0.0, 4.0], [Raw("1e400"), 0]])
        return f"data_offsets {what}"

    def m_container(self) -> str | None:
        what = self.choice(["header_len", "truncate", "append", "header_byte", "bom", "trailing", "nul"])
        if what == "header_len":
            value = self.choice([0, 1, 2, 7, 8, 2**20 * 100 + 1, 2**63, 2**64 - 1, -1, -8, +1, +8])
            self.s.post.append(lambda b, v=value: struct.pack("<Q", _header_len(b, v)) + b[8:])
            return f"header length {value:+d}" if value in (-1, -8, 1, 8) else f"header length = {value}"
        if what == "truncate":
            frac = self.rng.random()
            self.s.post.append(lambda b, f=frac: b[:int(len(b) * f)])
            return f"truncated at {frac:.2f}"
        if what == "append":
            extra = self.choice([b"\x00", b" ", b"\xff" * 7, b"x" * 4096])
            self.s.post.append(lambda b, e=extra: b + e)
            return f"{len(extra)} bytes appended"
        if what == "header_byte":
            pos, byte = self.rng.random(), self.rng.randrange(256)
            self.s.post.append(lambda b, p=pos, v=byte: _set_header_byte(b, p, v))
            return f"header byte at {pos:.2f} -> {byte:#x}"
        if what == "bom":
            self.s.post.append(lambda b: _replace_header(b, lambda h: b"\xef\xbb\xbf" + h))
            return "UTF-8 BOM before the header"
        if what == "trailing":
            tail = self.choice([b"x", b"}", b"\x00", b" " * 8, b"\n"])
            self.s.post.append(lambda b, t=tail: _replace_header(b, lambda h: h.rstrip(b" ") + t))
            return f"header ends with {tail!r}"
        self.s.post.append(lambda b: _replace_header(b, lambda h: h.replace(b'"dtype"', b'"dt\x00ype"', 1)))
        return "NUL byte inside a header key"


def _header_len(data: bytes, value: int) -> int:
    if len(data) < 8:
        return 0
    (current,) = struct.unpack("<Q", data[:8])
    if value in (-1, -8, 1, 8):
        value = current + value
    return value % 2**64


def _replace_header(data: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    if len(data) < 8:
        return data
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(data[8:8 + length])
    return struct.pack("<Q", len(header)) + header + data[8 + length:]


def _set_header_byte(data: bytes, pos: float, value: int) -> bytes:
    def edit(header: bytes) -> bytes:
        if not header:
            return header
        i = int(pos * len(header))
        return header[:i] + bytes([value]) + header[i + 1:]

    return _replace_header(data, edit)
