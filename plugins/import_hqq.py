"""HQQ importer: Hugging Face folders of ``HQQLinear`` modules (``quant_method: hqq``; transformers' HqqConfig or
HQQ's own ``save_to_safetensors``), each module ``W_q`` plus its encoded metadata (``_import_hqq_meta``).

HQQ dequantizes ``((M - zero) * scale).reshape(shape)`` with ``M`` the unpacked group matrix and one scale and zero
per group, in its compute dtype. The record is ``affine(packed codes, scale, zero, bits)`` with the stored scale and
zero tensors unchanged and the codes re-laid row by row into ``packed`` order, so the decode is, bit for bit, HQQ's
``dequantize()`` run with compute_dtype float32. (In half precision HQQ rounds ``M - zero`` to the compute dtype
before multiplying, a rounding the format's fp32 ``affine`` does not make: a record cast to BF16/F16 can differ from
HQQ's half-precision result by one unit in the last place where that first rounding mattered.)

Groups: axis 1 groups of ``g`` consecutive weights become ``group_shape [1, g]`` (``g`` dividing the row) or
``[g / in, in]`` (whole rows); axis 0 with ``group_size == out`` is one group per input column ``[out, 1]``; without
``channel_wise`` one scale and zero for the tensor. Every other layout (HQQ accepts any ``group_size`` dividing
``out * in``) is not a grid of tiles of [out, in]: axis-0 groups take every ``(out * in / g)``-th weight, axis-1
groups may end mid-row. Those are tiles of HQQ's own group matrix ``M`` ([g, out * in / g] on axis 0, one scale and
zero per column: ``group_shape [g, 1]``; [out * in / g, g] on axis 1, ``[1, g]``), so the record is the same
``affine`` over ``M``'s shape inside a ``reshape`` to [out, in], which is HQQ's final ``.reshape(shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Layout:
    """Where the record's affine runs: ``shape`` (the weight's [out, in], or HQQ's group matrix M inside a
    ``reshape`` when ``reshaped``), its scale/zero ``grid`` and ``group`` shape over that shape."""

    shape: tuple[int, int]
    grid: tuple[int, int]
    group: tuple[int, int]
    reshaped: bool


def layout(meta: HQQMeta) -> Layout:
    """A parameter grid over [out, in] where HQQ's groups are its tiles, else the grid over the group matrix M."""
    found = parameter_grid(meta)
    if found is not None:
        return Layout(meta.shape, *found, reshaped=False)
    mr, mc = meta.group_matrix  # axis 1: one scale per row of M; axis 0: one per column
    return Layout((mr, mc), *(((mr, 1), (1, mc)) if meta.axis == 1 else ((1, mc), (mr, 1))), reshaped=True)


class HQQImporter(Importer):
    name = "hqq"
    description = "HQQ checkpoints (HQQLinear W_q + metadata; 1-8 bit, any group size on axis 0 or 1), bit-exact"
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
            where = layout(meta)
            packed_words(folder, tensors["W_q"], meta)
            for key in ("scale", "zero"):
                _check_parameter(folder, tensors, key, meta)
            kinds.add((meta.nbits, meta.group_size, meta.axis))
            info = {"method": "import", "format": "hqq", "nbits": meta.nbits, "group_size": meta.group_size,
                    "axis": meta.axis, "packing": meta.packing}
            sources = tuple(n for s, n in tensors.items() if s != "bias")
            planned.append(Planned(weight, sources, meta.shape[0] * meta.shape[1],
                                   partial(_record, folder, weight, tensors, meta, where, info)))
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


def _record(folder: CheckpointFolder, name: str, tensors: dict[str, str], meta: HQQMeta, where: Layout,
            info: dict) -> Any:
    codes = unpack(folder, tensors["W_q"], meta).reshape(where.shape)  # M, or the dequantize's final reshape
    b = RecordBuilder(name, meta.shape, meta.dtype)
    scale = b.tensor("scale", np.asarray(folder.read(tensors["scale"])).reshape(where.grid))
    zero = b.tensor("zero", np.asarray(folder.read(tensors["zero"])).reshape(where.grid))
    node = b.affine(b.packed("codes", codes, meta.bits), scale=scale, zero=zero, bits=meta.bits,
                    group_shape=where.group)
    return b.finish(b.reshape(node) if where.reshaped else node, info)


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(HQQImporter())
