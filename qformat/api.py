"""The Python entry points, at the top layer: they accept Hub ids as well as local paths and hand the layers below
local paths only (the runtime and the conversion pipeline never import the Hub code).

    import qformat
    model = qformat.load("user/model-qformat")                     # a folder, a file or a Hub id
    qformat.convert("HuggingFaceTB/SmolLM2-135M", "out/smol", qformat.SpQRConfig(bits=3))
    qformat.convert("HuggingFaceTB/SmolLM2-135M", "out/smol", "spqr", params={"bits": 3})   # the same
    qformat.convert("HuggingFaceTB/SmolLM2-135M", "out/smol", qformat.GPTQConfig(bits=3), transforms=["awq"])

``qformat.GPTQConfig`` (any installed method's config class, by class name) and :func:`method_config` give configs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .methods import MethodConfig
from .transforms import TransformConfig

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


def convert(source: str | os.PathLike, out: str | os.PathLike, method: MethodConfig | str, *,
            params: Mapping[str, Any] | None = None, revision: str | None = None,
            transforms: Sequence[Any] = (), **options: Any) -> ConvertResult:
    """Convert ``source`` (a folder, a ``.gguf`` file or a Hub id) into a qformat folder ``out``.

    ``method`` is a method's config (``qformat.GPTQConfig(bits=4)``: the method is the one it configures) or a method's
    name, then with its parameters as ``params`` (defaults for the rest). ``transforms``: block transforms applied to
    each decoder block first, in order, each a transform config (``qformat.api.transform_config("awq")``), a name
    (``"awq"``), ``"NAME:key=value,..."`` or ``{"transform": name, "params": {...}}``; a parameter a name or dict
    leaves out takes the method's parameter of the same name (bits, group_size). ``options`` are the other fields of
    :class:`qformat.conversion.pipeline.ConvertOptions` (``calib``, ``include``, ``seed``, ``overwrite``, ...).
    """
    from .conversion.pipeline import ConvertOptions
    from .conversion.pipeline import convert as run
    from .hub import resolve_model_source

    if isinstance(method, MethodConfig):
        if params is not None:
            raise TypeError("qformat.convert: give the parameters in the config or as params= with a method name, "
                            "not both")
        name, given = method.method, method
    elif isinstance(method, str):
        name, given = method, dict(params or {})
    else:
        raise TypeError(f"qformat.convert: method is a MethodConfig or a method name, not {type(method).__name__}")
    if isinstance(transforms, (str, Mapping, MethodConfig)):
        transforms = [transforms]  # one transform given bare
    return run(ConvertOptions(os.fspath(source), out, name, given, revision=revision, transforms=tuple(transforms),
                              resolve_hub=resolve_model_source, **options))


def method_config(method: str, **params: Any) -> MethodConfig:
    """The config of the installed method ``method`` with ``params`` (values or command-line strings, checked; defaults
    for the rest): ``qformat.method_config("gptq", bits=3)`` is ``qformat.GPTQConfig(bits=3)``."""
    from .plugins import get_method

    return get_method(method).validate_params(params)


def transform_config(transform: str, **params: Any) -> TransformConfig:
    """The config of the installed block transform ``transform`` with ``params`` (checked; defaults for the rest):
    ``qformat.api.transform_config("awq", bits=3)``."""
    from .plugins import get_transform

    return get_transform(transform).validate_params(params)


def config_class(class_name: str) -> type[MethodConfig]:
    """The config class of an installed method or transform, by class name (``"GPTQConfig"``); AttributeError if
    none or several installed plugins have one by that name."""
    from .plugins import get_plugins

    plugins = get_plugins()
    methods: dict[str, Any] = {**plugins.methods, **{f"transform {n}": t for n, t in plugins.transforms.items()}}
    found = {m.config for m in methods.values() if m.config.__name__ == class_name}
    if len(found) == 1:
        return found.pop()
    if found:
        owners = sorted(n for n, m in methods.items() if m.config in found)
        raise AttributeError(f"module 'qformat': {class_name} is the config of several installed methods "
                             f"({', '.join(owners)}); use qformat.method_config(name, ...)")
    known = sorted({m.config.__name__ for m in methods.values()})
    raise AttributeError(f"module 'qformat' has no attribute {class_name!r} (the installed methods' configs: "
                         f"{', '.join(known) or 'none'})")
