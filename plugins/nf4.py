"""NF4 / FP4 (QLoRA, bitsandbytes ``quantize_4bit``): 4-bit codes into a 16-entry table, one absmax per block.

Follows bitsandbytes (``functional.quantize_4bit``, ``backends/default/ops.py`` ``quantize_4bit``, and for double
quantization ``quantize_blockwise`` as the CPU build runs it, ``csrc/cpu_ops.cpp`` ``quantize_cpu_impl``), so codes,
absmax and nested statistics equal what ``quantize_4bit`` gives on CPU for the same tensor:

- blocks of ``group_size`` weights along the flattened tensor; a block that divides the row width is a block within a
  row, which is what the format's ``[1, g]`` grid expresses (a block that does not divide it is refused);
- ``x * (1 / absmax)`` clamped to [-1, 1], the index of the nearest table entry by ``bucketize`` against the
  midpoints of the sorted table (ties go to the lower entry), mapped back to the table's own order (bitsandbytes' FP4
  table is listed in bit-pattern order, not sorted);
- double quantization: ``offset = mean(absmax)``; ``absmax - offset`` in blocks of 256 (flattened, row-major), each
  scaled by ``1 / max|.|`` and coded into the 256-entry "dynamic" map through the CPU build's 65536-bin lookup table.

Storage (spec/composition.md "NF4 with double quantization"): ``scale(lut(packed codes, table F32[16]), absmax)``
with group ``[1, g]``; with double quantization the absmax is
``sum(scale(lut(U8 codes, dynamic map F32[256]), s2), lowrank(ones I8[R, 1], offset F32[1, G]))``. The 256-blocks of
the absmax array ``[R, G]`` are tiles (``[256 / G, G]`` when G divides 256, ``[1, 256]`` when 256 divides G); for any
other G (SmolLM2's 576-wide rows: G = 9) they end mid-row, so the s2 factor is itself a node,
``lut(packed relative block index [R, G], s2 copies per tile of rows)`` (see ``_block_scales``).

As in bitsandbytes, the 4-bit codes are computed from the exact fp32 absmax even when the stored absmax is double
quantized: the record decodes to exactly what ``dequantize_4bit`` gives for bitsandbytes' own state (the method's
dequantized weight is that decode, computed the decoder's way in fp32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, hookimpl, param

from ._common import MethodResult, QuantizesThroughRun, record_builder, weight_matrix

# bitsandbytes get_4bit_type("nf4") (create_normal_map(offset=0.9677083, use_extra_value=True)).
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
              1.0)
# bitsandbytes get_4bit_type("fp4") before normalisation: bit-pattern order (sign, 2-bit exponent with bias 2, 1-bit
# mantissa; 0b001 is the subnormal 0.0625). Its "-0" is the integer 0, so entry 8 is +0.0 as well.
FP4_BNB_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
NESTED_BLOCK = 256  # bitsandbytes quantize_4bit(compress_statistics=True) uses quantize_blockwise(blocksize=256)
LUT_BINS = 65536  # csrc/cpu_ops.cpp kLUTSize: [-1, 1] discretised for the 8-bit code lookup


def code_table(name: str) -> torch.Tensor:
    """The 16-entry table of ``get_4bit_type(name)``: the listed values divided by their largest magnitude (fp32)."""
    data = torch.tensor(NF4_VALUES if name == "nf4" else FP4_BNB_VALUES, dtype=torch.float32)
    return data / data.abs().max()


@lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``: 256 sorted fp32 values.

    For exponent i = 0..6, 2^i + 1 fp32 boundaries linspace(0.1, 1) give 2^i midpoints, scaled by ±10^(i - 6) (fp32
    products); then 0 and 1.
    """
    values: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=1)
