"""bitsandbytes importer: Hugging Face folders saved with ``BitsAndBytesConfig`` (``quant_method: bitsandbytes``),
4-bit NF4/FP4 with or without double quantization, or 8-bit LLM.int8. The stored codes, absmax statistics, maps and
row scales become records bit for bit (trees and arithmetic: ``_import_bnb_records``), so each record decodes to
exactly what ``bitsandbytes.functional.dequantize_4bit`` / ``int8_vectorwise_dequant`` give in fp32.

- **4-bit** modules: ``weight`` (packed uint8, or any quant storage dtype, read as bytes), ``weight.absmax``,
  ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4|fp4`` (a JSON blob: quant_type, blocksize, dtype,
  shape, and with double quantization nested_blocksize, nested_dtype, nested_offset), ``weight.nested_absmax``,
  ``weight.nested_quant_map``. Blocks of ``blocksize`` run along the flattened weight: where they end mid-row, the
  record's tree runs over a shape whose rows hold whole blocks, inside a ``reshape`` to [out, in].
- **8-bit** modules: ``weight`` int8 [out, in], ``SCB`` fp32 [out], ``weight_format`` (0 = row-major; others refused).
- Everything else (embeddings, norms, lm_head, biases, skipped modules) passes through as stored.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import ImportedModel, Importer, SourceError, hookimpl

from ._import_bnb_records import Nested, fourbit_record, int8_record, quant_map
from ._import_folder import CheckpointFolder
from ._import_hf import (
    RECORD_DTYPES,
    Planned,
    check_shape,
    config_dtype,
    expected_shapes,
    group_modules,
    imported_model,
    refuse_unknown,
    require,
    source_error,
)

STATE = "weight.quant_state.bitsandbytes__"
STATE_FIELDS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
NESTED_FIELDS = {"nested_blocksize", "nested_dtype", "nested_offset"}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what dequantize_4bit accepts
FOUR_BIT = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "bias", STATE + "nf4", STATE + "fp4"}
EIGHT_BIT = {"weight", "SCB", "weight_format", "bias"}


def _mode(qconfig: dict[str, Any]) -> int | None:
    if qconfig.get("load_in_4bit") or qconfig.get("_load_in_4bit"):
        return 4
    if qconfig.get("load_in_8bit") or qconfig.get("_load_in_8bit"):
        return 8
    return None


class BnbImporter(Importer):
    name = "bitsandbytes"
    description = "bitsandbytes checkpoints (NF4/FP4 4-bit with or without double quantization, LLM.int8), bit-exact"
    priority = 10

    def detect(self, source: Path) -> bool:
        qconfig = CheckpointFolder.quantization_config_of(source) if Path(source).is_dir() else None
        if qconfig is None or _mode(qconfig) is None:
            return False
        method = qconfig.get("quant_method", "bitsandbytes")  # configs before quant_method existed: the flags alone
        return isinstance(method, str) and method.lower() == "bitsandbytes"

    def open(self, source: Path) -> ImportedModel:
        folder = CheckpointFolder(Path(source))
        mode = _mode(folder.quantization_config or {})
        if mode is None:
            raise SourceError("quantization_config says neither load_in_4bit nor load_in_8bit",
                              file=str(folder.path / "config.json"), field="quantization_config")
        shapes = expected_shapes(folder.plain_config())
        names = folder.names()
        if mode == 4:
            prefixes = {n.split("." + STATE)[0] for n in names if "." + STATE in n}
        else:
            prefixes = {n[: -len(".SCB")] for n in names if n.endswith(".SCB")}
        if not prefixes:
            raise SourceError(f"no {mode}-bit bitsandbytes modules in the checkpoint", file=str(folder.path))
        plan = _FourBit(folder, shapes) if mode == 4 else _EightBit(folder, shapes)
        planned = [plan.module(prefix, tensors) for prefix, tensors in sorted(group_modules(names, prefixes).items())]
        return imported_model(folder, planned, plan.describe(), plan.details(len(planned)))


class _FourBit:
    def __init__(self, folder: CheckpointFolder, shapes: dict | None) -> None:
        self.folder, self.shapes = folder, shapes
        self.seen: set[tuple[str, int, bool]] = set()

    def module(self, prefix: str, tensors: dict[str, str]) -> Planned:
        folder = self.folder
        refuse_unknown(folder, tensors, FOUR_BIT, "bitsandbytes 4-bit")
        blobs = [s for s in tensors if s.startswith(STATE)]
        if len(blobs) != 1:
            raise source_error(folder, tensors[blobs[0]], "a module has one quant_state blob", "quant_state")
        blob = tensors[blobs[0]]
        state = _quant_state(folder, blob)
        quant_type = state["quant_type"]
        if quant_type != blobs[0][len(STATE):]:
            raise source_error(folder, blob, f"quant_type {quant_type!r} in a blob named for "
                               f"{blobs[0][len(STATE):]!r}", "quant_type")
        shape = state["shape"]
        rows, cols = shape
        weight = f"{prefix}.weight"
        check_shape(folder, self.shapes, weight, shape, blob)
        block = state["blocksize"]
        nested = bool(state.keys() & NESTED_FIELDS)
        require(folder, tensors, prefix, "weight", "weight.absmax", "weight.quant_map",
                *(("weight.nested_absmax", "weight.nested_quant_map") if nested else ()))
        if nested and not NESTED_FIELDS <= state.keys():
            missing = sorted(NESTED_FIELDS - state.keys())[0]
            raise source_error(folder, blob, f"double quantization without {missing!r}", missing)
        stray = sorted({"weight.nested_absmax", "weight.nested_quant_map"} & tensors.keys()) if not nested else []
        if stray:
            raise source_error(folder, tensors[stray[0]], "a nested tensor where the quant_state has no nested "
                               "fields", stray[0])
        packed = folder.read(tensors["weight"])
        if packed.nbytes != -(-rows * cols // 2):
            raise source_error(folder, tensors["weight"], f"{packed.nbytes} bytes where {list(shape)} packs into "
                               f"{-(-rows * cols // 2)}", "shape")
        blocks = -(-rows * cols // block)
        stored = folder.read(tensors["weight.quant_map"])
        if stored.shape != (16,) or stored.dtype != np.float32 or not np.array_equal(stored + 0.0,
                                                                                   quant_map(quant_type) + 0.0):
            raise source_error(folder, tensors["weight.quant_map"], f"quant_map is not bitsandbytes' {quant_type} "
                               "table (its kernels decode with their own table, whatever the file says)", "quant_map")
        if nested:
            folder.expect(tensors["weight.absmax"], (blocks,), ("uint8",))
            inner = state["nested_blocksize"]
            folder.expect(tensors["weight.nested_absmax"], (-(-blocks // inner),), ("float32",))
            folder.expect(tensors["weight.nested_quant_map"], (256,), ("float32",))
        else:
            folder.expect(tensors["weight.absmax"], (blocks,), ("float32",))
        self.seen.add((quant_type, block, nested))
        info = {"method": "import", "format": "bitsandbytes", "quant_type": quant_type, "blocksize": block,
                "double_quant": nested}
        sources = tuple(n for s, n in tensors.items() if s != "bias")
        build = partial(self._build, weight, tuple(shape), RECORD_DTYPES[state["dtype"]], quant_type, block, tensors,
                        state.get("nested_offset"), state.get("nested_blocksize"), info)
        return Planned(weight, sources, rows * cols, build)

    def _build(self, name: str, shape: tuple[int, int], dtype: str, quant_type: str, block: int,
               tensors: dict[str, str], offset: float | None, inner: int | None, info: dict) -> Any:
        read = self.folder.read
        absmax: Any = read(tensors["weight.absmax"])
        if offset is not None and inner is not None:
            absmax = Nested(absmax, read(tensors["weight.nested_quant_map"]), read(tensors["weight.nested_absmax"]),
                            float(np.float32(offset)), inner)
        packed = read(tensors["weight"]).reshape(-1).view(np.uint8)
        return fourbit_record(name, shape, dtype, quant_type, block, packed, absmax, info)

    def describe(self) -> str:
        kinds = sorted(f"{q} blocksize {b}{' double-quant' if n else ''}" for q, b, n in self.seen)
        return "bitsandbytes " + ", ".join(kinds)

    def details(self, modules: int) -> dict[str, Any]:
        return {"modules": modules, "layouts": sorted(f"{q}/{b}/{'dq' if n else 'plain'}" for q, b, n in self.seen)}


def _quant_state(folder: CheckpointFolder, blob: str) -> dict[str, Any]:
    """The quant-state blob's JSON, checked field by field."""
    raw = folder.read(blob)
    try:
        state = json.loads(bytes(np.asarray(raw, dtype=np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise source_error(folder, blob, f"the quant_state blob is not valid JSON: {exc}", "quant_state") from None
    if not isinstance(state, dict):
        raise source_error(folder, blob, "the quant_state blob is not a JSON object", "quant_state")
    unknown = sorted(set(state) - STATE_FIELDS)
    if unknown:
        raise source_error(folder, blob, f"unknown quant_state field {unknown[0]!r}", unknown[0])
    for key in ("quant_type", "blocksize", "dtype", "shape"):
        if key not in state:
            raise source_error(folder, blob, f"the quant_state lacks {key!r}", key)
    if state["quant_type"] not in ("nf4", "fp4"):
        raise source_error(folder, blob, f"unknown quant_type {state['quant_type']!r}", "quant_type")
    if state["blocksize"] not in BLOCKSIZES or isinstance(state["blocksize"], bool):
        raise source_error(folder, blob, f"blocksize {state['blocksize']!r} is none of {BLOCKSIZES}", "blocksize")
    if state["dtype"] not in RECORD_DTYPES:
        raise source_error(folder, blob, f"dtype {state['dtype']!r} is none of {sorted(RECORD_DTYPES)}", "dtype")
    shape = state["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise source_error(folder, blob, f"shape {shape!r} is not [out, in]", "shape")
    if "nested_blocksize" in state and (not isinstance(state["nested_blocksize"], int)
                                        or isinstance(state["nested_blocksize"], bool)
                                        or state["nested_blocksize"] <= 0):
        raise source_error(folder, blob, f"nested_blocksize {state['nested_blocksize']!r}", "nested_blocksize")
    if "nested_dtype" in state and state["nested_dtype"] != "float32":
        raise source_error(folder, blob, f"nested_dtype {state['nested_dtype']!r} (bitsandbytes writes float32)",
                           "nested_dtype")
    if "nested_offset" in state:
        offset = state["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise source_error(folder, blob, f"nested_offset {offset!r} is not a finite number", "nested_offset")
    return state


class _EightBit:
    def __init__(self, folder: CheckpointFolder, shapes: dict | None) -> None:
        self.folder, self.shapes = folder, shapes
        self.dtype = config_dtype(folder.config)

    def module(self, prefix: str, tensors: dict[str, str]) -> Planned:
        folder = self.folder
        refuse_unknown(folder, tensors, EIGHT_BIT, "bitsandbytes 8-bit")
        require(folder, tensors, prefix, "weight", "SCB")
        weight = folder.read(tensors["weight"])
        if weight.dtype != np.int8 or weight.ndim != 2:
            raise source_error(folder, tensors["weight"], f"an 8-bit weight is int8 [out, in], not "
                               f"{weight.dtype} {list(weight.shape)}", "dtype")
        name = f"{prefix}.weight"
        check_shape(folder, self.shapes, name, weight.shape, tensors["weight"])
        folder.expect(tensors["SCB"], (weight.shape[0],), ("float32",))
        if "weight_format" in tensors:
            fmt = folder.read(tensors["weight_format"])
            if fmt.size != 1 or fmt.dtype.kind not in "ui" or int(fmt.reshape(-1)[0]) != 0:
                raise source_error(folder, tensors["weight_format"], "only the row-major weight_format (0) is "
                                   "stored by bitsandbytes today", "weight_format")
        info = {"method": "import", "format": "bitsandbytes", "quant_type": "int8"}
        sources = tuple(n for s, n in tensors.items() if s != "bias")
        build = partial(self._build, name, tensors, info)
        return Planned(name, sources, int(weight.size), build)

    def _build(self, name: str, tensors: dict[str, str], info: dict) -> Any:
        return int8_record(name, self.dtype, self.folder.read(tensors["weight"]), self.folder.read(tensors["SCB"]),
                           info)

    def describe(self) -> str:
        return "bitsandbytes LLM.int8 (row-wise absmax int8)"

    def details(self, modules: int) -> dict[str, Any]:
        return {"modules": modules, "layouts": ["int8/row"]}


@hookimpl
def qformat_register_importers(register: Any) -> None:
    register(BnbImporter())
