"""Everything a plugin author imports, from one place (numpy-only at import: no torch).

    from dataclasses import dataclass
    from qformat.plugin import LayerInput, Method, MethodConfig, RecordBuilder, hookimpl, param

    @dataclass(frozen=True)
    class MineConfig(MethodConfig):
        method = "mine"
        bits: int = param(4, "code width", min=2, max=8)

    class MyMethod(Method):
        config = MineConfig

        def quantize(self, layer: LayerInput, config: MineConfig):
            b = RecordBuilder(layer.name, tuple(layer.weight.shape), layer.dtype)
            ...  # config.bits
            return b.finish(node, info={"method": self.name, "params": config.to_params()})

    @hookimpl
    def qformat_register_methods(register):
        register(MyMethod())          # an instance, for methods, codecs and kernels alike

The contracts are documented in docs/plugins.md; :mod:`qformat.testing` checks a plugin against them.
"""

from __future__ import annotations

from .errors import FormatError, ParameterError, PluginError, SourceError
from .exporters import (
    ExportedTensor,
    Exporter,
    ExportReport,
    ExportWarning,
    Inexpressible,
    InexpressibleError,
    RequantizedWarning,
    opened,
    relative_error,
    same_bits,
    staged_output,
)
from .format import CORE_CODECS, Codec, CodecRegistry, Context, NodeInfo, QuantizedTensor, RecordBuilder, TensorInfo
from .format.builder import Node
from .hookspecs import hookimpl
from .importers import ImportedModel, Importer
from .kernel_api import Kernel, PreparedWeight
from .methods import BlockTuning, LayerInput, Method, MethodConfig, Param, output_error, param
from .transforms import (
    BlockInput,
    BlockResult,
    ColumnScale,
    InputTransform,
    ScalePair,
    SkipBlock,
    Transform,
    TransformConfig,
    fold_into_norm,
    fold_into_rows,
    scale_columns,
)

__all__ = [
    # hooks
    "hookimpl",
    # methods
    "BlockTuning", "LayerInput", "Method", "MethodConfig", "Param", "output_error", "param",
    # block transforms
    "BlockInput", "BlockResult", "ColumnScale", "InputTransform", "ScalePair", "SkipBlock", "Transform",
    "TransformConfig", "fold_into_norm", "fold_into_rows", "scale_columns",
    # records and codecs
    "CORE_CODECS", "Codec", "CodecRegistry", "Context", "Node", "NodeInfo", "QuantizedTensor", "RecordBuilder",
    "TensorInfo",
    # kernels
    "Kernel", "PreparedWeight",
    # importers of other tools' checkpoints
    "ImportedModel", "Importer",
    # exporters to other formats
    "ExportReport", "ExportWarning", "ExportedTensor", "Exporter", "Inexpressible", "InexpressibleError", "RequantizedWarning", "opened",
    "relative_error", "same_bits", "staged_output",
    # errors
    "FormatError", "ParameterError", "PluginError", "SourceError",
]
