"""HQQ importer: Hugging Face folders of ``HQQLinear`` modules (``quant_method: hqq``; transformers' HqqConfig or
HQQ's own ``save_to_safetensors``), each module ``W_q`` plus its encoded metadata (``_import_hqq_meta``).

HQQ dequantizes ``((M - zero) * scale).reshape(shape)`` with ``M`` the unpacked group matrix and one scale and zero
per group, in its compute dtype. The record is ``affine(packed codes, scale, zero, bits)`` with the stored scale and
zero tensors unchanged and the codes re-laid row by row into ``packed`` order, so the decode is, bit for bit, HQQ's
``dequantize()`` run with compute_dtype float32. (In half precision HQQ rounds ``M - zero`` to the compute dtype
before multiplying, a rounding the format's fp32 ``affine`` does not make: a record cast to BF16/F16 can differ from
HQQ's half-precision result by one unit in the last place where that first rounding mattered.)

Groups: axis 1 groups of ``g`` consecutive weights become ``group_shape [1, g]`` (``g`` dividing the row) or
``[g / in, in]`` (whole rows; groups that end mid-row are refused); axis 0 with ``group_size == out`` is one group
per input column ``[out, 1]``; without ``channel_wise`` one scale and zero for the tensor. HQQ's other axis-0 groups
take every ``(out * in / g)``-th weight (rows strided ``out / g`` apart): no parameter grid expresses that, and such
modules are refused by name.
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
    expected_shapes,
    group_modules,
    imported_model,
    quant_method_of,
    source_error,
)
from ._import_hqq_meta import HQQMeta, packed_words, read_meta, unpack


def parameter_grid(meta: HQQMeta) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(parameter grid, group_shape) of HQQ's per-group scale and zero over [out, in], or None if not a grid."""
    rows, cols = meta.shape
    mr, mc = meta.group_matrix
    if not meta.channel_wise:
        return (1, 1), (rows, cols)
    if meta.axis == 1:
        if cols % mc == 0:
            return (rows, cols // mc), (1, mc)
        if mc % cols == 0:
            return (mr, 1), (mc // cols, cols)
        return None
    return ((1, cols), (rows, 1)) if mr == rows else None


class HQQImporter(Importer):
    name = "hqq"
    description = "HQQ checkpoints (HQQLinear W_q + metadata; 1-8 bit, axis 1 groups, axis 0 per column), bit-exact"
    priority = 10

    def detect(self, source: Path) -> bool:
        found = quant_method_of(source)
        return found is not None and found[0] == "hqq"

    def open(self, source: Path) -> ImportedModel:
        folder = CheckpointFolder(Path(source))
        shapes = expected_shapes(folder.plain_config())
        names = folder.names()
        prefixes = {n[: -len(".W_q")] for n in names if n.endswith(".W_q")}
        if not prefixes:
            raise SourceError("no HQQ modules (W_q tensors) in the checkpoint", file=str(folder.path))
        planned, kinds = [], set()
        for prefix, tensors in sorted(group_modules(names, prefixes).items()):
            meta = read_meta(folder, prefix, tensors)
            weight = f"{prefix}.weight"
            check_shape(folder, shapes, weight, meta.shape, tensors["shape"])
            grid = parameter_grid(meta)
            if grid is None:
                how = "end mid-row" if meta.axis == 1 else "take rows strided across the column"
                raise source_error(folder, tensors["W_q"], f"HQQ axis {meta.axis} groups of {meta.group_size} "
                                   f"weights in {list(meta.shape)} {how}: they are not tiles of the weight, and the "
                                   "format's parameter grids cannot express them", "group_size")
            packed_words(folder, tensors["W_q"], meta)
            for key in ("scale", "zero"):
                _check_parameter(folder, tensors, key, meta)
            kinds.add((meta.nbits, meta.group_size, meta.axis))
            info = {"method": "import", "format": "hqq", "nbits": meta.nbits, "group_size": meta.group_size,
                    "axis": meta.axis, "packing": meta.packing}
            sources = tuple(n for s, n in tensors.items() if s != "bias")
            planned.append(Planned(weight, sources, meta.shape[0] * meta.shape[1],
                                   partial(_record, folder, weight, tensors, meta, grid, info)))
        described = ", ".join(f"{b}-bit g{g} axis {a}" for b, g, a in sorted(kinds, key=str))
        return imported_model(folder, planned, f"hqq {described}",
                              {"modules": len(planned), "layouts": sorted(map(list, kinds), key=str)})


def _check_parameter(folder: CheckpointFolder, tensors: dict[str, str], key: str, meta: HQQMeta) -> None:
    if key not in tensors:
        raise SourceError(f"HQQ module lacks {key!r}", file=str(folder.path), tensor=key, field=key)
    value = folder.read(tensors[key])
    mr, mc = meta.group_matrix
    want = [(1, 1), (1,), ()] if not meta.channel_wise else [(mr, 1)] if meta.axis == 1 else [(1, mc)]
    if value.shape not in want or value.dtype.name not in ("float16", "bfloat16", "float32"):
        raise source_error(folder, tensors[key], f"{key} is {value.dtype} {list(value.shape)} where the group "
                           f"matrix {[mr, mc]} on axis {meta.axis} needs a float {list(want[0])}", key)


def _record(folder: CheckpointFolder, name: str, tensors: dict[str, str], meta: HQQMeta,
            grid: tuple[tuple[int, int], tuple[int, int]], info: dict) -> Any:
    (prows, pcols), group = grid
    codes = unpack(folder, tensors["W_q"], meta).reshape(meta.shape)  # the dequantize's final reshape, C order
    b = RecordBuilder(name, meta.shape, meta.dtype)
    scale = b.tensor("scale", np.asarray(folder.read(tensors["scale"])).reshape(prows, pcols))
    zero = b.tensor("zero", np.asarray(folder.read(tensors["zero"])).reshape(prows, pcols))
    node = b.affine(b.packed("codes", codes, meta.bits), scale=scale, zero=zero, bits=meta.bits, group_shape=group)
    return b.finish(node, info)


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(HQQImporter())
