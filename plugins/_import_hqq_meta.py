"""HQQ's per-module metadata as ``HQQLinear.state_dict()`` encodes it for safetensors (``hqq/core/utils.py``
``encode_safetensor_type``): strings and dtypes as uint8 character codes, booleans as uint8, integers as int32, a
float ``nbits`` (1.58) as float32, ``shape`` as int64. Decoded here by value, never by ``eval`` (HQQ ``eval``-s the
dtype strings): a dtype is one of a fixed list of names.

Packings (``hqq/core/bitpack.py``) store the group matrix ``M`` [Mr, Mc] packed along its rows: slice ``k`` of
``M`` (rows ``k * step`` ... ``(k + 1) * step - 1``) sits at bit offset ``shift_k`` of every element of ``W_q``
[step, Mc], the first slice in the most significant bits; 3-bit packs ten slices into int32 words (the last
word's unused slices are zero rows, dropped after unpacking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._import_folder import CheckpointFolder
from ._import_hf import source_error

DTYPES = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32"}
VIEW_DTYPES = {"torch.uint8": np.dtype(np.uint8), "torch.int32": np.dtype(np.int32)}
# packing -> (slices per element, bits per slice, container dtype)
PACKINGS = {"8bit_u8": (1, 8, np.uint8), "4bit_u8": (2, 4, np.uint8), "2bit_u8": (4, 2, np.uint8),
            "1bit_u8": (8, 1, np.uint8), "3bit_32": (10, 3, np.int32)}
NBITS = {8: ("8bit_u8",), 6: ("8bit_u8",), 5: ("8bit_u8",), 4: ("4bit_u8",), 3: ("3bit_32",), 2: ("2bit_u8",),
         1.58: ("2bit_u8",), 1: ("1bit_u8",)}
FLAGS = ("view_as_float", "quant_scale", "quant_zero", "offload_meta", "encoded_state_dict", "stores_quant_config",
         "channel_wise", "optimize", "round_zero")
KNOWN = {"W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing", "unpack_view_dtype",
         "compute_dtype", "bias", *FLAGS}


@dataclass(frozen=True)
class HQQMeta:
    nbits: float
    bits: int  # code width in the record: ceil(nbits)
    group_size: int | None
    shape: tuple[int, int]
    axis: int
    packing: str
    view_as_float: bool
    channel_wise: bool
    dtype: str  # record dtype, from compute_dtype

    @property
    def group_matrix(self) -> tuple[int, int]:
        """[Mr, Mc]: HQQ's reshape of the weight before quantizing (``[-1, g]`` on axis 1, ``[g, -1]`` on axis 0)."""
        rows, cols = self.shape
        if not self.channel_wise:
            return rows, cols
        assert self.group_size is not None
        other = rows * cols // self.group_size
        return (other, self.group_size) if self.axis == 1 else (self.group_size, other)


