"""Method ``nf4``: QLoRA's 4-bit NormalFloat with absmax blocks, optional double quantization and optional rotation.

Storage, in qformat's core component kinds (plus this package's ``rotate.hadamard`` codec when ``rotate`` is on):

    [rotate.hadamard(]  scale( lut(packed 4-bit codes, NF4 table [16]), factor=absmax, group_shape=[1, block_size] )  [)]

absmax is fp32 [R, C/block_size], or with ``double_quant`` itself an ``affine`` node: 8-bit codes with one fp32
scale and zero per 2-D tile of whole rows covering about ``dq_block`` absmax values (as LQ-LoRA's QuantConfig;
bitsandbytes uses a dynamic 8-bit map instead, which would be a ``lut`` here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qformat.plugin import LayerInput, Method, MethodConfig, ParameterError, QuantizedTensor, RecordBuilder, param

from .codec import CODECS, unrotate_columns

# bitsandbytes functional.get_4bit_type("nf4")
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


def nearest_nf4(normalized: np.ndarray) -> np.ndarray:
    """Index of the nearest NF4 level (ties go to the upper level, as bucketize against midpoints does)."""
    midpoints = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2
    return np.searchsorted(midpoints, np.clip(normalized, -1.0, 1.0), side="left").astype(np.uint8)


def _blocks(matrix: np.ndarray, block: int) -> np.ndarray:
    rows, cols = matrix.shape
    padded = np.zeros((rows, -(-cols // block) * block), dtype=matrix.dtype)
    padded[:, :cols] = matrix
    return padded.reshape(rows, -1, block)


@dataclass(frozen=True)
class NF4Config(MethodConfig):
    """The parameters of method nf4 (``qformat.NF4Config(rotate=True)``; ``-p rotate=true`` on the command line)."""

    method = "nf4"
    block_size: int = param(64, "weights per absmax block along a row", min=8, max=4096)
    double_quant: bool = param(True, "store absmax as 8-bit affine codes (saves ~0.37 bits/weight)")
    dq_block: int = param(256, "absmax values per second-level scale/zero", min=16, max=65536)
    rotate: bool = param(False, "randomized Hadamard rotation of the inputs before quantizing")
    rotate_block: int = param(64, "Hadamard block size (a power of two dividing in_features)", min=2, max=4096)
    seed: int = param(0, "seed of the rotation's random signs", min=0)

    def check(self) -> None:  # constraints spanning parameters
        block = self.rotate_block
        if self.rotate and block & (block - 1):
            raise ParameterError(f"method 'nf4' parameter 'rotate_block': {block} is not a power of two")


class NF4(Method):
    config = NF4Config
    description = "4-bit NormalFloat (QLoRA) with absmax blocks, optional 8-bit double quantization and rotation"

    def quantize(self, layer: LayerInput, config: NF4Config) -> QuantizedTensor:
        weight = layer.weight.detach().float().cpu().numpy().reshape(layer.weight.shape[0], -1)
        rows, cols = weight.shape
        signs = None
        if config.rotate:
            if cols % config.rotate_block:
                raise ParameterError(f"{layer.name}: in_features {cols} is not a multiple of rotate_block "
                                     f"{config.rotate_block}")
            rng = np.random.default_rng(config.seed)
            signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=cols)
            weight = unrotate_columns(weight, signs.astype(np.float32), config.rotate_block)

        block = config.block_size
        blocks = _blocks(weight, block)
        absmax = np.abs(blocks).max(axis=2).astype(np.float32)  # [R, G]
        b = RecordBuilder(layer.name, tuple(layer.weight.shape), layer.dtype, registry=CODECS)
        if config.double_quant:
            absmax_node, absmax = self._double_quant(b, absmax, config.dq_block)
        else:
            absmax_node = b.tensor("absmax", absmax)
        safe = np.where(absmax > 0, absmax, 1.0)[..., None]
        codes = nearest_nf4(blocks / safe).reshape(rows, -1)[:, :cols]
        node = b.scale(b.lut(b.packed("codes", codes, 4), b.tensor("nf4_table", NF4_TABLE)), absmax_node,
                       group_shape=(1, block))
        if signs is not None:
            node = b.node("rotate.hadamard", 1, input=node, signs=b.store("signs", signs), block=config.rotate_block)
        return b.finish(node, info={"method": self.name, "params": config.to_params()})

    @staticmethod
    def _double_quant(b: RecordBuilder, absmax: np.ndarray, dq_block: int) -> tuple[dict, np.ndarray]:
        """8-bit affine codes, one scale and zero per tile of whole rows holding about dq_block absmax values.

        Returns the node and the dequantized absmax it decodes to (the codes are chosen against the latter).
        """
        rows, groups = absmax.shape
        tile_rows = max(1, dq_block // groups)
        tiles = -(-rows // tile_rows)
        padded = np.full((tiles * tile_rows, groups), np.nan, dtype=np.float32)
        padded[:rows] = absmax
        chunks = padded.reshape(tiles, tile_rows * groups)
        low, high = np.nanmin(chunks, axis=1), np.nanmax(chunks, axis=1)
        scale = np.where(high > low, (high - low) / 255.0, 1.0).astype(np.float32)[:, None]  # [tiles, 1]
        zero = (-low[:, None] / scale).astype(np.float32)  # float zero: both ends of the range stay exact
        row_scale, row_zero = np.repeat(scale, tile_rows, 0)[:rows], np.repeat(zero, tile_rows, 0)[:rows]
        codes = np.clip(np.rint(absmax / row_scale + row_zero), 0, 255).astype(np.int64)
        node = b.affine(b.packed("absmax.codes", codes, 8), scale=b.tensor("absmax.scale", scale),
                        zero=b.tensor("absmax.zero", zero), bits=8, group_shape=(tile_rows, groups))
        return node, (codes.astype(np.float32) - row_zero) * row_scale
