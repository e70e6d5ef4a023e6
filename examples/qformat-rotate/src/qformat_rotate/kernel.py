"""Kernel ``rotate-numba`` for ``rotate.hadamard`` records, registered through its own entry point (``rotate_kernels``)
so that a machine without Numba loses only this kernel, never the codec or the transform.

    y = W x = X (H_b s) (signs * x)    blockwise (spec/hadamard.md, "Kernel note")

The rotation moves to the input: ``x' = s * H_b (signs * x)`` per block, a fast Walsh-Hadamard transform in Numba
(``b log2 b`` additions per block, no weight is ever rotated), then ``y = X x'`` by whichever other installed CPU
kernel supports the child record (qformat's ``numba`` kernel for the trees rtn, gptq or nf4 write). A record whose
child no kernel supports is not claimed, and the dispatcher falls back to the torch reference path.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np

from qformat.format.record import matrix_shape
from qformat.plugin import FormatError, Kernel, PreparedWeight, QuantizedTensor, hookimpl

from .codec import rotate_columns

CODEC = "rotate.hadamard"


def child_record(record: dict, child_bytes: int = 0) -> dict:
    """The record of the rotated weight X: the same name, shape [R, C], its child node as the weight."""
    return {"shape": list(matrix_shape(tuple(record["shape"]))), "dtype": record["dtype"],
            "storage_bytes": child_bytes, "weight": record["weight"]["input"]}


def _is_rotation(record: Any) -> bool:
    weight = record.get("weight") if isinstance(record, dict) else None
    return (isinstance(weight, dict) and weight.get("codec") == CODEC and weight.get("version") == 1
            and isinstance(weight.get("input"), dict) and type(weight.get("block")) is int
            and weight["block"] >= 1 and weight["block"] & (weight["block"] - 1) == 0)


class HadamardKernel(Kernel):
    """rotate.hadamard over any child tree another installed CPU kernel supports (FWHT of x in Numba)."""

    name = "rotate-numba"
    device = "cpu"
    priority = 10
    max_batch = 16  # the prepared weight takes its child kernel's
    supported: ClassVar[tuple[str, ...]] = (
        "rotate.hadamard(...) over any tree another installed CPU kernel supports (x rotated by a Numba FWHT)",)

    def child_kernel(self, record: dict) -> Kernel | None:
        """The kernel for the child record: the highest-priority other CPU kernel that supports it."""
        if not _is_rotation(record):
            return None
        from qformat.plugins import get_plugins

        child = child_record(record)
        able = []
        for kernel in get_plugins().kernels.values():
            if kernel.name == self.name or kernel.device != "cpu":
                continue
            try:
                if kernel.supports(child):
                    able.append(kernel)
            except Exception:  # another plugin's bug: that kernel is simply not used here
                continue
        return max(able, key=lambda k: k.priority, default=None)

    def supports(self, record: dict) -> bool:
        return self.child_kernel(record) is not None

    def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> HadamardPrepared:
        if str(device).split(":")[0] != "cpu":
            raise ValueError(f"the rotate-numba kernel runs on the CPU, not {device!r}")
        from qformat.format import validate_record
        from qformat.plugins import get_plugins

        validate_record(qt.name, qt.record, qt.tensor_info, get_plugins().codecs)
        kernel = self.child_kernel(qt.record)
        if kernel is None:
            raise ValueError(f"no installed CPU kernel supports the child of {qt.name}")
        node = qt.record["weight"]
        signs = np.asarray(qt.tensors[node["signs"]])
        if not np.all(np.abs(signs) == 1):  # the decoder's data check (spec/hadamard.md): same error, same code
            raise FormatError("code_out_of_range", "signs must be -1 or +1", tensor=qt.name, field="weight/signs")
        tensors = {k: v for k, v in qt.tensors.items() if k != node["signs"]}
        child_bytes = sum(int(a.nbytes) for a in tensors.values())
        child = kernel.prepare(QuantizedTensor(qt.name, child_record(qt.record, child_bytes), tensors), "cpu")
        prepared = HadamardPrepared(child, signs.astype(np.float32), node["block"])
        prepared.kernel = self
        return prepared


class HadamardPrepared(PreparedWeight):
    def __init__(self, child: PreparedWeight, signs: np.ndarray, block: int) -> None:
        self.child = child
        self.signs = signs
        self.block = block
        # s = 1/sqrt(block) rounded to fp32, as the decoder's H_b / fp32(sqrt(block))
        self.scale = np.float32(1.0) / np.float32(np.sqrt(block))
        self.out_features, self.in_features = child.out_features, child.in_features
        self.max_batch = getattr(child, "max_batch", HadamardKernel.max_batch)

    def matmul(self, x: Any) -> Any:
        import torch

        from .numba_fwht import rotate_inputs

        flat = x.detach().reshape(-1, self.in_features).to("cpu", torch.float32).contiguous().numpy()
        rotated = rotate_inputs(flat, self.signs, self.block, self.scale)
        y = self.child.matmul(torch.from_numpy(rotated))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> Any:
        import torch

        inner = self.child.dequantize().detach().float().cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(rotate_columns(inner, self.signs, self.block)))

    def nbytes(self) -> int:
        return int(self.child.nbytes()) + int(self.signs.nbytes)


@hookimpl
def qformat_register_kernels(register):
    if importlib.util.find_spec("numba") is not None:  # without Numba, the reference path decodes these records
        register(HadamardKernel())
