"""qformat: a specified, packed, quantized tensor format for Hugging Face models.

``qformat.load(folder_or_hub_id)`` returns a transformers model running on qformat kernels;
``qformat.convert(source, out, qformat.GPTQConfig(bits=4))`` makes one. ``qformat.<Name>Config`` is the config class of
an installed method, found by class name on first use (``qformat.method_config(name, **params)`` by method name).
Importing qformat also registers ``quant_method: "qformat"`` with transformers, so
``AutoModelForCausalLM.from_pretrained(folder)`` works.
This module stays light: ``import qformat.format`` (numpy only) must not pull in torch or transformers, so the
registration waits until transformers' quantizer registry is imported, and ``load`` is imported on first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

from .version import __version__ as __version__

_REGISTRY_MODULE = "transformers.quantizers.auto"  # where transformers keeps quant_method -> quantizer
_LAZY = {"load": "api", "load_dequantized": "api", "load_any": "api", "convert": "api", "method_config": "api",
         "transform_config": "api", "import_checkpoint": "api",
         "MethodConfig": "methods", "QLinear": "runtime.nn"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    if name.endswith("Config") and name[:1].isupper():  # a method's config, e.g. qformat.GPTQConfig: loads the plugins
        from .api import config_class

        return config_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_transformers() -> None:
    integration = sys.modules.get(f"{__name__}.runtime.hf_integration")
    if integration is not None and not hasattr(integration, "register"):
        return  # that module is being imported (it imports transformers): it registers itself once it has executed
    try:
        from .runtime.hf_integration import register

        register()
    except Exception as exc:  # never break transformers' own import because of us
        warnings.warn(f"qformat could not register with transformers: {type(exc).__name__}: {exc}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds transformers' registry module through the other finders and registers qformat once it has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._inner = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        module.__spec__.loader = self._inner
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_with_transformers()


if _REGISTRY_MODULE in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
