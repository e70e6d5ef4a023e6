"""The contract between qformat and a kernel plugin: compute y = x @ W.T straight from a record's packed tensors.

Everything the dispatcher (``qformat.runtime.dispatch``) uses is declared here; what is optional has a default that
means "not offered", so a kernel implements only what it has (docs/plugins.md, "Kernels").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from .format import QuantizedTensor


class PreparedWeight:
    """A weight repacked in memory for one kernel. Holds packed data only, never a full-precision copy.

    Required: ``out_features``, ``in_features``, :meth:`matmul`, :meth:`dequantize`, :meth:`nbytes`.
    Optional: ``max_batch``, :meth:`decode_fn`, :meth:`fuse_rows` (defaults: the kernel's batch limit, no fast
    one-row path, no row stacking).
    """

    out_features: int
    in_features: int
    # Rows of x above which the dispatcher dequantizes and runs a dense matmul instead of matmul(); None: the
    # kernel's max_batch.
    max_batch: int | None = None
    # The kernel that prepared this weight; the dispatcher sets it when prepare() leaves it None.
    kernel: Kernel | None = None

    def matmul(self, x: Any) -> Any:
        """x: torch tensor [..., in_features] (float) -> [..., out_features] in x's dtype."""
        raise NotImplementedError

    def dequantize(self) -> Any:
        """The full weight [out, in] as a float32 torch tensor (temporary; used for large batches)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held in memory by this prepared weight."""
        raise NotImplementedError

    def decode_fn(self) -> Callable[[Any], Any | None] | None:
        """A lean ``x -> y`` for decoding (one row of x), with everything that does not depend on x looked up once;
        it returns None for an x it does not handle (the dispatcher then runs :meth:`matmul`). None (the default):
        no such path."""
        return None

    def fuse_rows(self, parts: Sequence[PreparedWeight]) -> tuple[PreparedWeight, list[PreparedWeight]] | None:
        """``parts`` (this weight first; layers that read the same input) stacked along output rows: (the stacked
        weight, a row view of it per part, each computing exactly what its part did), or None where they cannot
        be stacked (the default: never)."""
        return None


class Kernel:
    """A kernel family (e.g. numba on CPU): which records it runs, and how it prepares them.

    Required: ``name``, ``device``, :meth:`prepare`, and :meth:`why_unsupported` or :meth:`supports` (the default
    of each is defined by the other; a kernel that overrides neither claims every record).
    """

    name: ClassVar[str]
    device: ClassVar[str]  # "cpu", "cuda", or "any"
    priority: ClassVar[int] = 0  # higher wins when several support a record
    max_batch: ClassVar[int] = 1 << 30  # above this many rows of x, callers dequantize and use a dense matmul
    supported: ClassVar[tuple[str, ...]] = ()  # one line per family of codec trees, for `qformat kernels`

    def why_unsupported(self, record: dict) -> str | None:
        """None when this kernel runs ``record`` (decided from the record alone, no tensor data), else the reason
        (shown when a forced kernel is refused)."""
        return None

    def supports(self, record: dict) -> bool:
        return self.why_unsupported(record) is None

    def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> PreparedWeight:
        """Repack ``qt`` for ``device`` (data checks included: a bad file raises the format's errors)."""
        raise NotImplementedError