class _Reader:
    def __init__(self, folder: CheckpointFolder, tensors: dict[str, str]) -> None:
        self.folder, self.tensors = folder, tensors

    def fail(self, key: str, message: str) -> Exception:
        return source_error(self.folder, self.tensors.get(key, key), message, key)

    def array(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise self.fail(key, f"HQQ metadata {key!r} is missing")
        return self.folder.read(self.tensors[key])

    def scalar(self, key: str) -> Any:
        value = self.array(key)
        if value.size != 1 or value.dtype.kind not in "uif":
            raise self.fail(key, f"HQQ metadata {key!r} is not a number ({value.dtype} {list(value.shape)})")
        return value.reshape(-1)[0].item()

    def text(self, key: str) -> str:
        value = self.array(key)
        if value.dtype != np.uint8 or value.ndim != 1:
            raise self.fail(key, f"HQQ metadata {key!r} is not a uint8 character string")
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(key, f"HQQ metadata {key!r} is not ASCII") from None

    def flag(self, key: str, default: bool = False) -> bool:
        if key not in self.tensors:
            return default
        value = self.scalar(key)
        if value not in (0, 1):
            raise self.fail(key, f"HQQ flag {key!r} is {value!r}, not 0 or 1")
        return bool(value)


def read_meta(folder: CheckpointFolder, prefix: str, tensors: dict[str, str]) -> HQQMeta:
    """The module's metadata, checked against itself (the caller checks the shape against the config)."""
    unknown = sorted(set(tensors) - KNOWN)
    if unknown:
        raise source_error(folder, tensors[unknown[0]], f"unknown HQQ tensor {unknown[0]!r}", unknown[0])
    r = _Reader(folder, tensors)
    for key in ("quant_scale", "quant_zero"):
        if r.flag(key):
            raise r.fail(key, f"{key} is set: HQQ's quantized scale/zero metadata cannot be serialized to "
                         "safetensors, so no layout for it exists to import")
    for key in FLAGS:
        r.flag(key)  # every flag present is a 0/1 number
    nbits = r.scalar("nbits")
    nbits = 1.58 if isinstance(nbits, float) and abs(nbits - 1.58) < 1e-6 else nbits
    if nbits not in NBITS:
        raise r.fail("nbits", f"nbits {nbits!r} is none of HQQ's {sorted(NBITS)}")
    packing = r.text("packing")
    if packing not in NBITS[nbits]:
        raise r.fail("packing", f"packing {packing!r} is not HQQ's for nbits {nbits} ({NBITS[nbits][0]})")
    if "unpack_view_dtype" in tensors:
        view = r.text("unpack_view_dtype")
        if VIEW_DTYPES.get(view) != np.dtype(PACKINGS[packing][2]):
            raise r.fail("unpack_view_dtype", f"unpack_view_dtype {view!r} does not match packing {packing!r}")
    compute = r.text("compute_dtype") if "compute_dtype" in tensors else "torch.float16"
    if compute not in DTYPES:
        raise r.fail("compute_dtype", f"compute_dtype {compute!r} is none of {sorted(DTYPES)}")
    shape = r.array("shape")
    if shape.shape != (2,) or shape.dtype.kind not in "ui" or int(shape.min()) <= 0:
        raise r.fail("shape", f"shape {shape.tolist()!r} is not [out, in]")
    rows, cols = (int(d) for d in shape)
    axis = r.scalar("axis")
    if axis not in (0, 1):
        raise r.fail("axis", f"axis {axis!r} is neither 0 nor 1")
    channel_wise = r.flag("channel_wise", True)
    group = None
    if channel_wise:
        group = r.scalar("group_size") if "group_size" in tensors else None
        if not isinstance(group, int) or group <= 0 or (rows * cols) % group:
            raise r.fail("group_size", f"group_size {group!r} does not divide the {rows * cols} weights")
    return HQQMeta(float(nbits) if nbits == 1.58 else int(nbits), int(np.ceil(nbits)), group, (rows, cols),
                   int(axis), packing, r.flag("view_as_float"), channel_wise, DTYPES[compute])


def packed_words(folder: CheckpointFolder, name: str, meta: HQQMeta) -> np.ndarray:
    """The stored ``W_q`` as its packing's words [ceil(Mr / slices), Mc], checked (a memory-mapped view)."""
    per, _, container = PACKINGS[meta.packing]
    raw = folder.read(name)
    if meta.view_as_float:
        if raw.ndim != 2 or (raw.shape[1] * raw.dtype.itemsize) % np.dtype(container).itemsize:
            raise source_error(folder, name, f"W_q {raw.dtype} {list(raw.shape)} cannot be viewed as {container}",
                               "W_q")
        raw = np.ascontiguousarray(raw).view(container)
    mr, mc = meta.group_matrix
    step = -(-mr // per)
    if raw.dtype != np.dtype(container) or raw.shape != (step, mc) or (per != 10 and mr % per):
        raise source_error(folder, name, f"W_q is {raw.dtype} {list(raw.shape)} where packing {meta.packing!r} of "
                           f"the {mr} x {mc} group matrix is {np.dtype(container).name} {[step, mc]}", "W_q")
    return raw


def unpack(folder: CheckpointFolder, name: str, meta: HQQMeta) -> np.ndarray:
    """The group matrix M [Mr, Mc] of codes (uint8) from the stored ``W_q``."""
    per, width, container = PACKINGS[meta.packing]
    raw = packed_words(folder, name, meta)
    mr = meta.group_matrix[0]
    words = raw.view(np.uint32) if container is np.int32 else raw
    mask = (1 << width) - 1
    slices = [(words >> ((per - 1 - k) * width)) & mask for k in range(per)]
    codes = np.concatenate(slices, axis=0)[:mr].astype(np.uint8)
    if int(codes.max(initial=0)) >= 1 << meta.bits:
        raise source_error(folder, name, f"a code of {int(codes.max())} exceeds {meta.nbits}-bit codes", "W_q")
    return codes
