"""The hooks a qformat plugin implements. A plugin is a module named by an entry point in the group ``qformat``.

Each hook receives a ``register`` callback, so one plugin can register any number of objects. Register
**instances**, for methods, codecs and kernels alike (a class is refused and the plugin reported broken):

    from qformat.plugin import hookimpl

    @hookimpl
    def qformat_register_methods(register):
        register(MyMethod())

Contracts (also in docs/plugins.md):
- ``qformat_register_methods(register)``: ``register(method)`` with a :class:`qformat.methods.Method` instance; its
  ``name`` must be unique across installed plugins. ``get_method(name)`` returns that one instance for every
  conversion, so a method keeps no state between layers.
- ``qformat_register_codecs(register)``: ``register(codec)`` with a :class:`qformat.format.Codec` instance that adds a
  component kind (with its own spec section, reference decoder and conformance vectors).
- ``qformat_register_transforms(register)``: ``register(transform)`` with a :class:`qformat.transforms.Transform`
  instance that rewrites a decoder block function-preservingly before its linears are quantized
  (``qformat convert --transform NAME``); ``get_transform(name)`` returns that one instance.
- ``qformat_register_importers(register)``: ``register(importer)`` with a :class:`qformat.importers.Importer`
  instance that reads checkpoints another tool quantized, bit-exactly (``qformat convert --method import``).
- ``qformat_register_exporters(register)``: ``register(exporter)`` with a :class:`qformat.exporters.Exporter`
  instance that writes a qformat folder in another tool's format, exactly (``qformat export --to NAME``).
- ``qformat_register_kernels(register)``: ``register(kernel)`` with a :class:`qformat.kernel_api.Kernel` instance that
  computes ``x @ W.T`` for the codec signatures it declares.

qformat calls each hook through pluggy once per plugin, so one plugin's failure is reported against it (package and
version) and the others still load; ``QFORMAT_TRACE_PLUGINS=1`` prints every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "qformat"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qformat_register_methods(register: Callable[[Any], None]) -> None:
    """Register quantization methods (qformat.methods.Method instances)."""


@hookspec
def qformat_register_codecs(register: Callable[[Any], None]) -> None:
    """Register codecs (qformat.format.Codec instances)."""


@hookspec
def qformat_register_kernels(register: Callable[[Any], None]) -> None:
    """Register kernels (qformat.kernel_api.Kernel instances)."""


@hookspec
def qformat_register_transforms(register: Callable[[Any], None]) -> None:
    """Register block transforms (qformat.transforms.Transform instances)."""


@hookspec
def qformat_register_importers(register: Callable[[Any], None]) -> None:
    """Register checkpoint importers (qformat.importers.Importer instances)."""


@hookspec
def qformat_register_exporters(register: Callable[[Any], None]) -> None:
    """Register exporters to other formats (qformat.exporters.Exporter instances)."""
