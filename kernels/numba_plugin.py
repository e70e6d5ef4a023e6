"""The Numba CPU kernel family, registered through the ``qformat`` entry point ``numba_kernels``.

Fused dequantize-and-multiply for batches up to ``max_batch`` rows; above that, callers dequantize and run a dense
matmul (``qformat.runtime.dispatch.linear``). What it supports is decided from the record alone: the tree is
lowered by ``qformat.lowering`` (the grammar), ``numba_plan`` says which lowered trees these kernels run.
"""

from __future__ import annotations

from typing import ClassVar

from qformat.plugin import Kernel, QuantizedTensor, hookimpl

from .numba_plan import stream_form, why_unsupported


class NumbaKernel(Kernel):
    name = "numba"
    device = "cpu"
    priority = 10
    # Above this many rows of x, dequantize + dense matmul is as fast or faster (measured on the 2-core CPU: the fused
    # kernel still wins at 16 rows for 4096^2 and ties for the 576-wide SmolLM2 layers; at 32 the dense path wins
    # for small layers).
    max_batch = 16
    supported: ClassVar[tuple[str, ...]] = (
        "affine over packed | bit-plane | integer codes of 1-16 bits, scale/zero/offset numbers or any tree (quantized "
        "stats), groups [gr, gc] (fast path when gc is a multiple of 16 or covers the row)",
        "affine with statistics on row-block tiles [gr, 1] (HQQ axis 0; gr a multiple of 16): folded into x",
        "lut over packed | bit-plane | integer codes: global tables (NF4, FP4, FP8) and per-tile tables [Gr, Gc, T] "
        "(tables of <= 16 entries held in registers with AVX2/AVX-512; FP8 E4M3/E5M2 tables decoded arithmetically)",
        "ternary and raw packed codes under scale",
        "vq: additive codebooks [M, K, d], packed or integer codes",
        "scale(...): per-row, per-group (absmax, double quant) and per-input-column factors",
        "sum(...) of any of these with sparse_csr outliers, lowrank sidecars and sign_lowrank (BitStack) terms",
        "permute(...) around any of these",
        "concat(...) of any of these side by side (SliM-LLM's mixed bits per group): one product per part over its "
        "block of x's columns",
        "lut over a ternary_dict stream (QMoE sub-1-bit) with a per-row or global table: decoded from the codewords",
    )

    def why_unsupported(self, record: dict) -> str | None:
        if stream_form(record):
            return None
        return why_unsupported(record)

    def prepare(self, qt: QuantizedTensor, device: str = "cpu"):  # -> NumbaPreparedWeight
        if str(device).split(":")[0] != "cpu":
            raise ValueError(f"the numba kernel runs on the CPU, not {device!r}")
        if stream_form(qt.record):
            from .numba_stream import StreamPrepared

            prepared = StreamPrepared(qt)
            prepared.kernel = self
            prepared.max_batch = self.max_batch
            return prepared
        from .numba_prepared import prepare  # numba compiles lazily; keep plugin discovery light

        prepared = prepare(qt)
        prepared.kernel = self
        prepared.max_batch = self.max_batch
        return prepared


@hookimpl
def qformat_register_kernels(register) -> None:
    register(NumbaKernel())
