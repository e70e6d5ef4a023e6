"""One record -> one compressed-tensors ``pack-quantized`` module, exactly, or the reason it cannot be.

compressed-tensors 0.20.1 (``compressors/pack_quantized``) stores an int weight of ``b`` bits (1-8) as

- ``weight_packed``: int32 ``[R, ceil(C·b / 32)]``, the signed codes ``x`` offset to ``x + 2^(b−1)`` and packed as
  one little-endian bit stream per row (32 codes in exactly ``b`` words, ``pack_to_int32``; before 0.18 the words
  held ``32 // b`` codes each, which is the same bits for b = 1, 2, 4, 8: this module writes the layout of the
  installed version, :func:`layout`);
- ``weight_scale``: ``[R, C / g]`` (strategy ``group``, ``g`` dividing ``C``) or ``[R, 1]`` (``channel``);
- ``weight_zero_point`` (asymmetric only): the signed zero points, offset and packed the same way along dim 0:
  int32 ``[ceil(R·b / 32), G]``;
- ``weight_shape``: int64 ``[R, C]``.

``decompress`` computes ``(x − zp) · scale`` in the scale's dtype (``_dequantize``). With ``x = q − 2^(b−1)`` and
``zp = z − 2^(b−1)`` the difference is exactly ``q − z``, so for a record ``affine(q:b, scale s, zero z)`` the
library's product is the reference decoder's ``(q − z) · s`` **when the scale is float32**: the scale is written in
fp32 (an fp16 scale would make the library round every product to fp16). Symmetric means the zero is the constant
``2^(b−1)`` (compressed-tensors' signed zero point 0; no ``weight_zero_point``); any other integer zero, or none
(``z = 0``), is asymmetric.

Tiles: a group of ``gc`` columns becomes strategy ``group`` with ``g = gcd(gc, C)`` (the scale repeated over the
finer groups where ``gc`` does not divide ``C``), a group as wide as the row ``channel``; a group spanning several
rows repeats its parameters per row. Not expressible: another root than ``affine`` (a permutation for activation
order: 0.20.1's ``decompress`` ignores ``weight_g_idx``; outliers; a codebook), an ``offset``, a float zero point,
codes wider than 8 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qformat.format import bitpack

from ._export_affine import NotExpressible, Tree, affine_parts, integer_valued

STREAM_SINCE = (0, 18)


@dataclass(frozen=True)
class Scheme:
    """A config group's weight arguments."""

    bits: int
    symmetric: bool
    strategy: str  # "group" or "channel"
    group_size: int | None

    def describe(self) -> str:
        size = f" {self.group_size}" if self.strategy == "group" else ""
        return f"pack-quantized int{self.bits} {self.strategy}{size} {'sym' if self.symmetric else 'asym'}"

    def weights(self) -> dict[str, Any]:
        args: dict[str, Any] = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                                "strategy": self.strategy, "dynamic": False}
        if self.strategy == "group":
            args["group_size"] = self.group_size
        return args


@dataclass
class Module:
    """The tensors of one module (``module.weight_packed`` ...) and its scheme."""

    name: str  # module name
    scheme: Scheme
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def layout(version: tuple[int, ...] | None) -> str:
    """``"stream"`` for compressed-tensors 0.18 and later (or unknown), ``"padded"`` before."""
    return "padded" if version is not None and version < STREAM_SINCE else "stream"


