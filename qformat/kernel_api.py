"""The contract between qformat and a kernel plugin: compute y = x @ W.T straight from a record's packed tensors."""

from __future__ import annotations

from typing import Any, ClassVar

from .format import QuantizedTensor


class PreparedWeight:
    """A weight repacked in memory for one kernel. Holds packed data only, never a full-precision copy."""

    out_features: int
    in_features: int

    def matmul(self, x: Any) -> Any:
        """x: torch tensor [..., in_features] (float) -> [..., out_features] in x's dtype."""
        raise NotImplementedError

    def dequantize(self) -> Any:
        """The full weight [out, in] as a float32 torch tensor (temporary; used for large batches)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held in memory by this prepared weight."""
        raise NotImplementedError


class Kernel:
    """A kernel family (e.g. numba on CPU). ``supports`` inspects the record's codec tree."""

    name: ClassVar[str]
    device: ClassVar[str]  # "cpu" or "cuda"
    priority: ClassVar[int] = 0  # higher wins when several support a record
    max_batch: ClassVar[int] = 1 << 30  # above this many rows of x, callers dequantize and use a dense matmul

    def supports(self, record: dict) -> bool:
        raise NotImplementedError

    def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> PreparedWeight:
        raise NotImplementedError
