"""What the built-in methods share: common parameters (config fields), the result type, weight intake, GPTQ/RTN
storage and the fp16 sparse outlier term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qformat.plugin import LayerInput, MethodConfig, QuantizedTensor, RecordBuilder, param

from ._quantizers import to_fp16, to_uint8


@dataclass(frozen=True)
class MinMaxConfig(MethodConfig):
    """The parameters of GPTQ's min-max quantizer, shared by rtn and gptq (their configs extend this one)."""

    bits: int = param(4, "bits per weight code", min=2, max=8)
    group_size: int = param(128, "input columns sharing one scale/zero; -1 or 0 = one group per row (need not "
                            "divide the row: the last group may be shorter)", min=-1, max=1 << 20)
    sym: bool = param(False, "symmetric range +-max|w| with the fixed zero (maxq+1)/2; otherwise [min, max] widened "
                      "to hold 0, with a bits-wide integer zero")
    planes: bool = param(False, "store the codes as bit-planes, most significant first, so a load may keep fewer "
                         "(qformat.load(path, planes=P), --planes P; spec/partial.md); same weights, same bytes")


@dataclass
class MethodResult:
    """A method's record plus what it computed internally: the file must decode to exactly ``dequantized``."""

    qt: QuantizedTensor
    dequantized: torch.Tensor  # fp32 [out, in], input column order
    info: dict[str, Any]


class QuantizesThroughRun:
    """Mixin of the built-in methods: ``run(layer, config)`` returns a :class:`MethodResult` (the record plus what was
    computed, for tests and benchmarks); ``quantize`` is its record."""

    def quantize(self, layer: LayerInput, config: Any) -> QuantizedTensor:
        return self.run(layer, config).qt  # type: ignore[attr-defined]  # each method defines run


def weight_matrix(layer: LayerInput) -> torch.Tensor:
    """The layer's weight as a private fp32 CPU matrix [out, in] (trailing dims flattened)."""
    w = torch.as_tensor(layer.weight).detach().to(dtype=torch.float32, device="cpu")
    return w.reshape(w.shape[0], -1).clone()


def record_builder(layer: LayerInput) -> RecordBuilder:
    return RecordBuilder(layer.name, tuple(torch.as_tensor(layer.weight).shape), layer.dtype)


def effective_group(group_size: int, cols: int) -> int:
    """-1/0 (or a group as wide as the row) means one group per row, stored as group_shape [1, in]."""
    return cols if group_size <= 0 or group_size >= cols else group_size


def affine_record(b: RecordBuilder, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group: int, sym: bool, planes: bool = False) -> dict:
    """affine(packed codes, fp16 scale [R, G], zero) with group_shape [1, group]: the GPTQ/RTN storage.

    The asymmetric zero is a packed bits-wide integer [R, G]; the symmetric one is the JSON number (maxq+1)/2.
    ``planes``: the codes as ``bitplanes`` (MSB first) instead of ``packed``: the same bytes, loadable at fewer bits.
    """
    zero_node: Any = float(1 << bits) / 2 if sym else b.packed("zero", to_uint8(zero), bits)
    codes_node = (b.bitplanes if planes else b.packed)("codes", to_uint8(codes), bits)
    return b.affine(codes_node, scale=b.tensor("scale", to_fp16(scale)), zero=zero_node, bits=bits,
                    group_shape=(1, group))


def sparse_outliers(b: RecordBuilder, mask: torch.Tensor, values: torch.Tensor, role: str = "outliers") -> Any:
    """The fp16 ``sparse_csr`` term of ``values`` (the weights or corrections at ``mask``'s positions, row-major as
    ``mask.nonzero()`` lists them) over the record's [R, C]."""
    rows, cols = mask.shape
    r, c = (t.numpy() for t in mask.nonzero(as_tuple=True))  # row-major: sorted by row, then column
    row_ptr = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=rows), out=row_ptr[1:])
    col_idx = c.astype(np.uint16 if cols <= 1 << 16 else np.int32)
    return b.sparse_csr(role, row_ptr, col_idx, to_fp16(values))

