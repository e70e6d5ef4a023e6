"""Minifloat weights: FP8 (E4M3, E5M2) per output channel, FP4 E2M1 with group scales, MXFP4 and NVFP4.

``-p format=``:

- ``fp8_e4m3`` / ``fp8_e5m2``: one scale per output row, max|row| / 448 (E4M3, OCP "fn": no inf, NaN 0x7F/0xFF) or
  / 57344 (E5M2, IEEE-like), codes = fp8(w / scale). E4M3 is compressed-tensors' FP8 channel scheme (FP8_DYNAMIC
  weights) bit for bit; the scale has the weight's dtype, as compressed-tensors gives it. E5M2 follows the same recipe
  (compressed-tensors has no E5M2 weight scheme).
  Storage: ``scale(lut(U8 codes [R, C], fp8 table F16[256]), row scale [R, 1], [1, C])``.
- ``fp4_e2m1``: groups of ``group_size`` (default 32) input columns, fp16 scale max|group| / 6, codes the nearest
  E2M1 value (ties to even). Options from LLM-FP4 / ZeroQuant-FP, both calibration-free:
  ``search_bias``: per output row, a real exponent bias δ shifting every group scale of the row (scale · 2^-δ,
  δ = k/32 for k < 8, i.e. clipping the group maxima by up to 14 %), the one with the least squared weight error of
  the row (LLM-FP4 searches the bias on the output error with calibration data; this is its calibration-free form,
  8 quantizations of the layer); stored folded into the fp16 group scales, so it costs no bits;
  ``pow2_scales``: group scales are powers of two (2^floor or 2^ceil of max/6, whichever gives the group the lower
  squared error), stored as 8-bit E8M0 exponents through a table (4.25 instead of 4.5 bits per weight at g32). The
  two do not combine: a shift below one binade leaves the two neighbouring powers of two to choose from.
  Storage: ``scale(lut(packed 4-bit codes, E2M1 table F16[16]), factor, [1, g])``, factor an F16 tensor [R, G] or
  ``lut(U8 exponents [R, G], F32[256] 2^(e-127))``.
- ``mxfp4``: OCP microscaling, blocks of 32 along rows, one E8M0 shared exponent per block: compressed-tensors'
  MXFP4 scheme, codes and exponents bit for bit. Storage as pow2 fp4_e2m1 with g = 32.
- ``nvfp4``: blocks of 16, an E4M3 scale per block and an fp32 global scale per tensor (448·6 / max|w|):
  compressed-tensors' NVFP4 scheme, codes, block scales and global scale bit for bit. compressed-tensors dequantizes
  ``q · (scale / global)`` in fp32, so the factor is ``lut(U8 E4M3 codes [R, C/16], F32[256] fp32(e4m3[i] / global))``:
  the record decodes to exactly its dequantization. The global scale is also in the record's info (fp32 value).

The arithmetic shared with compressed-tensors lives in ``_minifloat.py`` (sources cited there). MXFP4 and NVFP4 need
whole blocks (compressed-tensors refuses a row its block does not divide): such a layer is refused, naming it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, param

from . import _minifloat as mf
from ._common import MethodResult, QuantizesThroughRun, effective_group, record_builder, weight_matrix
from ._quantizers import to_fp16

FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "mxfp4", "nvfp4")
FIXED_BLOCKS = {"mxfp4": 32, "nvfp4": 16}
DEFAULT_E2M1_GROUP = 32
BIAS_SHIFTS = tuple(2.0 ** (-k / 32) for k in range(8))  # search_bias: scale · 2^-k/32 (on MiniLM no row chose k > 6)


@dataclass(frozen=True)
class MinifloatConfig(MethodConfig):
    """minifloat's parameters: the element format, its group (where free) and the LLM-FP4 / ZeroQuant-FP options."""

    method = "minifloat"
    format: str = param("fp8_e4m3", "element format: fp8_e4m3 / fp8_e5m2 (per output channel), fp4_e2m1 (group "
                        "scales), mxfp4 (E8M0 per 32), nvfp4 (E4M3 per 16 + fp32 global)", choices=FORMATS)
    group_size: int = param(0, "input columns per scale: 0 = the format's own (fp4_e2m1 32, mxfp4 32, nvfp4 16, fp8 one "
                            "per row); -1 = one per row (fp8, fp4_e2m1); mxfp4 and nvfp4 accept only their block",
                            min=-1, max=1 << 20)
    search_bias: bool = param(False, "fp4_e2m1: search a per-row exponent bias (group scales times 2^-k/32, k < 8) "
                              "for the least squared weight error (LLM-FP4, without calibration)")
    pow2_scales: bool = param(False, "fp4_e2m1: power-of-two group scales stored as 8-bit exponents (ZeroQuant-FP)")

    def check(self) -> None:
        fmt, g = self.format, self.group_size
        if fmt.startswith("fp8") and g not in (0, -1):
            raise ParameterError(f"method 'minifloat' parameter 'group_size': {fmt} has one scale per output channel "
                                 f"(0 or -1), got {g}")
        block = FIXED_BLOCKS.get(fmt)
        if block is not None and g not in (0, block):
            raise ParameterError(f"method 'minifloat' parameter 'group_size': {fmt} has a fixed block of {block}, "
                                 f"got {g} (leave --group-size out, or use format=fp4_e2m1 for another group)")
        for name in ("search_bias", "pow2_scales"):
            if getattr(self, name) and fmt != "fp4_e2m1":
                raise ParameterError(f"method 'minifloat' parameter {name!r}: applies to format=fp4_e2m1 only, not "
                                     f"{fmt}")
        if self.search_bias and self.pow2_scales:
            raise ParameterError("method 'minifloat' parameter 'search_bias': has nothing to search with "
                                 "pow2_scales=true (each group already takes the better of its two neighbouring "
                                 "powers of two)")

    def block(self, cols: int) -> int:
        """The group along rows for a layer of ``cols`` input columns."""
        if self.format.startswith("fp8"):
            return cols
        if self.format in FIXED_BLOCKS:
            return FIXED_BLOCKS[self.format]
        return effective_group(DEFAULT_E2M1_GROUP if self.group_size == 0 else self.group_size, cols)


