"""``QLinear``: a drop-in for ``nn.Linear`` whose weight stays packed and is multiplied by a kernel.

The module owns a :class:`qformat.kernel_api.PreparedWeight` (packed data only) and an optional bias. The packed data
is deliberately not a parameter or buffer: transformers re-creates missing buffers as empty tensors and ``state_dict``
consumers would expect a dense weight, neither of which fits a packed record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .format import bits_per_weight, signature
from .kernel_api import PreparedWeight

LinearFn = Callable[[PreparedWeight, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _dispatch_linear() -> LinearFn:
    from qformat_kernels.dispatch import linear  # the kernels package is a plugin layer above qformat

    return linear


class QLinear(nn.Module):
    """y = x @ W.T + b, with W a qformat record prepared for one kernel on one device."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, record: dict | None = None,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.record = record
        self.prepared: PreparedWeight | None = None
        self.kernel_name: str | None = None
        self._linear: LinearFn | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def like(cls, linear: nn.Linear, record: dict) -> QLinear:
        """A placeholder for ``linear`` (same shape and bias dtype/device, typically meta) awaiting its weight."""
        bias = linear.bias
        return cls(linear.in_features, linear.out_features, bias is not None, record=record,
                   device=bias.device if bias is not None else None, dtype=bias.dtype if bias is not None else None)

    def attach(self, prepared: PreparedWeight, kernel_name: str | None = None, linear: LinearFn | None = None) -> None:
        """Install the prepared weight; ``linear(prepared, x, bias)`` overrides the dispatcher's (tests)."""
        if (prepared.out_features, prepared.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"prepared weight is {prepared.out_features}x{prepared.in_features}, the layer is "
                             f"{self.out_features}x{self.in_features}")
        self.prepared = prepared
        self.kernel_name = kernel_name or getattr(getattr(prepared, "kernel", None), "name", None)
        self._linear = linear or _dispatch_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._linear is None:
            raise RuntimeError("QLinear has no prepared weight yet (load the model with qformat.load)")
        return self._linear(self.prepared, x, self.bias)

    def nbytes(self) -> int:
        """Bytes this layer holds: the prepared (packed) weight plus the bias."""
        held = self.prepared.nbytes() if self.prepared is not None else 0
        return held + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.record is not None:
            text += f", codec={signature(self.record['weight'])}, bits={bits_per_weight(self.record):.3g}"
        if self.kernel_name:
            text += f", kernel={self.kernel_name}"
        return text


def qlinear_modules(model: nn.Module) -> dict[str, QLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}
