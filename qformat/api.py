"""The Python entry points, at the top layer: they accept Hub ids as well as local paths and hand the layers below
local paths only (the runtime and the conversion pipeline never import the Hub code).

    import qformat
    model = qformat.load("user/model-qformat")                     # a folder, a file or a Hub id
    qformat.conversion("HuggingFaceTB/SmolLM2-135M", "out/smol", "spqr", bits=3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .conversion.pipeline import ConvertResult


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder or file as is; anything else is a Hub id, downloaded into the Hub cache."""
    from .hub import resolve_model_source

    return Path(resolve_model_source(source, revision))


def load(source: str | os.PathLike, device: Any = "cpu", *, revision: str | None = None,
         **options: Any) -> PreTrainedModel:
    """:func:`qformat.runtime.loader.load` for a local folder or a Hub id (``revision``: a branch, tag or commit)."""
    from .runtime.loader import load as load_local

    return load_local(resolve_source(source, revision), device, **options)


def load_dequantized(source: str | os.PathLike, device: Any = "cpu", *, revision: str | None = None,
                     **options: Any) -> PreTrainedModel:
    """:func:`qformat.runtime.loader.load_dequantized` for a local folder or a Hub id."""
    from .runtime.loader import load_dequantized as load_local

    return load_local(resolve_source(source, revision), device, **options)


def load_any(source: str | os.PathLike, device: Any = "cpu", *, revision: str | None = None,
             **options: Any) -> tuple[PreTrainedModel, Any]:
    """:func:`qformat.runtime.loader.load_any` (qformat folder, plain transformers folder, ``.gguf``) for a local path
    or a Hub id."""
    from .runtime.loader import load_any as load_local

    text = os.fspath(source)
    path = Path(text) if text.endswith(".gguf") else resolve_source(source, revision)
    return load_local(path, device, **options)


def convert(source: str | os.PathLike, out: str | os.PathLike, method: str, *, revision: str | None = None,
            **options: Any) -> ConvertResult:
    """Convert ``source`` (a folder, a ``.gguf`` file or a Hub id) into a qformat folder ``out`` with ``method``.

    ``options`` are the fields of :class:`qformat.conversion.ConvertOptions` (``params``, ``calib``, ``include``, ...).
    """
    from .conversion.pipeline import ConvertOptions
    from .conversion.pipeline import convert as run
    from .hub import resolve_model_source

    return run(ConvertOptions(os.fspath(source), out, method, revision=revision, resolve_hub=resolve_model_source,
                              **options))