class Minifloat(QuantizesThroughRun, Method):
    config = MinifloatConfig
    description = ("Minifloat codes through a stored table: FP8 E4M3/E5M2 per output channel, FP4 E2M1 with fp16 "
                   "(or power-of-two) group scales and an optional per-row exponent-bias search, MXFP4 (E8M0 per 32) "
                   "and NVFP4 (E4M3 per 16, fp32 global): FP8 E4M3, MXFP4 and NVFP4 equal compressed-tensors' "
                   "codes and scales; no calibration.")
    calibration = frozenset()

    def check_shapes(self, config: MinifloatConfig | Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse a layer whose rows the mxfp4 / nvfp4 block does not divide (compressed-tensors needs whole blocks),
        naming it; ``shapes``: layer name -> weight shape. Cheap, so a pipeline can call it before any work."""
        config = self.validate_params(config)
        block = FIXED_BLOCKS.get(config.format)
        for name, shape in shapes.items():
            cols = math.prod(shape[1:])
            if block is not None and cols % block:
                raise ParameterError(f"method 'minifloat' parameter 'group_size': layer {name!r} has {cols} input "
                                     f"columns, not a multiple of the {config.format} block of {block} "
                                     "(compressed-tensors needs whole blocks); leave the layer out (--exclude) or use "
                                     "format=fp4_e2m1")


    def run(self, layer: LayerInput, config: MinifloatConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        self.check_shapes(config, {layer.name: tuple(w.shape)})
        block = config.block(w.shape[1])
        b = record_builder(layer)
        info: dict[str, Any] = {"method": self.name, "params": config.to_params(), "format": config.format,
                                "group_size": block}
        if config.format.startswith("fp8"):
            node, deq = _fp8(b, w.to(mf.TORCH_DTYPES[layer.dtype]), config.format)
        elif config.format == "fp4_e2m1":
            node, deq = _e2m1(b, w, block, config.search_bias, config.pow2_scales)
        else:
            native = w.to(mf.TORCH_DTYPES[layer.dtype])  # compressed-tensors computes in the weight's dtype
            blocks = mf.nvfp4(native) if config.format == "nvfp4" else mf.mxfp4(native)
            if blocks.global_scale is not None:
                info["global_scale"] = blocks.global_scale
            node, deq = _blocked(b, blocks, block), blocks.dequantized
        info["bits_per_weight"] = sum(a.nbytes for a in b.tensors.values()) * 8 / w.numel()
        return MethodResult(b.finish(node, info), deq, info)


def _fp8(b: Any, w: torch.Tensor, fmt: str) -> tuple[dict, torch.Tensor]:
    fp8, bound = mf.FP8_DTYPES[fmt]
    codes, scale = mf.fp8_channel(w, fp8, bound)
    deq = mf.fp8_values(fp8)[codes.long()] * scale.float()
    lut = b.lut(b.tensor("codes", codes.numpy()), b.tensor("table", mf.fp8_table(fp8)))
    return b.scale(lut, b.tensor("scale", mf.to_numpy(scale)), (1, w.shape[1])), deq


def _blocked(b: Any, blocks: mf.Blocks, block: int) -> dict:
    """scale(lut(packed FP4 codes, E2M1 table), lut(U8 scale codes, table), [1, block]) for MXFP4 / NVFP4."""
    factor = b.lut(b.tensor("scale.codes", blocks.scale_codes.numpy()), b.tensor("scale.table", blocks.table.numpy()))
    return b.scale(_fp4_lut(b, blocks.codes), factor, (1, block))


def _fp4_lut(b: Any, codes: torch.Tensor) -> dict:
    return b.lut(b.packed("codes", codes.to(torch.uint8).numpy(), 4), b.tensor("fp4", mf.fp4_table()))


def _e2m1(b: Any, w: torch.Tensor, group: int, search_bias: bool, pow2: bool) -> tuple[dict, torch.Tensor]:
    shifts = BIAS_SHIFTS if search_bias else (1.0,)
    best: mf.Grouped | None = None
    for shift in shifts:
        candidate = mf.e2m1_groups(w, group, pow2, shift)
        best = candidate if best is None else best.keep_better_rows(candidate)
    assert best is not None
    if pow2:
        factor = b.lut(b.tensor("scale.codes", best.scale_codes.numpy()), b.tensor("scale.table", mf.e8m0_table()))
    else:
        factor = b.tensor("scale", to_fp16(best.factor))
    return b.scale(_fp4_lut(b, best.codes), factor, (1, group)), best.dequantized


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(Minifloat())

