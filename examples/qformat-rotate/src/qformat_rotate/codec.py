"""Codec ``hadamard`` v1 (spec: ../../spec/hadamard.md): a block-diagonal randomized Hadamard rotation of the inputs.

    w = (input reshaped to [R, C/b, b] @ H_b / sqrt(b)) reshaped to [R, C], then every column j multiplied by signs[j]

Rotating spreads outlier input channels over a whole block (QuIP#, QuaRot), so the rotated matrix quantizes better;
a kernel computes y = input @ (H_b (signs * x)) with a fast Walsh-Hadamard transform of x, never rotating weights.
"""

from __future__ import annotations

import numpy as np

from qformat.plugin import CORE_CODECS, Codec, Context, NodeInfo


def hadamard_matrix(size: int) -> np.ndarray:
    """Sylvester's construction: H_1 = [1], H_2n = [[H, H], [H, -H]]; entries +-1, H @ H = size * I."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return h


def rotate_columns(matrix: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """The decode map: (matrix blockwise @ H/sqrt(b)) * signs."""
    rows, cols = matrix.shape
    h = hadamard_matrix(block) / np.float32(np.sqrt(block))
    rotated = (matrix.reshape(rows, cols // block, block) @ h).reshape(rows, cols)
    return (rotated * signs[None, :]).astype(np.float32)


def unrotate_columns(matrix: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """The inverse (used when quantizing): (matrix * signs) blockwise @ H/sqrt(b), since H/sqrt(b) is its own inverse."""
    rows, cols = matrix.shape
    h = hadamard_matrix(block) / np.float32(np.sqrt(block))
    return ((matrix * signs[None, :]).reshape(rows, cols // block, block) @ h).reshape(rows, cols)


class HadamardCodec(Codec):
    name = "rotate.hadamard"
    required = frozenset({"input", "signs", "block"})

    def infer(self, node: dict, ctx: Context) -> NodeInfo:
        block = ctx.int_field(node, "block", 1, 1 << 15)
        if block & (block - 1):
            raise ctx.error("bad_field", f"block must be a power of two, got {block}", "block")
        inner = ctx.infer(node["input"], "input")
        if len(inner.shape) != 2 or inner.shape[1] % block:
            raise ctx.error("shape_mismatch", f"input {list(inner.shape)} must be 2-D with columns a multiple of "
                            f"{block}", "input")
        signs = ctx.tensor(node, "signs")
        if signs.dtype != "I8" or signs.shape != (inner.shape[1],):
            raise ctx.error("shape_mismatch", f"signs must be I8 [{inner.shape[1]}], got {signs.dtype} "
                            f"{list(signs.shape)}", "signs")
        return NodeInfo(inner.shape, "float")

    def decode(self, node: dict, ctx: Context) -> np.ndarray:
        inner = np.asarray(ctx.decode(node["input"], "input"), dtype=np.float32)
        signs = np.asarray(ctx.load(node, "signs"))
        if not np.all(np.abs(signs) == 1):
            raise ctx.error("code_out_of_range", "signs must be -1 or +1", "signs")
        return rotate_columns(inner, signs.astype(np.float32), node["block"])


# The codecs this package's records use: the core ones plus rotate.hadamard. The method builds with it
# (RecordBuilder(..., registry=CODECS)); qformat itself reads with get_plugins().codecs, which holds the same codec.
CODECS = CORE_CODECS.extended([HadamardCodec()], owner="qformat-rotate")
