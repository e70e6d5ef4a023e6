"""One compressed-tensors module -> one record, per compression format, following the library's ``decompress``
(0.20.1) operation by operation:

- ``pack-quantized`` / ``int-quantized`` / ``naive-quantized`` (int): codes are signed ``q`` stored as ``q + 2^(b−1)``
  (``pack_to_int32``'s offset; int8 tensors as they are), zero points likewise; ``_dequantize`` computes
  ``(q − z) · s`` in the scale's dtype. Record: ``affine(packed q + 2^(b−1), scale, z + 2^(b−1) or the constant
  2^(b−1) when symmetric)``: the same differences, exact, times the same scale.
- ``float-quantized`` / ``naive-quantized`` (float, FP8 E4M3 weight): ``weight.to(scale.dtype) · scale``. Record:
  ``scale(lut(E4M3 bytes, E4M3 table), scale)``.
- ``mxfp8-quantized``: the same with E8M0 scale codes (``decompress_mx_scale``: ``2^(e − 127)``) as a ``lut``.
- ``nvfp4-pack-quantized``: ``unpack_fp4_from_uint8`` values times ``scale / global_scale`` (the E4M3 block scale
  divided by the fp32 global scale in fp32 first, ``_dequantize``). Record: the factor is a ``lut`` of the E4M3 codes
  into ``fp32(E4M3[i] / global)`` (spec: NVFP4), so the division happens once per code, identically.
- ``mxfp4-pack-quantized``: FP4 values times ``2^(e − 127)``.

Scale grids by strategy: tensor ``[1, 1]`` over the whole matrix, channel ``[R, 1]``, group and tensor_group
``[R, C / g]`` (the library requires ``g`` to divide ``C``), block ``[⌈R / bh⌉, ⌈C / bw⌉]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qformat.errors import SourceError
from qformat.plugin import RecordBuilder

from ._import_actorder import column_groups
from ._import_bits import padded_codes, padded_words, stream_codes, stream_words
from ._import_ct_config import CTConfig, Scheme, int_layout
from ._import_records import (
    E4M3_NAN_CODES,
    E8M0_NAN_CODE,
    affine_tree,
    e4m3_values,
    e8m0_values,
    fp4_block_tree,
    fp8_tree,
)

SCALE_DTYPES = ("float16", "bfloat16", "float32")


class Module:
    """A quantized module's stored tensors (``part -> array``) and where they are, for errors."""

    def __init__(self, name: str, stored: dict[str, np.ndarray], file: str, scheme: Scheme, fmt: str) -> None:
        self.name, self.stored, self.file, self.scheme, self.fmt = name, stored, file, scheme, fmt

    def error(self, part: str, message: str, field: str = "shape") -> SourceError:
        return SourceError(message, file=self.file, tensor=f"{self.name}.{part}", field=field)

    def need(self, part: str) -> np.ndarray:
        array = self.stored.get(part)
        if array is None:
            raise self.error(part, f"module {self.name} ({self.fmt}) has no {part} tensor", part)
        return array

    def shape(self) -> tuple[int, int]:
        """[out, in] of the weight the module stores."""
        if self.fmt == "pack-quantized":
            raw = self.need("weight_shape")
            if raw.dtype.kind not in "iu" or raw.shape != (2,):
                raise self.error("weight_shape", f"weight_shape is {raw.dtype} {list(raw.shape)}, not 2 integers")
            return int(raw[0]), int(raw[1])
        if self.fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            packed = self.need("weight_packed")
            if packed.ndim != 2 or packed.dtype != np.uint8:
                raise self.error("weight_packed", f"weight_packed is {packed.dtype} {list(packed.shape)}, not 2-D "
                                 "uint8 (two FP4 codes per byte)", "dtype")
            return int(packed.shape[0]), 2 * int(packed.shape[1])
        weight = self.need("weight")
        if weight.ndim != 2:
            raise self.error("weight", f"weight is {list(weight.shape)}, not 2-D")
        return int(weight.shape[0]), int(weight.shape[1])


