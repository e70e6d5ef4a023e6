"""BitNet b1.58 importer: Hugging Face folders with ``quant_method: bitnet`` in the offline (packed) mode.

Each ternary module stores ``weight`` uint8 [out / 4, in]: transformers' ``integrations/bitnet.py``
``pack_weights`` puts row ``i * (out / 4) + p`` of the ternary matrix, plus 1, into bits ``2i .. 2i + 1`` of stored row
``p`` (``unpack_weights`` reverses it); and ``weight_scale`` (one value). How the scale applies depends on the
layer class the config names:

- ``linear_class: bitlinear`` (``BitLinear``, the default): ``y = (x_q @ t.T) / (input_scale * weight_scale)``, so
  the weight is ``t / s``. For ``t`` in {-1, 0, +1}, ``t / s`` in fp32 equals ``t * fl32(1 / s)`` bit for bit, so the
  record is ``scale(ternary(t), 1 / s as F32 [1, 1], [out, in])``, the spec's BitNet mapping (the stored ``s`` is kept
  in the record's info).
- ``linear_class: autobitlinear`` with ``quantization_mode: offline``: ``y = F.linear(x, t) * weight_scale``, so the
  weight is ``t * s``: ``scale(ternary(t), s [1, 1])`` with the stored scale unchanged.

The ternary values are re-packed five per byte (``ternary`` codec), never changed. The online mode (full-precision
weights quantized at run time) holds no quantized weights and is refused.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import ImportedModel, Importer, RecordBuilder, SourceError, hookimpl

from ._import_folder import CheckpointFolder
from ._import_hf import (
    RECORD_DTYPES,
    Planned,
    check_shape,
    config_dtype,
    detects_quant_method,
    expected_shapes,
    imported_model,
    open_quantized_folder,
    quantized_modules,
    source_error,
)

VALUES_PER_ITEM = 4
CLASSES = ("bitlinear", "autobitlinear")


class BitNetImporter(Importer):
    name = "bitnet"
    description = "BitNet b1.58 checkpoints (transformers' packed ternary weights + weight_scale), bit-exact"
    priority = 10

    def detect(self, source: Path) -> bool:
        return detects_quant_method(source, "bitnet")

    def open(self, source: Path) -> ImportedModel:
        folder, qconfig, config_file = open_quantized_folder(source)
        linear_class = qconfig.get("linear_class", "bitlinear")
        if linear_class not in CLASSES:
            raise SourceError(f"linear_class {linear_class!r} is none of {CLASSES}", file=config_file,
                              field="linear_class")
        mode = qconfig.get("quantization_mode", "offline")
        if mode != "offline":
            raise SourceError(f"quantization_mode {mode!r}: only offline (packed ternary) checkpoints hold "
                              "quantized weights", file=config_file, field="quantization_mode")
        divide = linear_class == "bitlinear"
        shapes = expected_shapes(folder.plain_config())
        default = config_dtype(folder.config, "BF16")
        planned = []
        for prefix, tensors in quantized_modules(folder, "weight_scale", "BitNet", ("weight", "weight_scale", "bias"),
                                            ("weight", "weight_scale")):
            packed = folder.read(tensors["weight"])
            if packed.dtype != np.uint8 or packed.ndim != 2:
                raise source_error(folder, tensors["weight"], f"a packed ternary weight is uint8 [out / 4, in], not "
                                   f"{packed.dtype} {list(packed.shape)}", "dtype")
            shape = (packed.shape[0] * VALUES_PER_ITEM, packed.shape[1])
            weight = f"{prefix}.weight"
            check_shape(folder, shapes, weight, shape, tensors["weight"])
            scale = folder.read(tensors["weight_scale"])
            if scale.size != 1 or scale.dtype.name not in RECORD_DTYPES:
                raise source_error(folder, tensors["weight_scale"], f"weight_scale is {scale.dtype} "
                                   f"{list(scale.shape)}, not one float", "weight_scale")
            value = float(np.asarray(scale, dtype=np.float32).reshape(-1)[0])
            factor = np.float32(1.0) / np.float32(value) if divide and value != 0 else np.float32(value)
            if value == 0 or not math.isfinite(value) or not math.isfinite(float(factor)):
                raise source_error(folder, tensors["weight_scale"], f"weight_scale {value!r} gives no finite "
                                   "weight", "weight_scale")
            dtype = RECORD_DTYPES.get(scale.dtype.name, default)
            info = {"method": "import", "format": "bitnet", "linear_class": linear_class, "weight_scale": value,
                    "applied": "divide" if divide else "multiply"}
            sources = (tensors["weight"], tensors["weight_scale"])
            planned.append(Planned(weight, sources, shape[0] * shape[1],
                                   partial(_record, folder, weight, tensors, shape, dtype, divide, info)))
        return imported_model(folder, planned, f"bitnet b1.58 packed ternary ({linear_class})",
                              {"modules": len(planned), "linear_class": linear_class})


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """transformers' ``unpack_weights`` without the -1 and the float cast: {0, 1, 2, 3} [4 * rows, cols]."""
    return np.concatenate([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_ITEM)], axis=0)


def _record(folder: CheckpointFolder, name: str, tensors: dict[str, str], shape: tuple[int, int], dtype: str,
            divide: bool, info: dict) -> Any:
    digits = unpack_ternary(np.asarray(folder.read(tensors["weight"])))
    if int(digits.max(initial=0)) > 2:
        raise source_error(folder, tensors["weight"], "a 2-bit field holds 3, which is no ternary value", "weight")
    scale = np.asarray(folder.read(tensors["weight_scale"])).reshape(1, 1)
    b = RecordBuilder(name, shape, dtype)
    if divide:
        factor = b.tensor("scale", np.float32(1.0) / scale.astype(np.float32))
    else:
        factor = b.tensor("scale", scale)
    node = b.scale(b.ternary("trits", digits.astype(np.int8) - 1), factor, shape)
    return b.finish(node, info)


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(BitNetImporter())
