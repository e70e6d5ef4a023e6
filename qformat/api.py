"""The Python entry points, at the top layer: they accept Hub ids as well as local paths and hand the layers below
local paths only (the runtime and the conversion pipeline never import the Hub code).

    import qformat
    model = qformat.load("user/model-qformat")                     # a folder, a file or a Hub id
    qformat.convert("HuggingFaceTB/SmolLM2-135M", "out/smol", qformat.SpQRConfig(bits=3))
    qformat.convert("HuggingFaceTB/SmolLM2-135M", "out/smol", "spqr", params={"bits": 3})   # the same
    qformat.convert("HuggingFaceTB/SmolLM2-135M", "out/smol", qformat.GPTQConfig(bits=3), transforms=["awq"])
    qformat.convert("org/Model-GGUF", "out/imported", "import", params={"gguf_file": "model.Q4_K_M.gguf"})

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

    from .conversion.importing import ImportResult
    from .conversion.pipeline import ConvertResult


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder or file as is; anything else is a Hub id, downloaded into the Hub cache."""
    from .hub import resolve_model_source

    return Path(resolve_model_source(source, revision))


def load(source: str | os.PathLike, device: Any = "cpu", *, revision: str | None = None,
         **options: Any) -> PreTrainedModel:
    """:func:`qformat.runtime.loader.load` for a local folder or a Hub id (``revision``: a branch, tag or commit).

    ``options`` are that function's: ``kernel``, ``dtype``, ``fuse``, ``verify``, the partial-load options, and for
    fine-tuning ``trainable=True`` (packed codes frozen; sidecars, float parts and peft LoRA adapters train) and
    ``sidecars=`` (a file of tuned sidecars from :func:`qformat.runtime.trainable.save_sidecars`)."""
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


def convert(source: str | os.PathLike, out: str | os.PathLike, method: MethodConfig | str | None = None, *,
            params: Mapping[str, Any] | None = None, revision: str | None = None,
            transforms: Sequence[Any] = (), **options: Any) -> ConvertResult | ImportResult:
    """Convert ``source`` (a folder, a ``.gguf`` file or a Hub id) into a qformat folder ``out``.

    ``method`` is a method's config (``qformat.GPTQConfig(bits=4)``: the method is the one it configures) or a method's
    name, then with its parameters as ``params`` (defaults for the rest). ``transforms``: block transforms applied to
    each decoder block first, in order, each a transform config (``qformat.api.transform_config("awq")``), a name
    (``"awq"``), ``"NAME:key=value,..."`` or ``{"transform": name, "params": {...}}``; a parameter a name or dict
    leaves out takes the method's parameter of the same name (bits, group_size). ``options`` are the other fields of
    :class:`qformat.conversion.pipeline.ConvertOptions` (``calib``, ``include``, ``seed``, ``overwrite``, ...).

    With ``target_bits=`` or ``target_size=`` (a size budget, :mod:`qformat.conversion.budget`) ``method`` may be
    None: each layer gets one of ``candidates`` (specs ``"METHOD:key=value,..."``; default a built-in grid, narrowed
    to ``method`` when it is given). ``sidecar_rank=`` adds a low-rank sidecar of the error to every decoder linear.

    ``method="import"`` imports a checkpoint another tool quantized instead (:func:`import_checkpoint`; ``params``:
    ``format``, ``gguf_file``), as ``qformat convert --method import`` does.
    """
    from .conversion.pipeline import ConvertOptions
    from .conversion.pipeline import convert as run
    from .hub import resolve_model_source

    if method == IMPORT:
        unknown = sorted(set(params or {}) - {"format", "gguf_file"})
        if unknown or transforms:
            wrong = f"parameter {unknown[0]!r}" if unknown else "transforms"
            raise TypeError(f"qformat.convert(..., 'import'): {wrong} does not apply to an import, which keeps the "
                            "source's own quantization (params: format, gguf_file)")
        return import_checkpoint(source, out, revision=revision, **dict(params or {}), **options)
    if method is None:
        if options.get("target_bits") is None and options.get("target_size") is None:
            raise TypeError("qformat.convert: give a method (a name or a config), or a size budget (target_bits= or "
                            "target_size=) to choose one per layer")
        name, given = "", dict(params or {})
    elif isinstance(method, MethodConfig):
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


IMPORT = "import"


def import_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, format: str | None = None,
                      gguf_file: str | None = None, revision: str | None = None, base_model: str | None = None,
                      overwrite: bool = False, quiet: bool = True, check: bool = True) -> ImportResult:
    """Import a checkpoint another tool quantized (a file, a folder or a Hub id) bit-exactly into the qformat folder
    ``out`` (:func:`qformat.conversion.importing.import_checkpoint`). ``format``: the importer (default: the one that
    detects the source). ``gguf_file``: the file of a GGUF repo (``org/Model-GGUF``) or folder to import, the only
    file downloaded; it may be left out when the repo holds one ``.gguf``."""
    from .conversion.importing import import_checkpoint as run
    from .hub import resolve_import_source

    if format is not None:
        from .plugins import get_importer

        get_importer(format)  # an unknown name fails before any download

    def resolve(text: str) -> Path:
        return resolve_import_source(text, revision, gguf_file=gguf_file, gguf=format == "gguf")

    return run(os.fspath(source), out, format=format, base_model=base_model, overwrite=overwrite, quiet=quiet,
               check=check, resolve=resolve, gguf_file=gguf_file)


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
