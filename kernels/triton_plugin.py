"""Registers the Triton kernel (device "cuda"). Light on import (no torch, no triton): the kernels are defined at
the first ``prepare``, so ``TRITON_INTERPRET=1`` set before then runs them on CPU tensors (slowly; for tests)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

from qformat.format.record import matrix_shape
from qformat.plugin import Kernel, PreparedWeight, QuantizedTensor, hookimpl

from . import triton_plan


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonKernel(Kernel):
    """Fused dequantize-and-multiply in Triton for affine (1..16-bit codes, grouped, quantized stats), scalar and
    vector codebooks, bit-planes and ternary codes, with permutations, CSR outliers and low-rank sidecars."""

    name = "triton"
    device = "cuda"
    priority = 10
    max_batch = triton_plan.MAX_BATCH

    def why_unsupported(self, record: dict) -> str | None:
        return triton_plan.why_unsupported(record)

    def prepare(self, qt: QuantizedTensor, device: str = "cuda") -> PreparedWeight:
        import torch

        if str(device).startswith("cpu") and not _interpreting():
            raise ValueError("the Triton kernels run on a CUDA device; on CPU set TRITON_INTERPRET=1 before the "
                             "first prepare (slow, meant for tests)")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is available for the Triton kernels")
        from . import triton_ops
        from .triton_prepared import TritonWeight

        if str(device).startswith("cpu") and not triton_ops.INTERPRETER_USABLE:
            raise ValueError("triton was imported before TRITON_INTERPRET=1 was set; the kernels cannot run on CPU "
                             "in this process")

        root = triton_plan.plan(qt)
        return TritonWeight(root, matrix_shape(tuple(qt.record["shape"])), str(device))


@hookimpl
def qformat_register_kernels(register: Callable[[Kernel], None]) -> None:
    if importlib.util.find_spec("triton") is not None:
        register(TritonKernel())
