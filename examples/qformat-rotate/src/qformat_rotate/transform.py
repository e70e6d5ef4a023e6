"""Transform ``hadamard``: a randomized block-diagonal Hadamard rotation of every selected linear's inputs.

    qformat convert --transform hadamard --method rtn --bits 4 <model> --out out/rot-rtn
    qformat convert --transform hadamard:block=128 --method nf4 <model> --out out/rot-nf4

Each linear gets its own rotation ``R = H_b/sqrt(b) · diag(signs)`` (random signs, seeded by the transform's ``seed``
and the linear's name): the method quantizes ``W R⁻¹`` on the rotated inputs ``x R⁻¹ᵀ``, so outlier input channels
are spread over a whole block (QuaRot, QuIP#), and the record is wrapped in this package's ``rotate.hadamard`` codec,
which decodes it back to ``W``. Nothing is folded into neighbouring modules, so every architecture works; the
``rotate-numba`` kernel moves the rotation onto the input at run time (a fast Walsh–Hadamard transform).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from qformat.plugin import (
    BlockInput,
    BlockResult,
    InputTransform,
    ParameterError,
    RecordBuilder,
    SkipBlock,
    Transform,
    TransformConfig,
    param,
)

from .codec import hadamard_matrix


@dataclass(frozen=True)
class HadamardConfig(TransformConfig):
    """The parameters of transform hadamard (``--transform hadamard:block=128,seed=1``)."""

    transform = "hadamard"
    block: int = param(64, "Hadamard block size: a power of two dividing every selected linear's in_features",
                       min=1, max=32768)
    seed: int = param(0, "seed of the random signs (each linear also mixes in its name)", min=0, max=2**32 - 1)

    def check(self) -> None:  # constraints spanning more than one value's range
        if self.block & (self.block - 1):
            raise ParameterError(f"transform 'hadamard' parameter 'block': {self.block} is not a power of two")


def signs_for(seed: int, name: str, columns: int) -> np.ndarray:
    """Random ±1 (I8) per input column, from the seed and the linear's full name: the same on every run."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=columns)


class HadamardRotation(InputTransform):
    """``x ↦ x R⁻¹ᵀ`` on the inputs and ``W ↦ W R⁻¹`` on the weight, with ``R = H_b/sqrt(b) · diag(signs)`` per
    block; both maps are ``(m · signs) @ H_b/sqrt(b)`` blockwise, since H_b/sqrt(b) is symmetric and orthogonal."""

    def __init__(self, signs: np.ndarray, block: int) -> None:
        import torch

        self.signs = np.asarray(signs, dtype=np.int8)
        self.block = block
        # H_b / fp32(sqrt(b)), as the codec's decoder builds it
        self._h = torch.from_numpy(hadamard_matrix(block) / np.float32(np.sqrt(block)))
        self._s = torch.from_numpy(self.signs.astype(np.float32))

    def _unrotate(self, m: Any) -> Any:
        shape = m.shape
        signed = m * self._s.to(device=m.device, dtype=m.dtype)
        blocks = signed.reshape(*shape[:-1], shape[-1] // self.block, self.block)
        return (blocks @ self._h.to(device=m.device, dtype=m.dtype)).reshape(shape)

    def weight(self, w: Any) -> Any:
        return self._unrotate(w)

    def inputs(self, x: Any) -> Any:
        return self._unrotate(x)

    def wrap(self, builder: RecordBuilder, inner: dict, role: str) -> dict:
        return builder.node("rotate.hadamard", 1, input=inner, signs=builder.store(f"{role}.signs", self.signs),
                            block=self.block)

    def describe(self) -> str:
        return f"HadamardRotation[block {self.block}]"


class Hadamard(Transform):
    config = HadamardConfig
    description = ("randomized block-diagonal Hadamard rotation of every selected linear's inputs, stored as the "
                   "rotate.hadamard codec (QuaRot-style incoherence before any method)")

    @staticmethod
    def architectures(model_type: str) -> bool:
        return True  # nothing is folded into neighbours: any block's linears can carry their own rotation

    def check_shapes(self, config: HadamardConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if shape[-1] % config.block:
                raise ParameterError(f"transform 'hadamard': block {config.block} does not divide the "
                                     f"{shape[-1]} input features of {name}; choose a block that divides it")

    def apply(self, block: BlockInput, config: HadamardConfig) -> BlockResult:
        result = BlockResult()
        for name in block.linears:
            columns = block.block.get_submodule(name).weight.shape[1]
            if columns % config.block:
                raise SkipBlock(f"block {config.block} does not divide the {columns} input features of {name}")
            signs = signs_for(config.seed, block.prefix + name, columns)
            result.input_transforms[name] = HadamardRotation(signs, config.block)
        return result
