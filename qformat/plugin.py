"""Everything a plugin author imports, from one place (numpy-only at import: no torch).

    from qformat.plugin import Codec, LayerInput, Method, Param, RecordBuilder, hookimpl

    class MyMethod(Method):
        name = "mine"
        params = (Param("bits", int, 4, "code width", min=2, max=8),)

        def quantize(self, layer: LayerInput, params):
            b = RecordBuilder(layer.name, tuple(layer.weight.shape), layer.dtype)
            ...
            return b.finish(node)

    @hookimpl
    def qformat_register_methods(register):
        register(MyMethod())          # an instance, for methods, codecs and kernels alike

The contracts are documented in docs/plugins.md; :mod:`qformat.testing` checks a plugin against them.
"""

from __future__ import annotations

from .errors import FormatError, ParameterError, PluginError
from .format import CORE_CODECS, Codec, CodecRegistry, Context, NodeInfo, QuantizedTensor, RecordBuilder, TensorInfo
from .format.builder import Node
from .hookspecs import hookimpl
from .kernel_api import Kernel, PreparedWeight

# >>> method configs: MethodConfig (the typed config base) and param (its field helper) come from qformat.methods,
# >>> owned by the method-config change; exported here so plugin authors import them from qformat.plugin too.
from .methods import LayerInput, Method, MethodConfig, Param, param

__all__ = [
    # hooks
    "hookimpl",
    # methods
    "LayerInput", "Method", "MethodConfig", "Param", "param",
    # records and codecs
    "CORE_CODECS", "Codec", "CodecRegistry", "Context", "Node", "NodeInfo", "QuantizedTensor", "RecordBuilder",
    "TensorInfo",
    # kernels
    "Kernel", "PreparedWeight",
    # errors
    "FormatError", "ParameterError", "PluginError",
]
