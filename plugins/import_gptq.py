"""Importers of GPTQ and AWQ checkpoints (``qweight``, ``qzeros``, ``scales``): their integers and scales become
records as stored, nothing is dequantized.

GPTQ (``quant_method: gptq``, AutoGPTQ / GPTQModel / optimum): ``qweight`` int32 ``[in·b/32, out]``, each output
column's words an LSB-first stream of ``b``-bit codes along the input (b = 2, 3, 4, 8; 3-bit codes straddle words);
``qzeros`` int32 ``[groups, out·b/32]`` the same stream along the outputs; ``scales`` ``[groups, out]``; ``g_idx``
``[in]`` the group of each input column. ``checkpoint_format: gptq`` (v1) stores zero − 1 and its reader adds the 1
back (AutoGPTQ ``qlinear_cuda``: ``zeros = (unpacked & mask) + 1``, so a stored 2^b − 1 reads as 2^b); ``gptq_v2``
stores the zero. Record: ``affine(packed codes, F16 scale [out, groups], zero, [1, group])``, the reference's
``(q − z) · s``; the zero is the constant 2^(b−1) where every zero equals it (symmetric), else packed ``b``-bit codes
(``b + 1`` bits where a v1 zero is 2^b). With act-order (``g_idx`` not ``c // group``) the columns are sorted stably
by ``g_idx``; when that makes every group a contiguous tile of ``group`` columns (what GPTQ's ``desc_act`` writes) the
record is ``permute(affine(codes in sorted order, …), perm)``; otherwise the scale and zero are spelled out per column
(``group_shape [1, 1]``: exact, 16 + b more bits per weight, and said in the record's info).

AWQ (``quant_method: awq``, version ``gemm``): ``qweight`` int32 ``[in, out/8]`` packed along the outputs in the
order ``AWQ_ORDER``, ``qzeros`` ``[groups, out/8]`` likewise, ``scales`` ``[groups, out]``; AutoAWQ dequantizes
``(q − z) · s`` (``dequantize_gemm``): the same ``affine`` record.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import ImportedModel, Importer, RecordBuilder, SourceError, hookimpl

from ._import_actorder import column_groups
from ._import_bits import awq_codes, stream_codes
from ._import_folder import CheckpointFolder
from ._import_model import card_base_model, linear_shape, record_dtype
from ._import_modules import plan_tensors, quantized_modules, require, stored_bits
from ._import_records import affine_tree
from ._import_safetensors import ImportFolder

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 2}
AWQ_VERSIONS = ("gemm",)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def _quant_method(source: Path) -> str | None:
    qconfig = CheckpointFolder.quantization_config_of(source) if Path(source).is_dir() else None
    method = qconfig.get("quant_method") if qconfig else None
    return method.lower() if isinstance(method, str) else None


def _int_field(qconfig: dict[str, Any], keys: tuple[str, ...], default: int, file: str) -> int:
    for key in keys:
        if key in qconfig and qconfig[key] is not None:
            value = qconfig[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise SourceError(f"quantization_config.{key} is {value!r}, not an integer", file=file, field=key)
            return value
    return default


def _check_linear(folder: ImportFolder, module: str, shape: tuple[int, int], tensor: str) -> None:
    expected = linear_shape(folder.config, module)
    if expected is not None and tuple(expected) != shape:
        raise SourceError(f"the stored tensors make {module} a {list(shape)} weight where config.json implies "
                          f"{list(expected)}", file=str(folder.path / folder.shard_of(tensor)), tensor=tensor,
                          field="shape")


def _shape_error(folder: ImportFolder, tensor: str, message: str, field: str = "shape") -> SourceError:
    return SourceError(message, file=str(folder.path / folder.shard_of(tensor)), tensor=tensor, field=field)


class GPTQImporter(Importer):
    name = "gptq"
    description = "GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum): checkpoint_format gptq (v1) and gptq_v2, 2/3/4/8 bits"
    priority = 10

    def detect(self, source: Path) -> bool:
        return _quant_method(source) == "gptq"

    def open(self, source: Path) -> ImportedModel:
        folder = ImportFolder(source)
        qc = folder.quantization_config or {}
        where = str(folder.path / "config.json")
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise SourceError(f"GPTQ checkpoint_format {fmt!r} is not supported (supported: "
                              f"{', '.join(GPTQ_FORMATS)})", file=where, field="checkpoint_format")
        pack_dtype = str(qc.get("pack_dtype") or "int32").removeprefix("torch.")
        if pack_dtype != "int32":
            raise SourceError(f"GPTQ pack_dtype {pack_dtype!r} is not supported (supported: int32)", file=where,
                              field="pack_dtype")
        base = {"bits": _int_field(qc, ("bits",), 4, where), "group_size": _int_field(qc, ("group_size",), 128, where)}
        dynamic = qc.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise SourceError("quantization_config.dynamic is not an object", file=where, field="dynamic")
        v1 = GPTQ_FORMATS[fmt] == 1
        parts: dict[str, list[str]] = {}
        settings: dict[str, dict[str, int]] = {}
        weights = 0
        for module in quantized_modules(folder, "qweight"):
            setting = {**base, **_dynamic_overrides(dynamic, module, where)}
            if setting["bits"] not in GPTQ_BITS:
                raise SourceError(f"GPTQ with {setting['bits']} bits is not supported (supported: "
                                  f"{', '.join(map(str, GPTQ_BITS))})", file=where, field="bits")
            names = [require(folder, module, "qweight"), require(folder, module, "qzeros"),
                     require(folder, module, "scales")]
            if folder.has(f"{module}.g_idx"):
                names.append(f"{module}.g_idx")
            words, out = _gptq_shape(folder, module, setting["bits"])
            weights += words * 32 // setting["bits"] * out
            parts[module] = names
            settings[module] = setting
        if not parts:
            raise SourceError("no GPTQ module (no tensor named *.qweight)", file=str(folder.path))
        dtype = record_dtype(folder.config)
        sym = qc.get("sym", True) is not False
        desc_act = bool(qc.get("desc_act", False))
        summary = (f"gptq {'v1' if v1 else 'v2'} {base['bits']}-bit g{base['group_size']}"
                   f"{' act-order' if desc_act else ''} {'sym' if sym else 'asym'}")

        def build(module: str):
            return _gptq_record(folder, module, settings[module], v1, dtype)

        return ImportedModel(config=folder.plain_config(), tensors=plan_tensors(folder, parts, build),
                             source_format=summary, files=folder.files(), base_model=card_base_model(folder.path),
                             details={"modules": len(parts), "checkpoint_format": fmt, "bits": base["bits"],
                                      "group_size": base["group_size"], "desc_act": desc_act, "sym": sym},
                             source_bits=stored_bits(folder, parts, weights))


def _dynamic_overrides(dynamic: dict[str, Any], module: str, where: str) -> dict[str, int]:
    """GPTQModel's per-module ``dynamic`` overrides: the first pattern (``+:`` or unprefixed) matching the module."""
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            continue  # modules left unquantized: they hold plain weights, no qweight
        if re.match(pattern.removeprefix("+:"), module):
            if not isinstance(overrides, dict):
                raise SourceError(f"dynamic[{pattern!r}] is not an object", file=where, field="dynamic")
            return {k: int(overrides[k]) for k in ("bits", "group_size") if k in overrides}
    return {}


