"""The conversion pipeline: load a model, calibrate, quantize block by block, write the format.

    from qformat.conversion import ConvertOptions, convert
    result = convert(ConvertOptions("path/or/hub-id/or/model.gguf", "out-folder", "spqr", params={"bits": 3}))

Modules: ``source`` (folder / Hub / GGUF input, meta-device skeleton), ``calibration`` (seeded token windows),
``activations`` (block inputs, per-linear statistics), ``selection`` (--include/--exclude), ``pipeline`` (the
sequential, resumable conversion), ``report`` (progress, summary, memory), ``quality`` (--eval), ``tiny`` (a tiny
random Llama for tests).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"ConvertOptions": "pipeline", "ConvertResult": "pipeline", "Converter": "pipeline", "convert": "pipeline"}


def __getattr__(name: str) -> Any:  # torch and transformers load only when the pipeline is used
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