def _dynamic_lookup() -> torch.Tensor:
    """csrc/cpu_ops.cpp build_quantize_lut: for bin i, the value -1 + 2i / 65535 (fp32) and the index of the first
    midpoint of the map not below it (i.e. how many midpoints lie below it)."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32)) / float(LUT_BINS - 1)
    return torch.searchsorted(midpoints, bins, side="left")


def quantize_4bit_blocks(w: torch.Tensor, block: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' default ``quantize_4bit`` on a tensor whose size ``block`` divides: (codes in the table's order,
    same shape as w, int64; fp32 absmax per block, in flattened order)."""
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    order = torch.argsort(table, stable=True)  # ties (FP4's two zeros) keep table order, as bitsandbytes gets them
    ordered = table[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2
    codes = order[torch.bucketize(scaled, bounds)]
    return codes.reshape(w.shape), absmax


def quantize_dynamic_8bit(x: torch.Tensor, block: int = NESTED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` (dynamic map) of a 1-D fp32 tensor: (uint8 codes, fp32 absmax per
    block of ``block``, the last one possibly shorter). A block of zeros gets code 0."""
    n = x.numel()
    n_blocks = -(-n // block)
    padded = torch.zeros(n_blocks * block, dtype=torch.float32)
    padded[:n] = x  # zero padding changes no block's max |x|
    tiles = padded.view(n_blocks, block)
    absmax = tiles.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # a zero block's codes are set below, as the C++ does
    v = torch.clamp(tiles * inverse.view(-1, 1), -1.0, 1.0)
    bins = ((v + 1.0) * 0.5 * float(LUT_BINS - 1) + 0.5).to(torch.int64)  # C++ truncation of a non-negative value
    codes = _dynamic_lookup()[bins]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


@dataclass(frozen=True)
class NF4Config(MethodConfig):
    """nf4's parameters: absmax block, double quantization of the absmax, and the 4-bit table."""

    method = "nf4"
    group_size: int = param(64, "weights per absmax block (bitsandbytes' blocksize), along rows: must divide the row "
                            "width", min=2, max=1 << 16)
    double_quant: bool = param(False, "store the absmax as 8-bit dynamic-map codes in blocks of 256 with an fp32 "
                               "scale per block and the mean as offset (bitsandbytes compress_statistics)")
    table: str = param("nf4", "4-bit table: nf4 (QLoRA NormalFloat) or fp4 (bitsandbytes' FP4)", choices=("nf4", "fp4"))


class NF4(QuantizesThroughRun, Method):
    config = NF4Config
    description = ("QLoRA NF4 / bitsandbytes FP4: absmax blocks of group_size weights along rows, 4-bit codes into "
                   "the 16-entry table (bucketize against midpoints), fp32 absmax, or with double_quant 8-bit "
                   "dynamic-map absmax codes per 256 blocks plus the mean offset; identical to "
                   "bitsandbytes.functional.quantize_4bit on CPU. No calibration.")
    calibration = frozenset()


    def run(self, layer: LayerInput, config: NF4Config | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        g = config.group_size
        w = weight_matrix(layer)
        rows, cols = w.shape
        if cols % g:
            raise ParameterError(f"method 'nf4' parameter 'group_size': {g} does not divide the row width {cols} of "
                                 f"{layer.name}; bitsandbytes' blocks run along the flattened tensor and would cross "
                                 f"rows (use a block that divides {cols})")
        groups = cols // g
        table = code_table(config.table)
        codes, absmax = quantize_4bit_blocks(w, g, table)
        absmax = absmax.view(rows, groups)

        b = record_builder(layer)
        values = b.lut(b.packed("codes", codes.to(torch.uint8).numpy(), 4), b.tensor(config.table, table.numpy()))
        info: dict[str, Any] = {"method": self.name, "params": config.to_params(), "blocksize": g,
                                "double_quant": config.double_quant}
        if config.double_quant:
            stored, factor = self._double_quant(b, absmax)
            info["nested_blocksize"] = NESTED_BLOCK
        else:
            stored, factor = absmax, b.tensor("absmax", absmax.numpy())
        deq = table[codes] * stored.repeat_interleave(g, dim=1)  # the scale codec: table value times absmax, fp32
        node = b.scale(values, factor, (1, g))
        info["bits_per_weight"] = sum(a.nbytes for a in b.tensors.values()) * 8 / (rows * cols)
        return MethodResult(b.finish(node, info), deq, info)

    @staticmethod
    def _double_quant(b: Any, absmax: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """bitsandbytes compress_statistics for the absmax [R, G]: (the absmax as decoded, its node)."""
        rows, groups = absmax.shape
        flat = absmax.reshape(-1)
        offset = flat.mean()
        codes, s2 = quantize_dynamic_8bit(flat - offset)
        code = dynamic_map()
        s2_each = s2.repeat_interleave(NESTED_BLOCK)[:flat.numel()]
        decoded = ((code[codes.long()] * s2_each) + offset).view(rows, groups)  # scale, then sum with 1 * offset

        if NESTED_BLOCK % groups == 0 or groups % NESTED_BLOCK == 0:
            tile = (NESTED_BLOCK // groups, groups) if NESTED_BLOCK % groups == 0 else (1, NESTED_BLOCK)
            grid = (-(-rows // tile[0]), -(-groups // tile[1]))
            s2_node = b.tensor("absmax.scale", s2.view(grid).numpy())
        else:
            tile = (1, 1)
            s2_node = _block_scales(b, s2, rows, groups)
        nested = b.scale(b.lut(b.tensor("absmax.codes", codes.view(rows, groups).numpy()),
                               b.tensor("absmax.map", code.numpy())), s2_node, tile)
        ones = np.ones((rows, 1), dtype=np.int8)
        offsets = np.full((1, groups), float(offset), dtype=np.float32)
        node = b.sum([nested, b.lowrank(b.tensor("absmax.ones", ones), b.tensor("absmax.offset", offsets))])
        return decoded, node


def _block_scales(b: Any, s2: torch.Tensor, rows: int, groups: int) -> dict:
    """The per-absmax s2 factor [R, G] where 256-blocks end mid-row: ``lut(relative block index, per-tile table)``.

    Tiles of ``gr = max(1, 256 // G)`` rows hold at most ``gr * G <= 256`` absmax values (or one row), so they touch
    only a few consecutive blocks: each tile's table lists the s2 of those blocks (exact fp32 copies) and each absmax
    stores which of them is its own, in 1 bit when G < 256 (a global block index would take log2(blocks) bits).
    """
    gr = max(1, NESTED_BLOCK // groups)
    n_tiles = -(-rows // gr)
    block = (torch.arange(rows * groups) // NESTED_BLOCK).view(rows, groups)
    first = block[::gr, 0]  # each tile's first block: blocks grow along the flattened order
    relative = block - first.repeat_interleave(gr)[:rows, None]
    width = max(1, math.ceil(math.log2(int(relative.max()) + 1)))
    taken = (first[:, None] + torch.arange(1 << width)).clamp(max=s2.numel() - 1)
    table = torch.where(first[:, None] + torch.arange(1 << width) < s2.numel(), s2[taken], 0.0)
    return b.lut(b.packed("absmax.block", relative.to(torch.int32).numpy(), width),
                 b.tensor("absmax.scale", table.view(n_tiles, 1, 1 << width).numpy()), group_shape=(gr, groups))


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(NF4())