def _gptq_shape(folder: ImportFolder, module: str, bits: int) -> tuple[int, int]:
    name = f"{module}.qweight"
    qweight = folder.read(name)
    if qweight.ndim != 2 or qweight.dtype != np.int32:
        raise _shape_error(folder, name, f"qweight is {qweight.dtype} {list(qweight.shape)}, not a 2-D int32 tensor",
                           "dtype" if qweight.ndim == 2 else "shape")
    words, out = qweight.shape
    if words * 32 % bits:
        raise _shape_error(folder, name, f"{words} rows of int32 words do not hold whole {bits}-bit codes "
                           f"(quantization_config.bits is {bits})")
    if folder.has(f"{module}.g_idx"):
        cols = folder.read(f"{module}.g_idx").shape
        if cols != (words * 32 // bits,):
            raise _shape_error(folder, name, f"qweight {list(qweight.shape)} holds {words * 32 // bits} input "
                               f"columns of {bits} bits but g_idx has {list(cols)} (does quantization_config.bits "
                               "match the checkpoint?)")
    _check_linear(folder, module, (out, words * 32 // bits), name)
    return words, out


def _gptq_record(folder: ImportFolder, module: str, setting: dict[str, int], v1: bool, dtype: str):
    bits, group_size = setting["bits"], setting["group_size"]
    qweight = folder.read(f"{module}.qweight")
    words, out = qweight.shape
    cols = words * 32 // bits
    group = cols if group_size <= 0 or group_size >= cols else group_size
    groups = math.ceil(cols / group)
    if out * bits % 32:
        raise _shape_error(folder, f"{module}.qzeros", f"{out} outputs of {bits} bits do not fill whole int32 words")
    scales = folder.expect(f"{module}.scales", (groups, out), SCALE_DTYPES)
    qzeros = folder.expect(f"{module}.qzeros", (groups, out * bits // 32), ("int32",))
    g_idx = folder.read(f"{module}.g_idx") if folder.has(f"{module}.g_idx") else None
    codes = stream_codes(qweight.T, bits, cols)  # [out, in]
    zeros = stream_codes(qzeros, bits, out).astype(np.uint16)  # [groups, out]
    if v1:
        zeros += 1  # v1 stores zero - 1; AutoGPTQ adds the 1 back after masking, so 2^b - 1 reads as 2^b
    layout = column_groups(g_idx, cols, group, groups, file=str(folder.path / folder.shard_of(f"{module}.qweight")),
                           tensor=f"{module}.g_idx")
    b = RecordBuilder(f"{module}.weight", (out, cols), dtype)
    if layout.kind == "plain":
        node = affine_tree(b, codes, bits, scales.T, zeros.T, (1, group))
    elif layout.kind == "permute":
        node = affine_tree(b, codes[:, layout.perm], bits, scales.T, zeros.T, (1, group), perm=layout.perm)
    else:
        index = np.asarray(g_idx, dtype=np.int64)
        node = affine_tree(b, codes, bits, scales[index].T, zeros[index].T, (1, 1))
    info = {"method": "gptq", "source": "gptq v1" if v1 else "gptq v2", "bits": bits, "group_size": group,
            "actorder": layout.kind != "plain"}
    if layout.kind == "columns":
        info["g_idx"] = "per-column: the groups are not contiguous after sorting by g_idx"
    return b.finish(node, info)


class AWQImporter(Importer):
    name = "awq"
    description = "AWQ checkpoints (AutoAWQ, GPTQModel), version gemm, 4 bits"
    priority = 10

    def detect(self, source: Path) -> bool:
        return _quant_method(source) == "awq"

    def open(self, source: Path) -> ImportedModel:
        folder = ImportFolder(source)
        qc = folder.quantization_config or {}
        where = str(folder.path / "config.json")
        version = str(qc.get("version") or qc.get("checkpoint_format") or qc.get("format") or "gemm").lower()
        if version not in AWQ_VERSIONS:
            raise SourceError(f"AWQ version {version!r} is not supported (supported: {', '.join(AWQ_VERSIONS)}; "
                              "GEMV and the kernel-specific layouts store their words differently)", file=where,
                              field="version")
        bits = _int_field(qc, ("bits", "w_bit"), 4, where)
        if bits != 4:
            raise SourceError(f"AWQ GEMM with {bits} bits is not supported (AutoAWQ packs 4 bits only)", file=where,
                              field="bits")
        group_size = _int_field(qc, ("group_size", "q_group_size"), 128, where)
        parts: dict[str, list[str]] = {}
        weights = 0
        for module in quantized_modules(folder, "qweight"):
            parts[module] = [require(folder, module, "qweight"), require(folder, module, "qzeros"),
                             require(folder, module, "scales")]
            qweight = folder.read(f"{module}.qweight")
            if qweight.ndim != 2 or qweight.dtype != np.int32:
                raise _shape_error(folder, f"{module}.qweight", f"qweight is {qweight.dtype} "
                                   f"{list(qweight.shape)}, not a 2-D int32 tensor")
            _check_linear(folder, module, (qweight.shape[1] * 8, qweight.shape[0]), f"{module}.qweight")
            weights += qweight.shape[0] * qweight.shape[1] * 8
        if not parts:
            raise SourceError("no AWQ module (no tensor named *.qweight)", file=str(folder.path))
        dtype = record_dtype(folder.config)

        def build(module: str):
            return _awq_record(folder, module, group_size, dtype)

        return ImportedModel(config=folder.plain_config(), tensors=plan_tensors(folder, parts, build),
                             source_format=f"awq gemm 4-bit g{group_size}", files=folder.files(),
                             base_model=card_base_model(folder.path),
                             details={"modules": len(parts), "version": version, "bits": 4, "group_size": group_size},
                             source_bits=stored_bits(folder, parts, weights))


def _awq_record(folder: ImportFolder, module: str, group_size: int, dtype: str):
    qweight = folder.read(f"{module}.qweight")
    cols, out = qweight.shape[0], qweight.shape[1] * 8
    group = cols if group_size <= 0 else group_size
    if cols % group:
        raise _shape_error(folder, f"{module}.qweight", f"{cols} input columns are not whole groups of {group} "
                           "(AWQ's dequantization repeats each scale group_size times)")
    scales = folder.expect(f"{module}.scales", (cols // group, out), SCALE_DTYPES)
    qzeros = folder.expect(f"{module}.qzeros", (cols // group, out // 8), ("int32",))
    b = RecordBuilder(f"{module}.weight", (out, cols), dtype)
    node = affine_tree(b, awq_codes(qweight).T, 4, scales.T, awq_codes(qzeros).T, (1, group))
    return b.finish(node, {"method": "awq", "source": "awq gemm", "bits": 4, "group_size": group})


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(GPTQImporter())
    register(AWQImporter())
