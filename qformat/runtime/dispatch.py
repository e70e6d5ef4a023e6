"""Pick a kernel for a record (codec signature, device, batch size), prepare weights with it, and run linears.

Kernels come from plugins (``qformat.plugins.get_plugins().kernels``: the Numba CPU kernels, the Triton GPU kernels,
third-party ones) plus the always-available torch reference path, which decodes a temporary full weight per call.

- ``QFORMAT_KERNEL=<name>`` (numba, triton, torch, ...) forces one kernel; a record it does not support is an error
  naming the record's codec signature. Unset, empty or ``auto``: the dispatcher chooses.
- Choice: among kernels for the device that support the record, prefer one whose ``max_batch`` covers the batch, then
  the highest ``priority``; with none, the torch reference path (with a warning on first use).
- ``linear(prepared, x)``: the fused kernel up to ``max_batch`` rows of x, above that (prefill) a temporary dense
  weight from ``prepared.dequantize()`` and a dense matmul. ``bind(prepared)`` is the same function with the prepared
  weight's decode path (optional ``decode_fn()``: one row of x, no per-call lookups) resolved once, for QLinear.
- ``fuse_rows([p1, p2, ...])``: weights that read the same input stacked into one (optional ``fuse_rows`` of the
  prepared weights; None where they do not provide it or their layouts differ).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import PluginError, QformatError
from ..format import QuantizedTensor, signature
from ..kernel_api import Kernel, PreparedWeight
from ..plugins import get_plugins
from .reference import TorchReferenceKernel

ENV_KERNEL = "QFORMAT_KERNEL"
log = logging.getLogger("qformat.kernels")
REFERENCE = TorchReferenceKernel()


class KernelSelectionError(PluginError):
    """A forced kernel is unknown, runs on another device, or does not support a record."""


def available_kernels() -> dict[str, Kernel]:
    """Installed kernels by name, the torch reference path included (last)."""
    kernels = dict(sorted(get_plugins().kernels.items()))
    kernels.setdefault(REFERENCE.name, REFERENCE)
    return kernels


def device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def runs_on(kernel: Kernel, device: str | torch.device) -> bool:
    return kernel.device in ("any", device_type(device))


def _supports(kernel: Kernel, record: dict) -> bool:
    try:
        return bool(kernel.supports(record))
    except Exception as exc:  # a plugin's bug must not stop a model from loading; the reference path still works
        log.warning("kernel %r raised in supports(): %s: %s", kernel.name, type(exc).__name__, exc)
        return False


def forced_kernel_name() -> str | None:
    name = os.environ.get(ENV_KERNEL, "").strip()
    return None if name in ("", "auto") else name


def _reason(kernel: Kernel, record: dict) -> str:
    why = getattr(kernel, "why_unsupported", None)
    text = why(record) if callable(why) else None
    return f" ({text})" if text else ""


def select_kernel(record: dict, device: str | torch.device = "cpu", batch: int = 1) -> Kernel:
    """The kernel to use for ``record`` on ``device`` for ``batch`` rows of x."""
    forced = forced_kernel_name()
    if forced is not None:
        kernels = available_kernels()
        kernel = kernels.get(forced)
        if kernel is None:
            raise KernelSelectionError(f"{ENV_KERNEL}={forced!r} names no installed kernel; available: "
                                       f"{', '.join(kernels)}")
        if not runs_on(kernel, device):
            raise KernelSelectionError(f"{ENV_KERNEL}={forced!r} runs on {kernel.device}, not on {device}")
        if not _supports(kernel, record):
            raise KernelSelectionError(f"{ENV_KERNEL}={forced!r} does not support codec signature "
                                       f"{signature(record.get('weight', {}))}{_reason(kernel, record)}")
        return kernel
    candidates = [k for k in get_plugins().kernels.values() if runs_on(k, device) and _supports(k, record)]
    if not candidates:
        return REFERENCE
    return max(candidates, key=lambda k: (batch <= k.max_batch, k.priority))


def prepare_weight(qt: QuantizedTensor, device: str | torch.device = "cpu", batch: int = 1) -> PreparedWeight:
    """Prepare ``qt`` with the selected kernel; ``prepared.kernel`` names the kernel that did it.

    If an automatically chosen kernel fails while preparing (anything but a format error, which means the file is
    bad), the layer falls back to the torch reference path with a warning.
    """
    kernel = select_kernel(qt.record, device, batch)
    try:
        prepared = kernel.prepare(qt, str(device))
    except QformatError:
        raise
    except Exception as exc:
        if forced_kernel_name() is not None or kernel is REFERENCE:
            raise
        log.warning("kernel %r could not prepare %s (%s): %s: %s; using the torch reference path", kernel.name,
                    qt.name, signature(qt.record["weight"]), type(exc).__name__, exc)
        kernel, prepared = REFERENCE, REFERENCE.prepare(qt, str(device))
    if getattr(prepared, "kernel", None) is None:
        prepared.kernel = kernel
    log.debug("%s (%s): kernel %s on %s", qt.name, signature(qt.record["weight"]), kernel.name, device)
    return prepared


def max_batch(prepared: PreparedWeight) -> int:
    own = getattr(prepared, "max_batch", None)
    if own is not None:
        return int(own)
    return int(getattr(getattr(prepared, "kernel", None), "max_batch", 1 << 30))


def linear(prepared: PreparedWeight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias): the fused kernel for small batches, dequantize + dense matmul above ``max_batch``."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > max_batch(prepared):
        weight = prepared.dequantize().to(x.device)
        compute = torch.float32 if x.device.type == "cpu" else x.dtype
        y = F.linear(x.to(compute), weight.to(compute)).to(x.dtype)
    else:
        y = prepared.matmul(x)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


BoundLinear = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def bind(prepared: PreparedWeight) -> BoundLinear:
    """``(x, bias) -> linear(prepared, x, bias)``, taking the prepared weight's decode path for one row of x.

    A prepared weight may offer ``decode_fn()``: a function of x alone that returns y, or None for an x it does not
    handle (then :func:`linear` runs). It is resolved here, once per layer, so a decoding step pays no lookup."""
    make = getattr(prepared, "decode_fn", None)
    decode = make() if callable(make) else None
    if decode is None:
        def run(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            return linear(prepared, x, bias)
        return run

    def run_decode(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = decode(x)
        if y is None:
            return linear(prepared, x, bias)
        return y if bias is None else y + bias.to(y.dtype)

    return run_decode


def fuse_rows(prepared: Sequence[PreparedWeight]) -> tuple[PreparedWeight, list[PreparedWeight]] | None:
    """(one weight with the rows of every ``prepared`` stacked, a view of it per part) or None.

    Only where the first weight's kernel offers ``fuse_rows`` and accepts the others (same kernel and layout); any
    failure there leaves the layers unfused, with a warning."""
    if len(prepared) < 2:
        return None
    method = getattr(prepared[0], "fuse_rows", None)
    if not callable(method):
        return None
    try:
        fused = method(list(prepared))
    except Exception as exc:  # a kernel's bug must cost speed, not the model
        log.warning("kernel %r could not fuse %s: %s: %s", getattr(getattr(prepared[0], "kernel", None), "name", "?"),
                    ", ".join(str(getattr(p, "name", "?")) for p in prepared), type(exc).__name__, exc)
        return None
    if fused is None:
        return None
    whole, views = fused
    if len(views) != len(prepared) or whole.out_features != sum(p.out_features for p in prepared):
        log.warning("kernel fused %d weights into an inconsistent result; leaving them unfused", len(prepared))
        return None
    return whole, list(views)
