"""Importer of compressed-tensors checkpoints (``quant_method: compressed-tensors``: llm-compressor's output, vLLM's
native format): ``pack-quantized`` int1–8 (both int32 packings), ``int-quantized``/``naive-quantized`` int8,
``float-quantized``/``naive-quantized`` FP8 E4M3, ``mxfp8-quantized``, ``nvfp4-pack-quantized`` and
``mxfp4-pack-quantized``; strategies tensor, channel, group, tensor_group, block; ``mixed-precision`` checkpoints
module by module. The trees and why each is exact: :mod:`qformat_plugins._import_ct_records`; configs, formats and
the packing versions: :mod:`qformat_plugins._import_ct_config`.

A module is quantized when it stores ``weight_scale``; its ``weight_*`` tensors become one record ``<module>.weight``.
Activation and KV-cache quantization parameters (``input_scale``, ``input_global_scale``, ``k_scale``, ...) are not
weights: they are left out and counted in the import's details (the imported model computes activations in full
precision). Every other tensor passes through as stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformat.plugin import ImportedModel, Importer, SourceError, hookimpl

from ._import_ct_config import ct_quantization_config, module_format, parse, scheme_for
from ._import_ct_records import Module, fp4_record, fp8_record, int_record
from ._import_model import card_base_model, linear_shape, record_dtype
from ._import_modules import plan_tensors, quantized_modules, stored_bits
from ._import_safetensors import ImportFolder

WEIGHT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape",
                "weight_g_idx")
ACTIVATION_PARTS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                    "output_global_scale", "k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point")
STORES_WEIGHT = ("float-quantized", "naive-quantized", "int-quantized", "mxfp8-quantized")


class CompressedTensorsImporter(Importer):
    name = "compressed-tensors"
    description = ("compressed-tensors checkpoints (llm-compressor): pack-quantized int, FP8, MXFP8, NVFP4, MXFP4, "
                   "mixed-precision")
    priority = 10

    def detect(self, source: Path) -> bool:
        if not Path(source).is_dir():
            return False
        try:
            config = json.loads((Path(source) / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and ct_quantization_config(config) is not None

    def open(self, source: Path) -> ImportedModel:
        folder = ImportFolder(source)
        where = str(folder.path / "config.json")
        qc = ct_quantization_config(folder.config)
        if qc is None:
            raise SourceError("config.json has no compressed-tensors quantization_config", file=where,
                              field="quantization_config")
        config = parse(qc, where)
        modules: dict[str, Module] = {}
        parts: dict[str, list[str]] = {}
        weights = 0
        for name in quantized_modules(folder, "weight_scale"):
            stored = {p: folder.read(f"{name}.{p}") for p in WEIGHT_PARTS if folder.has(f"{name}.{p}")}
            if folder.has(f"{name}.weight"):
                stored["weight"] = folder.read(f"{name}.weight")
            scheme = scheme_for(config, name, where)
            fmt = module_format(config, scheme, stored)
            if fmt == "dense":
                raise SourceError(f"module {name} stores weight_scale but its format is 'dense'", file=where,
                                  tensor=f"{name}.weight_scale", field="format")
            if fmt not in STORES_WEIGHT:
                stored.pop("weight", None)  # plan_tensors refuses a plain weight beside the packed one
            file = str(folder.path / folder.shard_of(f"{name}.weight_scale"))
            module = Module(name, stored, file, scheme, fmt)
            out, cols = module.shape()
            expected = linear_shape(folder.config, name)
            if expected is not None and tuple(expected) != (out, cols):
                raise SourceError(f"the stored tensors make {name} a {[out, cols]} weight where config.json implies "
                                  f"{list(expected)}", file=file, tensor=f"{name}.{next(iter(stored))}",
                                  field="shape")
            modules[name] = module
            parts[name] = [f"{name}.{p}" for p in stored]
            weights += out * cols
        dropped = [n for n in folder.names() if n.rsplit(".", 1)[-1] in ACTIVATION_PARTS]
        dtype = record_dtype(folder.config, "BF16")

        def build(name: str):
            module = modules[name]
            out, cols = module.shape()
            if module.fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
                return fp4_record(module, out, cols, dtype)
            if module.scheme.kind == "float":
                return fp8_record(module, out, cols, dtype)
            return int_record(module, config, out, cols, dtype)

        described = sorted({m.scheme.describe(m.fmt) for m in modules.values()})
        version = config.version_text or "unknown version"
        summary = f"compressed-tensors {version} " + ("; ".join(described) if described else "dense")
        details: dict[str, Any] = {"modules": len(modules), "version": config.version_text,
                                   "formats": sorted({m.fmt for m in modules.values()}), "schemes": described}
        if dropped:
            details["activation_parameters_dropped"] = len(dropped)
        plain_config = {k: v for k, v in folder.plain_config().items() if k != "compression_config"}
        return ImportedModel(config=plain_config, tensors=plan_tensors(folder, parts, build, drop=set(dropped)), source_format=summary,
                             files=folder.files(), base_model=card_base_model(folder.path), details=details,
                             source_bits=stored_bits(folder, parts, weights))


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(CompressedTensorsImporter())