def scale_grid(m: Module, out: int, cols: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The module's scale as a 2-D parameter array and its group shape over [out, cols]."""
    scale = m.need("weight_scale") if scale is None else scale
    strategy = m.scheme.strategy
    if strategy == "tensor":
        expected, group = (1, 1), (out, cols)
        if scale.size == 1:
            return scale.reshape(1, 1), group
    elif strategy == "channel":
        expected, group = (out, 1), (1, cols)
        if scale.shape in ((out, 1), (out,)):
            return scale.reshape(out, 1), group
    elif strategy in ("group", "tensor_group"):
        size = m.scheme.group_size
        if not size or size <= 0 or cols % size:
            raise m.error("weight_scale", f"group_size {size} does not divide the {cols} input columns (compressed-"
                          "tensors' dequantization requires it)", "group_size")
        expected, group = (out, cols // size), (1, size)
    elif strategy == "block":
        block = (m.scheme.weights or {}).get("block_structure")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)):
            raise m.error("weight_scale", f"block strategy without a block_structure ({block!r})", "block_structure")
        expected, group = (math.ceil(out / block[0]), math.ceil(cols / block[1])), (block[0], block[1])
    else:
        raise m.error("weight_scale", f"weight strategy {strategy!r} is not supported (tensor, channel, group, "
                      "tensor_group, block)", "strategy")
    if scale.shape != expected:
        raise m.error("weight_scale", f"weight_scale is {list(scale.shape)} where the {strategy} strategy over a "
                      f"[{out}, {cols}] weight implies {list(expected)}")
    return scale, group


def _float_scale(m: Module) -> np.ndarray:
    scale = m.need("weight_scale")
    if scale.dtype.name not in SCALE_DTYPES:
        raise m.error("weight_scale", f"weight_scale dtype {scale.dtype.name} (expected {', '.join(SCALE_DTYPES)})",
                      "dtype")
    return scale


