"""The torch reference path: for any record no kernel handles, decode the full weight on every call and use F.linear.

Correct (it is the reference decoder), slow, and logged: the first matmul of each layer warns, naming the layer and
its codec signature. The prepared weight keeps the record's canonical packed tensors as they are (no full weight).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..format import CodecRegistry, QuantizedTensor, signature, validate_record
from ..format.record import matrix_shape
from ..kernel_api import Kernel, PreparedWeight

log = logging.getLogger("qformat.kernels")


class TorchReferencePrepared(PreparedWeight):
    max_batch = 1 << 30  # decoding dominates whatever the batch; matmul itself is already dense

    def __init__(self, qt: QuantizedTensor, device: str, kernel: Kernel) -> None:
        self.qt = qt
        self.device = torch.device(device)
        self.kernel = kernel
        self.signature = signature(qt.record["weight"])
        self.out_features, self.in_features = matrix_shape(tuple(qt.record["shape"]))
        self._warned = False

    def _decode(self) -> torch.Tensor:
        weight = np.asarray(self.qt.decode(_codecs()), dtype=np.float32).reshape(self.out_features, self.in_features)
        return torch.from_numpy(weight).to(self.device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self._warned:
            self._warned = True
            log.warning("no kernel for %s (%s) on %s: using the torch reference path, which decodes the full weight "
                        "on every call (correct but slow)", self.qt.name, self.signature, self.device)
        weight = self._decode()
        return F.linear(x.to(weight.device, torch.float32), weight).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self._decode()

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.qt.tensors.values())


class TorchReferenceKernel(Kernel):
    """Always available, on every device; the dispatcher's fallback. Not a plugin: it is part of the dispatcher."""

    name = "torch"
    device = "any"
    priority = -1000
    max_batch = 1 << 30
    supported = ("every codec the reference decoder knows (decodes a temporary full weight per call)",)

    def supports(self, record: dict) -> bool:
        try:
            names = _codecs().names()
            return _codecs_known(record.get("weight"), names)
        except Exception:
            return False

    def why_unsupported(self, record: dict) -> str | None:
        return None if self.supports(record) else "a codec (or codec version) no installed plugin provides"

    def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> TorchReferencePrepared:
        validate_record(qt.name, qt.record, qt.tensor_info, _codecs())
        return TorchReferencePrepared(qt, device, self)


def _codecs() -> CodecRegistry:
    """The codecs of the installed plugin set (core + plugins): the reference path decodes any of them."""
    from ..plugins import get_plugins

    return get_plugins().codecs


def _codecs_known(node: object, names: dict) -> bool:
    if not isinstance(node, dict):
        return True
    if node.get("codec") not in names or node.get("version") not in names[node["codec"]][0]:
        return False
    children = [v for v in node.values() if isinstance(v, dict)]
    children += [t for key in ("terms", "parts") for t in node.get(key, [])]  # sum terms, concat parts
    return all(_codecs_known(c, names) for c in children)
