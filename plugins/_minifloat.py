"""Minifloat element formats and the compressed-tensors recipes for FP8 per channel, MXFP4 and NVFP4.

The scale arithmetic follows compressed-tensors (0.20) operation by operation, in the weight's own dtype as it runs
there (its scales take the observed weight's dtype): ``quantization/utils/helpers.py`` ``calculate_qparams`` (steps 1-5,
min/max per group or row as its min-max observer reduces them, ``compute_dynamic_scales_and_zp``), ``generate_gparam``
(NVFP4's fp32 global scale), ``utils/mxfp_utils.py`` ``generate_mx_scales``/``round_to_power_2`` (MX E8M0 exponents),
``lifecycle/forward_helpers.py`` ``_quantize`` (codes: ``x / (scale / global_scale)``, clamp, round) and the packing
compressors (``compressors/nvfp4/helpers.py`` ``pack_fp4_to_uint8``: code = sign·8 + magnitude index, first of a pair
in the low nibble; ``compressors/mx_utils.py`` ``compress_mx_scale``: 127 + floor(log2 scale)). Dequantization there is
``q · (scale / global_scale)`` in fp32 (``_dequantize``), which a table of fp32(e4m3[i] / global) reproduces exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from ._quantizers import fp16_scale

FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
# Magnitudes of FP4 E2M1 codes 0..7 (code = sign·8 + exponent·2 + mantissa).
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round-to-nearest-even boundaries between consecutive magnitudes: a tie goes to the even mantissa, so the boundary
# itself belongs to the lower value where that one is even (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4) and to the upper
# one otherwise (0.75 -> 1, 1.75 -> 2, 3.5 -> 4). compressed-tensors' cast_to_fp4 draws the same lines.
_FP4_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_FP4_TIES_UP = (0.75, 1.75, 3.5)

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_DTYPES = {"fp8_e4m3": (torch.float8_e4m3fn, FP8_E4M3_MAX), "fp8_e5m2": (torch.float8_e5m2, FP8_E5M2_MAX)}


# -- tables (stored in the file: the lut codec has no built-in tables) -----------------------------------------------

def fp4_table() -> np.ndarray:
    """FP4 E2M1 values of codes 0..15 (code 8 is -0.0), F16: every value is exact there."""
    magnitudes = np.array(FP4_MAGNITUDES, dtype=np.float16)
    return np.concatenate([magnitudes, -magnitudes])


def fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """fp32 value of every byte of an fp8 dtype; NaN codes (E4M3 0x7F/0xFF; E5M2 inf and NaN) become 0, as the spec's
    lut table section asks (a clamped quantizer never produces them)."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return torch.where(values.isfinite(), values, torch.zeros(()))


def fp8_table(dtype: torch.dtype) -> np.ndarray:
    """The 256-entry table of an fp8 format as F16 (E4M3 and E5M2 values are all exact in fp16)."""
    return fp8_values(dtype).half().numpy()


def e8m0_table() -> np.ndarray:
    """F32[256]: code e -> 2^(e - 127) (E8M0 shared exponents); code 255 (NaN in OCP MX) is stored as 0."""
    exponent = torch.arange(256, dtype=torch.int32) - 127
    table = 2.0 ** exponent.to(torch.float)  # the conversion compressed-tensors' maybe_convert_from_mx_exp uses
    table[255] = 0.0
    return table.numpy()


# -- element rounding ---------------------------------------------------------------------------------------------

def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (int64) of x, already clamped to [-6, 6]: nearest magnitude (ties to even), sign bit for x < 0
    (a negative value that rounds to 0 keeps its sign: code 8, -0.0, as compressed-tensors packs it)."""
    a = x.abs()
    down = torch.tensor(_FP4_TIES_DOWN, dtype=a.dtype)
    up = torch.tensor(_FP4_TIES_UP, dtype=a.dtype)
    # bucketize counts the boundaries below a (right=False: strictly; right=True: at or below)
    index = torch.bucketize(a, down) + torch.bucketize(a, up, right=True)
    return torch.where(x < 0, index + 8, index)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of FP4 codes (a gather, as the lut decoder does)."""
    return torch.from_numpy(fp4_table().astype(np.float32))[codes]


def pack_nibbles(codes: torch.Tensor) -> np.ndarray:
    """Codes [R, C] (C even) packed two per byte, first code in the low nibble: the bytes of both the `packed` codec
    (LSB-first stream) and compressed-tensors' ``weight_packed``."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).numpy()


# -- compressed-tensors' arithmetic ---------------------------------------------------------------------------------

def _absmax(w: torch.Tensor, dim: int | None, keepdim: bool = False) -> torch.Tensor:
    """calculate_qparams' max(|min(x, 0)|, |max(x, 0)|) over ``dim`` (None: the whole tensor), in w's dtype."""
    low = w.amin() if dim is None else w.amin(dim, keepdim=keepdim)
    high = w.amax() if dim is None else w.amax(dim, keepdim=keepdim)
    low, high = torch.min(low, torch.zeros_like(low)), torch.max(high, torch.zeros_like(high))
    return torch.max(low.abs(), high.abs())


def _half_range(bound: float, dtype: torch.dtype) -> torch.Tensor:
    """(q_max - q_min) / 2 as calculate_qparams computes it: the fp32 range converted to the statistic's dtype."""
    return torch.tensor(2.0 * bound).to(dtype) / 2