def _unpack(m: Module, config: CTConfig, part: str, words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Rows of int32 words -> ``count`` unsigned codes per row, in the layout the writer used."""
    if words.dtype != np.int32 or words.ndim != 2:
        raise m.error(part, f"{part} is {words.dtype} {list(words.shape)}, not 2-D int32", "dtype")
    layout = int_layout(config, bits, count, words.shape[1])
    need = stream_words(count, bits) if layout == "stream" else padded_words(count, bits)
    if words.shape[1] != need:
        version = config.version_text or "unknown"
        raise m.error(part, f"{part} has {words.shape[1]} int32 words per row where {count} {bits}-bit codes in the "
                      f"{layout} packing of compressed-tensors {version} need {need}")
    return (stream_codes if layout == "stream" else padded_codes)(words, bits, count)


def int_record(m: Module, config: CTConfig, out: int, cols: int, dtype: str):
    scheme = m.scheme
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)
    if m.fmt == "pack-quantized":
        codes = _unpack(m, config, "weight_packed", m.need("weight_packed"), bits, cols)
    else:
        weight = m.need("weight")
        if weight.dtype.kind != "i" or weight.shape != (out, cols):
            raise m.error("weight", f"weight is {weight.dtype} {list(weight.shape)}, not signed integers", "dtype")
        wide = weight.astype(np.int32) + offset
        if wide.size and (wide.min() < 0 or wide.max() >= 2 * offset):
            raise m.error("weight", f"weight holds values outside the {bits}-bit range", "weight")
        codes = wide.astype(np.uint16 if bits > 8 else np.uint8)
    scale, group = scale_grid(m, out, cols, _float_scale(m))
    zeros: Any = float(offset)
    if not scheme.symmetric:
        zp = m.need("weight_zero_point")
        if m.fmt == "pack-quantized" and scheme.strategy in ("group", "channel"):
            zeros = _unpack(m, config, "weight_zero_point", np.ascontiguousarray(zp.T), bits, out).T
        elif zp.dtype.kind in "iu":
            _, _ = scale_grid(m, out, cols, zp)  # same grid as the scale
            zeros = zp.reshape(scale.shape).astype(np.int32) + offset
            if zeros.size and (zeros.min() < 0 or zeros.max() >= 2 * offset):
                raise m.error("weight_zero_point", f"zero points outside the {bits}-bit range", "weight_zero_point")
        else:
            raise m.error("weight_zero_point", f"zero point dtype {zp.dtype.name} is not an integer", "dtype")
    perm = _act_order(m, cols, group, scale.shape[1])
    b = RecordBuilder(f"{m.name}.weight", (out, cols), dtype)
    node = affine_tree(b, codes if perm is None else codes[:, perm], bits, scale, zeros, group, perm=perm)
    return b.finish(node, _info(m, {"actorder": perm is not None} if perm is not None else {}))


def _act_order(m: Module, cols: int, group: tuple[int, int], groups: int) -> np.ndarray | None:
    """``weight_g_idx`` (activation ordering "group", written before compressed-tensors deprecated it): the library
    then sorted the columns by g_idx (``torch.argsort``, not stable) and took groups positionally, which is well
    defined only when sorting makes every group a contiguous tile of ``group_size`` columns."""
    g_idx = m.stored.get("weight_g_idx")
    if g_idx is None or (g_idx.size and np.any(np.asarray(g_idx) == -1)):
        return None
    layout = column_groups(g_idx, cols, group[1], groups, file=m.file, tensor=f"{m.name}.weight_g_idx")
    if layout.kind == "columns":
        raise m.error("weight_g_idx", "weight_g_idx groups are not contiguous tiles of group_size after sorting "
                      "(compressed-tensors' reading then depends on an unstable sort)", "weight_g_idx")
    return layout.perm


def _e4m3_codes(m: Module, part: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.name != "float8_e4m3fn":
        raise m.error(part, f"{part} dtype {array.dtype.name} where float8_e4m3fn is expected", "dtype")
    codes = array.view(np.uint8)
    if np.isin(codes, E4M3_NAN_CODES).any():
        raise m.error(part, f"{part} holds E4M3 NaN codes", part)
    return codes


def _e8m0_codes(m: Module, part: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.name not in ("uint8", "float8_e8m0fnu"):
        raise m.error(part, f"{part} dtype {array.dtype.name} where uint8 E8M0 exponents are expected", "dtype")
    codes = array.view(np.uint8)
    if np.any(codes == E8M0_NAN_CODE):
        raise m.error(part, f"{part} holds the E8M0 NaN code 255", part)
    return codes


def fp8_record(m: Module, out: int, cols: int, dtype: str):
    if not m.scheme.symmetric or "weight_zero_point" in m.stored:
        raise m.error("weight_zero_point", "asymmetric FP8 weights are not supported", "symmetric")
    codes = _e4m3_codes(m, "weight", m.need("weight"))
    b = RecordBuilder(f"{m.name}.weight", (out, cols), dtype)
    if m.fmt == "mxfp8-quantized":
        scale_codes, group = scale_grid(m, out, cols, _e8m0_codes(m, "weight_scale", m.need("weight_scale")))
        table = b.tensor("table", e4m3_values().astype(np.float16))
        factor = b.lut(b.tensor("scale.codes", np.ascontiguousarray(scale_codes)),
                       b.tensor("scale.table", e8m0_values()))
        node = b.scale(b.lut(b.tensor("codes", np.ascontiguousarray(codes)), table), factor, group)
    else:
        scale, group = scale_grid(m, out, cols, _float_scale(m))
        node = fp8_tree(b, codes, scale, group)
    return b.finish(node, _info(m))


def fp4_record(m: Module, out: int, cols: int, dtype: str):
    packed = m.need("weight_packed")
    raw = m.need("weight_scale")
    info: dict[str, Any] = {}
    if m.fmt == "nvfp4-pack-quantized":
        codes = _e4m3_codes(m, "weight_scale", raw)
        gscale = m.need("weight_global_scale")
        if gscale.dtype != np.float32 or gscale.size != 1:
            raise m.error("weight_global_scale", f"weight_global_scale is {gscale.dtype} {list(gscale.shape)}, not "
                          "one fp32 value", "dtype")
        table = e4m3_values() / np.float32(gscale.reshape(()))  # fp32 division, as _dequantize's scale / global
        info["global_scale"] = float(gscale.reshape(()))
    else:
        codes = _e8m0_codes(m, "weight_scale", raw)
        table = e8m0_values()
    codes, group = scale_grid(m, out, cols, codes)
    if "weight_zero_point" in m.stored:
        raise m.error("weight_zero_point", "asymmetric FP4 weights are not supported", "symmetric")
    b = RecordBuilder(f"{m.name}.weight", (out, cols), dtype)
    return b.finish(fp4_block_tree(b, packed, cols, codes, table.astype(np.float32), group[1]), _info(m, info))


def _info(m: Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"method": "compressed-tensors", "format": m.fmt, "scheme": m.scheme.describe(m.fmt), **(extra or {})}
