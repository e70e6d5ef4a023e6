"""Pick a kernel for a record (codec signature, device, batch size), prepare weights with it, and run linears.

Kernels come from plugins (``qformat.plugins.get_plugins().kernels``: the Numba CPU kernels, the Triton GPU kernels,
third-party ones) plus the always-available torch reference path, which decodes a temporary full weight per call.
The dispatcher uses only what :mod:`qformat.kernel_api` declares (docs/plugins.md, "Kernels").

- Forcing a kernel: ``select_kernel(..., forced=name)``, which ``qformat.load(..., kernel=name)`` and
  ``QformatConfig(kernel=name)`` pass down; without it, ``QFORMAT_KERNEL=<name>`` (numba, triton, torch, ...).
  Unset, empty or ``auto``: the dispatcher chooses. A forced kernel that is unknown, runs on another device or does
  not support a record is a :class:`KernelSelectionError` naming the record's codec signature and the kernel's
  ``why_unsupported`` reason, whichever way it was forced.
- Choice: among kernels for the device that support the record, prefer one whose ``max_batch`` covers the batch, then
  the highest ``priority``; with none, the torch reference path (with a warning on first use).
- ``linear(prepared, x)``: the fused kernel up to ``max_batch`` rows of x, above that (prefill) a temporary dense
  weight from ``prepared.dequantize()`` and a dense matmul. ``bind(prepared)`` is the same function with the prepared
  weight's ``decode_fn()`` (one row of x, no per-call lookups) resolved once, for QLinear.
- ``fuse_rows([p1, p2, ...])``: weights that read the same input stacked into one (the first one's ``fuse_rows``;
  None where it declines or the layouts differ).
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
AUTO = ("", "auto")  # forced names that mean "let the dispatcher choose"
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


def forced_kernel_name(forced: str | None = None) -> str | None:
    """The kernel to force: ``forced`` if given, else ``QFORMAT_KERNEL``; None when the dispatcher chooses."""
    name = (os.environ.get(ENV_KERNEL, "") if forced is None else forced).strip()
    return None if name in AUTO else name


def _reason(kernel: Kernel, record: dict) -> str:
    try:
        text = kernel.why_unsupported(record)
    except Exception as exc:
        text = f"why_unsupported raised {type(exc).__name__}: {exc}"
    return f" ({text})" if text else ""


def select_kernel(record: dict, device: str | torch.device = "cpu", batch: int = 1, forced: str | None = None, *,
                  name: str | None = None) -> Kernel:
    """The kernel to use for ``record`` (named ``name`` in errors) on ``device`` for ``batch`` rows of x.

    ``forced``: a kernel name that must be used ("auto" or "": the dispatcher chooses); None: ``QFORMAT_KERNEL``.
    """
    chosen = forced_kernel_name(forced)
    if chosen is not None:
        return _forced(chosen, ENV_KERNEL if forced is None else "the kernel option", record, device, name)
    candidates = [k for k in get_plugins().kernels.values() if runs_on(k, device) and _supports(k, record)]
    if not candidates:
        return REFERENCE
    return max(candidates, key=lambda k: (batch <= k.max_batch, k.priority))


def _forced(chosen: str, origin: str, record: dict, device: str | torch.device, name: str | None) -> Kernel:
    kernels = available_kernels()
    kernel = kernels.get(chosen)
    what = f"kernel {chosen!r} (forced by {origin})"
    if kernel is None:
        raise KernelSelectionError(f"unknown kernel {chosen!r} (forced by {origin}); available kernels: "
                                   f"{', '.join(kernels)}")
    if not runs_on(kernel, device):
        raise KernelSelectionError(f"{what} runs on {kernel.device}, not on {device}")
    if not _supports(kernel, record):
        weight = record.get("weight") if isinstance(record, dict) else None
        sig = signature(weight) if isinstance(weight, dict) else "?"
        of = f" of {name!r}" if name else ""
        raise KernelSelectionError(f"{what} does not support codec signature {sig}{of}{_reason(kernel, record)}; "
                                   "leave the kernel unset to let the dispatcher choose")
    return kernel


def prepare_weight(qt: QuantizedTensor, device: str | torch.device = "cpu", batch: int = 1,
                   forced: str | None = None) -> PreparedWeight:
    """Prepare ``qt`` with the selected kernel (``forced``: see :func:`select_kernel`); ``prepared.kernel`` names the
    kernel that did it.

    If an automatically chosen kernel fails while preparing (anything but a format error, which means the file is
    bad), the layer falls back to the torch reference path with a warning. A forced kernel's failure is raised.
    """
    kernel = select_kernel(qt.record, device, batch, forced, name=qt.name)
    try:
        prepared = kernel.prepare(qt, str(device))
    except QformatError:
        raise
    except Exception as exc:
        if forced_kernel_name(forced) is not None or kernel is REFERENCE:
            raise
        log.warning("kernel %r could not prepare %s (%s): %s: %s; using the torch reference path", kernel.name,
                    qt.name, signature(qt.record["weight"]), type(exc).__name__, exc)
        kernel, prepared = REFERENCE, REFERENCE.prepare(qt, str(device))
    if prepared.kernel is None:
        prepared.kernel = kernel
    log.debug("%s (%s): kernel %s on %s", qt.name, signature(qt.record["weight"]), kernel.name, device)
    return prepared


def max_batch(prepared: PreparedWeight) -> int:
    """Rows of x up to which :func:`linear` calls ``prepared.matmul``: its own ``max_batch``, else its kernel's."""
    if prepared.max_batch is not None:
        return int(prepared.max_batch)
    return int(prepared.kernel.max_batch) if prepared.kernel is not None else Kernel.max_batch


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

    ``prepared.decode_fn()`` is resolved here, once per layer, so a decoding step pays no lookup; where it returns
    None for an x (or offers no path at all), :func:`linear` runs."""
    decode = prepared.decode_fn()
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


def fuse_rows(prepared: Sequence[PreparedWeight], label: str = "") -> tuple[PreparedWeight,
                                                                             list[PreparedWeight]] | None:
    """(one weight with the rows of every ``prepared`` stacked, a view of it per part) or None.

    Only where the first weight's ``fuse_rows`` accepts the others (same kernel and layout); any failure there
    leaves the layers unfused, with a warning naming ``label`` (the layers)."""
    if len(prepared) < 2:
        return None
    first = prepared[0]
    try:
        fused = first.fuse_rows(list(prepared))
    except Exception as exc:  # a kernel's bug must cost speed, not the model
        log.warning("kernel %r could not fuse %s: %s: %s", first.kernel.name if first.kernel else "?",
                    label or f"{len(prepared)} weights", type(exc).__name__, exc)
        return None
    if fused is None:
        return None
    whole, views = fused
    if len(views) != len(prepared) or whole.out_features != sum(p.out_features for p in prepared):
        log.warning("kernel fused %s into an inconsistent result; leaving them unfused",
                    label or f"{len(prepared)} weights")
        return None
    return whole, list(views)