def pack_rows(codes: np.ndarray, bits: int, how: str) -> np.ndarray:
    """Unsigned codes ``[R, C]`` -> int32 words ``[R, W]`` (the stream or the padded packing)."""
    codes = np.asarray(codes)
    rows, cols = codes.shape
    if how == "stream" or 32 % bits == 0:
        words = -(-cols * bits // 32)
        data = bitpack.pack_codes(codes, bits)
        data = np.pad(data, ((0, 0), (0, words * 4 - data.shape[1])))
        return np.ascontiguousarray(data).view("<u4").astype(np.uint32).view(np.int32).reshape(rows, words)
    per = 32 // bits
    words = -(-cols // per)
    padded = np.zeros((rows, words * per), dtype=np.uint32)
    padded[:, :cols] = codes
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    packed = np.bitwise_or.reduce(padded.reshape(rows, words, per) << shifts, axis=-1).astype(np.uint32)
    return packed.view(np.int32)


def _scheme_grid(tree: Tree, node: dict) -> tuple[Any, Scheme, np.ndarray, np.ndarray | None]:
    a = affine_parts(tree, node)
    rows, cols = a.shape
    if a.offset is not None:
        raise NotExpressible("an affine offset (w = d·q + m): compressed-tensors has no offset")
    if not 1 <= a.bits <= 8:
        raise NotExpressible(f"{a.bits}-bit codes (pack-quantized holds 1 to 8 bits)")
    gc = a.group[1]
    if gc >= cols:
        strategy, size, width = "channel", None, cols
    else:
        size = math.gcd(gc, cols)
        strategy, width = "group", size
    scale = a.per_block(a.scale, width, "scale")
    if not np.isfinite(scale).all():
        raise NotExpressible("a scale that is not finite")
    midpoint = 1 << (a.bits - 1)
    if a.zero is None:
        zero = np.zeros(scale.shape, dtype=np.int32)
        symmetric = False
    else:
        zero = integer_valued(a.per_block(a.zero, width, "zero"), "zero point")
        if zero.size and (zero.min() < 0 or zero.max() >= 1 << a.bits):
            raise NotExpressible(f"zero points outside the {a.bits}-bit range")
        symmetric = bool((zero == midpoint).all())
    return a, Scheme(a.bits, symmetric, strategy, size), scale, None if symmetric else zero


def module(tree: Tree, how: str) -> Module:
    """The ``pack-quantized`` tensors of the record ``tree`` (named ``<module>.weight``)."""
    if not tree.name.endswith(".weight"):
        raise NotExpressible("a record not named <module>.weight")
    if len(tree.shape) != 2:
        raise NotExpressible(f"a {len(tree.shape)}-D weight")
    a, scheme, scale, zero = _scheme_grid(tree, tree.weight)
    return build(tree.name[: -len(".weight")], scheme, a.codes, scale, zero, how)


def build(name: str, scheme: Scheme, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
          how: str) -> Module:
    rows, cols = codes.shape
    tensors = {"weight_packed": pack_rows(codes, scheme.bits, how),
               "weight_scale": np.ascontiguousarray(scale, dtype=np.float32),
               "weight_shape": np.array([rows, cols], dtype=np.int64)}
    if not scheme.symmetric:
        tensors["weight_zero_point"] = np.ascontiguousarray(pack_rows(np.ascontiguousarray(zero.T), scheme.bits,
                                                                       how).T)
    return Module(name, scheme, tensors)


def requantize(name: str, reference: np.ndarray, bits_per_weight: float, how: str) -> Module:
    """compressed-tensors' own min-max quantizer (``calculate_qparams`` + ``quantize``) with its presets: W8A16
    (8-bit, per channel, symmetric) for a record of 6 or more bits per weight, else W4A16 (4-bit, symmetric, groups of
    128, per channel when 128 does not divide the row)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    rows, cols = reference.shape
    bits = 8 if bits_per_weight >= 6 else 4
    strategy = "channel" if bits == 8 or cols % 128 else "group"
    size = 128 if strategy == "group" else None
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=size)
    weight = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    tiles = weight.reshape(rows, -1, size if size else cols)
    scale, zp = calculate_qparams(tiles.amin(-1), tiles.amax(-1), args)
    x = quantize(weight, scale, zp, args, dtype=torch.int8)
    codes = (x.to(torch.int16) + (1 << (bits - 1))).numpy().astype(np.uint8)
    return build(name, Scheme(bits, True, strategy, size), codes, scale.float().numpy(), None, how)
