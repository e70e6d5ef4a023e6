"""The hooks a qformat plugin implements. A plugin is a module named by an entry point in the group ``qformat``.

Each hook receives a ``register`` callback, so one plugin can register any number of objects:

    from qformat.hookspecs import hookimpl

    @hookimpl
    def qformat_register_methods(register):
        register(MyMethod)

Contracts (also in docs/plugins.md):
- ``qformat_register_methods(register)``: ``register(cls)`` with a :class:`qformat.methods.Method` subclass; its
  ``name`` must be unique across installed plugins.
- ``qformat_register_codecs(register)``: ``register(codec)`` with a :class:`qformat.format.Codec` instance that adds a
  component kind (with its own spec section, reference decoder and conformance vectors).
- ``qformat_register_kernels(register)``: ``register(kernel)`` with a :class:`qformat.kernel_api.Kernel` instance that
  computes ``x @ W.T`` for the codec signatures it declares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "qformat"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qformat_register_methods(register: Callable[[type], None]) -> None:
    """Register quantization methods (Method subclasses)."""


@hookspec
def qformat_register_codecs(register: Callable[[Any], None]) -> None:
    """Register codecs (qformat.format.Codec instances)."""


@hookspec
def qformat_register_kernels(register: Callable[[Any], None]) -> None:
    """Register kernels (qformat.kernel_api.Kernel instances)."""
