"""AQLM importer: Hugging Face folders of ``aqlm.QuantizedLinear`` modules (``quant_method: aqlm``; AqlmConfig's
in_group_size, out_group_size, num_codebooks, nbits_per_codebook, linear_weights_not_to_quantize).

Each module stores ``codes`` [out / og, in / ig, M] (int8/int16/int32, codes read modulo 2^nbits as aqlm's
``unpack_int_data`` does), ``codebooks`` [M, 2^nbits, og, ig] and ``scales`` [out / og, 1, 1, 1]. aqlm dequantizes
(``aqlm.utils._dequantize_weight``) by summing the M codebook entries of each group (``embedding_bag`` sum, codebook
order) and multiplying by the row's scale. The record is ``scale(vq(packed codes, codebooks [M, K, ig]), scales
[out, 1], [1, in])``: the codes keep their layout (``codes[r, j * M + m]`` is exactly the stored ``[r, j, m]``,
and for 8- and 16-bit codebooks the packed bytes are the stored bytes), the codebooks and scales are the stored
tensors reshaped. ``out_group_size > 1`` (vectors spanning rows) is not expressible in ``vq`` version 1 and is refused.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import ImportedModel, Importer, RecordBuilder, SourceError, hookimpl

from ._import_folder import CheckpointFolder
from ._import_hf import (
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

FIELDS = ("in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook")
CODE_DTYPES = ("int8", "int16", "int32", "uint8")
FLOATS = ("float16", "bfloat16", "float32")


class AQLMImporter(Importer):
    name = "aqlm"
    description = "AQLM checkpoints (additive codebooks, out_group_size 1), bit-exact"
    priority = 10

    def detect(self, source: Path) -> bool:
        return detects_quant_method(source, "aqlm")

    def open(self, source: Path) -> ImportedModel:
        folder, qconfig, config_file = open_quantized_folder(source)
        params = {}
        for key in FIELDS:
            value = qconfig.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SourceError(f"quantization_config {key} is {value!r}", file=config_file, field=key)
            params[key] = value
        ig, og, books, nbits = (params[k] for k in FIELDS)
        if og != 1:
            raise SourceError(f"out_group_size {og}: vectors spanning {og} rows are not expressible in vq version 1 "
                              "(the format's vectors run along rows)", file=config_file, field="out_group_size")
        if nbits > 16:
            raise SourceError(f"nbits_per_codebook {nbits} exceeds the 16-bit codes of packed", file=config_file,
                              field="nbits_per_codebook")
        shapes = expected_shapes(folder.plain_config())
        dtype = config_dtype(folder.config)
        planned = []
        for prefix, tensors in quantized_modules(folder, "codebooks", "AQLM", ("codes", "codebooks", "scales", "bias"),
                                                 ("codes", "codebooks", "scales")):
            codes = folder.read(tensors["codes"])
            if codes.ndim != 3 or codes.shape[2] != books or codes.dtype.name not in CODE_DTYPES:
                raise source_error(folder, tensors["codes"], f"codes {codes.dtype} {list(codes.shape)} are not "
                                   f"integer [out, in / {ig}, {books}]", "codes")
            rows, cols = codes.shape[0], codes.shape[1] * ig
            weight = f"{prefix}.weight"
            check_shape(folder, shapes, weight, (rows, cols), tensors["codes"])
            folder.expect(tensors["codebooks"], (books, 1 << nbits, og, ig), FLOATS)
            folder.expect(tensors["scales"], (rows, 1, 1, 1), FLOATS)
            info = {"method": "import", "format": "aqlm", "num_codebooks": books, "nbits_per_codebook": nbits,
                    "in_group_size": ig}
            sources = tuple(n for s, n in tensors.items() if s != "bias")
            planned.append(Planned(weight, sources, rows * cols,
                                   partial(_record, folder, weight, tensors, (rows, cols), nbits, dtype, info)))
        return imported_model(folder, planned, f"aqlm {books}x{nbits} in_group_size {ig}",
                              {"modules": len(planned), **params})


def _record(folder: CheckpointFolder, name: str, tensors: dict[str, str], shape: tuple[int, int], nbits: int,
            dtype: str, info: dict) -> Any:
    rows, cols = shape
    stored = folder.read(tensors["codes"])
    codes = np.mod(stored.astype(np.int64), 1 << nbits).reshape(rows, -1)  # aqlm unpack_int_data
    books = folder.read(tensors["codebooks"])
    b = RecordBuilder(name, shape, dtype)
    table = b.tensor("codebooks", np.asarray(books).reshape(books.shape[0], books.shape[1], books.shape[3]))
    inner = b.vq(b.packed("codes", codes, nbits), table, shape)
    factor = b.tensor("scale", np.asarray(folder.read(tensors["scales"])).reshape(rows, 1))
    return b.finish(b.scale(inner, factor, (1, cols)), info)


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(AQLMImporter())