@dataclass
class Blocks:
    """A weight [R, C] in blocks of ``block`` along rows: codes, the per-block scale as stored (U8 codes) with the
    table that decodes them, and the dequantized weight (codes' values times table[scale code], fp32)."""

    codes: torch.Tensor  # int64 [R, C]
    scale_codes: torch.Tensor  # uint8 [R, C / block]
    table: torch.Tensor  # fp32 [256]: scale code -> the factor the block's codes are multiplied by
    dequantized: torch.Tensor  # fp32 [R, C]
    global_scale: float | None = None


def _fp4_block_codes(w: torch.Tensor, divisor: torch.Tensor, block: int) -> torch.Tensor:
    """_quantize's x / scale (per block), clamp to the FP4 range, round: codes [R, C]."""
    rows, cols = w.shape
    scaled = w.unflatten(-1, (cols // block, block)) / divisor.unsqueeze(-1)
    return fp4_codes(scaled.clamp(-FP4_MAX, FP4_MAX)).reshape(rows, cols)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """generate_gparam: fp32 [1] = 448 · 6 / max|w| (computed in w's dtype), 1.0 where that is not finite."""
    peak = _absmax(w, None)
    peak = peak.clamp(min=torch.finfo(peak.dtype).tiny)
    scale = (FP8_E4M3_MAX * FP4_MAX) / peak
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def nvfp4(w: torch.Tensor, block: int = 16) -> Blocks:
    """NVFP4 (compressed-tensors' NVFP4 scheme, tensor_group, group 16): E4M3 block scales relative to an fp32
    global scale. ``w`` [R, C] in the weight's dtype, C a multiple of ``block``."""
    rows, cols = w.shape
    gscale = nvfp4_global_scale(w)
    peak = _absmax(w.unflatten(-1, (cols // block, block)), -1)
    scale = gscale * (peak / _half_range(FP4_MAX, peak.dtype))  # fp32 (the global scale is)
    scale = scale.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.where(scale == 0, torch.tensor(0.125), scale)  # calculate_qparams step 5: the E4M3 eps
    codes = _fp4_block_codes(w, scale / gscale, block)  # _quantize divides the block scale by the global one first
    scale_codes = scale.to(torch.float8_e4m3fn).view(torch.uint8)  # the compressor's E4M3 weight_scale
    table = fp8_values(torch.float8_e4m3fn) / gscale  # the same fp32 division, once per E4M3 value
    return Blocks(codes, scale_codes, table, _dequant(codes, table[scale_codes.long()], block), float(gscale))


def _round_to_power_2(x: torch.Tensor, element_mantissa: int = 1) -> torch.Tensor:
    """round_to_power_2: add half of the element-mantissa ulp to x's bits, keep sign and exponent (x's dtype)."""
    if x.dtype == torch.float32:
        bits, mantissa, exponent = x.view(torch.int32), 23, 8
    else:
        mantissa, exponent = (7, 8) if x.dtype == torch.bfloat16 else (10, 5)
        bits = x.view(torch.uint16).to(torch.int32)
    keep = ((1 << (exponent + 1)) - 1) << mantissa
    rounded = (bits + (1 << (mantissa - element_mantissa - 1))) & keep
    if x.dtype == torch.float32:
        return rounded.view(torch.float32)
    return rounded.to(torch.uint16).view(x.dtype)


def mxfp4(w: torch.Tensor, block: int = 32) -> Blocks:
    """MXFP4 (compressed-tensors' MXFP4 scheme, group 32, E8M0 scales): ``w`` [R, C] in the weight's dtype."""
    rows, cols = w.shape
    peak = _absmax(w.unflatten(-1, (cols // block, block)), -1)
    exponent = 127 + torch.floor(torch.log2(_round_to_power_2(peak))) - 2  # generate_mx_scales (offset log2(6) -> 2)
    exponent = torch.round(exponent.clamp(0, 255)).to(torch.uint8).to(peak.dtype)  # scale_dtype uint8
    scale = (2.00 ** (exponent.to(torch.int32) - 127).to(torch.float)).to(peak.dtype)
    scale = torch.where(scale == 0, torch.tensor(1, dtype=scale.dtype), scale)  # eps of an integer scale dtype
    codes = _fp4_block_codes(w, scale, block)
    scale_codes = (127 + torch.floor(torch.log2(scale)).to(torch.int32)).to(torch.uint8)  # compress_mx_scale
    table = torch.from_numpy(e8m0_table())
    return Blocks(codes, scale_codes, table, _dequant(codes, table[scale_codes.long()], block))


def _dequant(codes: torch.Tensor, factor: torch.Tensor, block: int) -> torch.Tensor:
    """What scale(lut(codes, FP4), factor) decodes to: fp32 gather times the block's fp32 factor."""
    return fp4_values(codes) * factor.repeat_interleave(block, dim=1)


def fp8_channel(w: torch.Tensor, fp8: torch.dtype, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' FP8 channel scheme (FP8_DYNAMIC weights): scale [R, 1] = max|row| / bound in w's dtype
    (eps where 0), codes = fp8(clamp(w / scale + 0)). The +0 is the zero point (all zeros) that compressed-tensors
    keeps while compressing and adds: a weight of -0.0 is stored as +0. Returns (uint8 codes [R, C], scale [R, 1])."""
    peak = _absmax(w, 1, keepdim=True)
    scale = peak / _half_range(bound, peak.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    scaled = w / scale + torch.zeros((), dtype=w.dtype)
    return scaled.clamp(-bound, bound).to(fp8).view(torch.uint8), scale


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float tensor as numpy in its own dtype (bf16 through ml_dtypes)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


# -- FP4 E2M1 with group scales (qformat's own recipe, LLM-FP4 / ZeroQuant-FP options) -------------------------------

@dataclass
class Grouped:
    """FP4 E2M1 codes with one scale per (row, group); scales fp16-exact, or powers of two with E8M0 codes."""

    codes: torch.Tensor  # int64 [R, C]
    factor: torch.Tensor  # fp32 [R, G], the decoded scale
    scale_codes: torch.Tensor | None  # uint8 [R, G] E8M0 exponents (power-of-two scales), else None
    dequantized: torch.Tensor  # fp32 [R, C]
    row_error: torch.Tensor  # fp32 [R], squared weight error of each row

    def keep_better_rows(self, other: Grouped) -> Grouped:
        """Row by row, the candidate with the lower squared error (this one on ties)."""
        take = (other.row_error < self.row_error)[:, None]

        def pick(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
            return None if mine is None or theirs is None else torch.where(take, theirs, mine)

        return Grouped(pick(self.codes, other.codes), pick(self.factor, other.factor),
                       pick(self.scale_codes, other.scale_codes), pick(self.dequantized, other.dequantized),
                       torch.where(take[:, 0], other.row_error, self.row_error))


def _quantize_tiles(tiles: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tiles [R, G, g] over factor [R, G] -> codes, fp32 dequantized values (table value · factor, as decoded) and the
    squared error per tile."""
    codes = fp4_codes((tiles / factor[..., None]).clamp(-FP4_MAX, FP4_MAX))
    deq = fp4_values(codes) * factor[..., None]
    return codes, deq, (deq - tiles).square().sum(-1)


def e2m1_groups(w: torch.Tensor, group: int, pow2: bool, shift: float = 1.0) -> Grouped:
    """fp32 w [R, C] in groups of ``group`` columns (the last may be shorter): scale = max|group| / 6 · shift, rounded
    to fp16 (never 0), or with ``pow2`` to 2^floor / 2^ceil of it, whichever quantizes the group better."""
    rows, cols = w.shape
    n = -(-cols // group)
    tiles = torch.nn.functional.pad(w, (0, n * group - cols)).view(rows, n, group)  # zero padding: no effect
    target = tiles.abs().amax(-1) / FP4_MAX * shift
    if pow2:
        _, exp = torch.frexp(target)  # target = m · 2^exp, m in [0.5, 1): floor(log2 target) = exp - 1
        low = (exp - 1).clamp(-127, 126)
        table = torch.from_numpy(e8m0_table())
        best = None
        for e in (low, low + 1):
            scale_codes = (e + 127).to(torch.uint8)
            codes, deq, err = _quantize_tiles(tiles, table[scale_codes.long()])
            if best is None:
                best = [scale_codes, codes, deq, err]
            else:
                better = err < best[3]
                best = [torch.where(better, scale_codes, best[0]), torch.where(better[..., None], codes, best[1]),
                        torch.where(better[..., None], deq, best[2]), torch.minimum(err, best[3])]
        scale_codes, codes, deq, err = best
        factor = table[scale_codes.long()]
    else:
        scale_codes = None
        factor = fp16_scale(target)  # as stored: fp16, never 0
        codes, deq, err = _quantize_tiles(tiles, factor)
    return Grouped(codes.reshape(rows, -1)[:, :cols], factor, scale_codes, deq.reshape(rows, -1)[:, :cols],
                   err.sum(-1))
