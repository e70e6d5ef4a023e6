"""GGUF exporter: ``qformat export --to gguf DIR model.gguf`` writes a qformat folder as a llama.cpp GGUF file,
every quantized record in the GGUF type that expresses its tree exactly (``_export_gguf_records``: the GGUF
importer's trees go back to their own type, so an imported GGUF exports to the same tensor bytes; our methods'
affine trees go to Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0, the smallest that holds them), and every plain tensor as stored
(F32, F16, BF16; 1-D tensors widened to F32 exactly, as llama.cpp's converter writes norms and biases).

- **Checked**: each quantized tensor's blocks, dequantized by gguf-py (``gguf.quants.dequantize``), equal the
  record's reference decode bit for bit (fp32, uint32 view), or the record is inexpressible.
- **Inexpressible** records (a permutation, outliers, a codebook, a scale that varies inside a 32-column block or is
  not an fp16 value, ...): :class:`InexpressibleError` listing every one with its tree signature, before anything
  is written. With ``allow_requant`` each is re-quantized from its reference decode by gguf-py's own quantizer:
  Q8_0 when the record stores 6 or more bits per weight, else Q4_0 for a symmetric tree (an affine whose zero is
  the constant midpoint, or a per-block ``scale``) and Q4_1 for anything else; F16 when its rows are not whole
  32-column blocks. A :class:`RequantizedWarning` gives each one's relative error.
- **Model**: names, q/k row order, hyperparameters, tokenizer and ``general.*``: ``_export_gguf_model`` (Llama,
  Mistral, Qwen2).
- **Output**: tensor data is spilled to a temporary file beside ``OUT`` while the tensors are converted (memory: about
  one tensor), then the GGUF is written under a temporary name and renamed to ``OUT``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qformat.format import signature
from qformat.plugin import (
    ExportedTensor,
    Exporter,
    ExportReport,
    Inexpressible,
    InexpressibleError,
    SourceError,
    hookimpl,
    opened,
    relative_error,
    same_bits,
    staged_output,
)

from . import _export_gguf_model as model_io
from ._export_affine import NotExpressible, Tree
from ._export_gguf_records import candidates, dequantize, to_blocks

PLAIN_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass
class _Written:
    gguf_name: str
    type_name: str
    shape: tuple[int, ...]  # of the bytes, numpy order ([R, row bytes]; add_tensor_info derives the elements)
    offset: int  # in the spill file
    nbytes: int


class GGUFExporter(Exporter):
    name = "gguf"
    description = ("llama.cpp GGUF (Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0; F32/F16/BF16) for "
                   "Llama, Mistral and Qwen2, exactly (checked with gguf-py's dequantize)")

    def export(self, folder: Any, out: Path, *, allow_requant: bool = False) -> ExportReport:
        start = time.perf_counter()
        out = Path(out)
        with opened(folder) as model, staged_output(out) as temp:
            spill = temp.with_name(temp.name + ".data")
            try:
                report = _export(model, out, temp, spill, allow_requant)
            finally:
                if spill.exists():
                    spill.unlink()
        report.seconds = time.perf_counter() - start
        report.emit()
        return report


def _export(model: Any, out: Path, temp: Path, spill: Path, allow_requant: bool) -> ExportReport:
    import gguf

    root = Path(model.root)
    config = {k: v for k, v in model.config.items() if k != "quantization_config"}
    qconfig = model.quantization_config
    plan = model_io.plan(config, str(root / "config.json"))
    names = _names(model, plan, root)
    written: list[_Written] = []
    exported: list[ExportedTensor] = []
    refused: list[Inexpressible] = []
    notes: list[str] = []
    total_params = 0
    with open(spill, "wb") as data:
        for name, gguf_name in sorted(names.items(), key=lambda item: model_io.order_key(item[1])):
            if name in model.record_shard:
                qt = model.quantized(name)
                total_params += int(np.prod(qt.record["shape"]))
                result = _record(qt, model.registry, plan)
                if isinstance(result, str):
                    if not allow_requant:
                        refused.append(Inexpressible(name, signature(qt.record["weight"]), result,
                                                     str(root / model.record_shard[name])))
                        continue
                    type_name, raw, error = _requantize(qt, model.registry, plan)
                    notes.append(f"{name} ({gguf_name}) cannot be expressed exactly ({result}); re-quantized to "
                                 f"{type_name}, relative error {error:.3e}")
                    exported.append(ExportedTensor(name, gguf_name, type_name, False, error))
                else:
                    type_name, raw = result
                    exported.append(ExportedTensor(name, gguf_name, type_name))
            else:
                array = np.asarray(model.tensor(name))
                total_params += int(array.size)
                type_name, raw = _plain(name, array, plan, root / model.tensor_shard[name])
                exported.append(ExportedTensor(name, gguf_name, type_name))
            if refused:
                continue  # keep checking the rest, to list every inexpressible tensor; write nothing more
            written.append(_spill(data, gguf_name, type_name, raw))
        freqs = model_io.rope_freqs(config)
        if freqs is not None and not refused:
            written.append(_spill(data, "rope_freqs.weight", "F32", freqs.astype(np.float32).view(np.uint8)))
            exported.append(ExportedTensor("(rope_freqs)", "rope_freqs.weight", "F32"))
    if refused:
        raise InexpressibleError("GGUF", root, refused)
    file_type = model_io.file_type(dict(Counter(t.kind for t in exported)), qconfig)
    writer = gguf.GGUFWriter(None, plan.arch)
    model_io.write_general(writer, root, config, qconfig, total_params)
    model_io.write_hparams(writer, plan, file_type)
    notes += model_io.write_vocab(writer, root, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for item in written:
        writer.add_tensor_info(item.gguf_name, item.shape, np.dtype(np.uint8), item.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[item.type_name])
    writer.write_header_to_file(path=temp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pages = np.memmap(spill, dtype=np.uint8, mode="r") if written else None
    for item in written:
        writer.write_tensor_data(np.asarray(pages[item.offset:item.offset + item.nbytes]))
    writer.close()
    del pages
    details = {"architecture": plan.arch, "tied_embeddings": plan.tied, "file_type": file_type,
               "bytes": os.path.getsize(temp)}
    return ExportReport("gguf", out, exported, warnings=notes, details=details)


def _names(model: Any, plan: model_io.ModelPlan, root: Path) -> dict[str, str]:
    """qformat name -> GGUF name for every tensor written (a tied ``lm_head.weight`` is left out); every tensor
    without a GGUF name is an error naming them all."""
    names: dict[str, str] = {}
    unknown: list[str] = []
    for name in model.iter_weights():
        if plan.tied and name == "lm_head.weight":
            continue
        gguf_name = plan.gguf_name(name)
        if gguf_name is None:
            unknown.append(name)
        else:
            names[name] = gguf_name
    if unknown:
        raise SourceError(f"{len(unknown)} tensor(s) have no GGUF name for architecture {plan.arch!r}: "
                          f"{', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""), file=str(root),
                          tensor=unknown[0], field="name")
    return names


def _record(qt: Any, registry: Any, plan: model_io.ModelPlan) -> tuple[str, np.ndarray] | str:
    """(GGUF type, blocks in llama.cpp's row order) of the first exact layout; the reason when there is none."""
    if len(qt.record["shape"]) != 2:
        return f"a {len(qt.record['shape'])}-D weight (GGUF types here are 2-D)"
    try:
        tree = Tree(qt, registry)
        options = candidates(tree)
    except NotExpressible as exc:
        return str(exc)
    reference = tree.reference()
    tried = []
    for type_name, fields in options:
        raw = to_blocks(type_name, fields)
        if same_bits(dequantize(raw, type_name), reference):
            order = plan.row_order(qt.name, raw.shape[0])
            return type_name, np.ascontiguousarray(raw if order is None else raw[order])
        tried.append(type_name)
    return f"gguf-py dequantizes the {'/'.join(tried)} blocks differently from the reference decode"


def _symmetric(node: dict[str, Any]) -> bool:
    if node.get("codec") == "scale":
        return True
    zero = node.get("zero")
    return node.get("codec") == "affine" and isinstance(zero, (int, float)) and zero == (1 << node["bits"]) / 2


def _requantize(qt: Any, registry: Any, plan: model_io.ModelPlan) -> tuple[str, np.ndarray, float]:
    """gguf-py's own quantizer on the reference decode (see the module docstring for the type)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    reference = qt.decode(registry)
    cols = reference.shape[-1]
    if cols % 32:
        type_name = "F16"
    elif qt.bits_per_weight >= 6:
        type_name = "Q8_0"
    else:
        type_name = "Q4_0" if _symmetric(qt.record["weight"]) else "Q4_1"
    raw = quantize(reference, GGMLQuantizationType[type_name])
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(reference.shape[0], -1)
    error = relative_error(dequantize(raw, type_name), reference)
    order = plan.row_order(qt.name, raw.shape[0])
    return type_name, np.ascontiguousarray(raw if order is None else raw[order]), error


def _plain(name: str, array: np.ndarray, plan: model_io.ModelPlan, file: Path) -> tuple[str, np.ndarray]:
    """A plain tensor's GGUF type and bytes: as stored, 1-D widened to F32 (exact)."""
    type_name = PLAIN_TYPES.get(array.dtype.name)
    if type_name is None:
        raise SourceError(f"a plain {array.dtype.name} tensor (GGUF takes F32, F16, BF16 weights here)",
                          file=str(file), tensor=name, field="dtype")
    if array.ndim == 1 and type_name != "F32":
        array = array.astype(np.float32)  # F16 and BF16 widen to F32 exactly
        type_name = "F32"
    order = plan.row_order(name, array.shape[0])
    if order is not None:
        array = array[order]
    raw = np.ascontiguousarray(array).view(np.uint8)
    if not same_bits(dequantize(raw.reshape(array.shape[0] if array.ndim > 1 else 1, -1), type_name).reshape(
            array.shape), array.astype(np.float32)):
        raise SourceError("gguf-py reads this plain tensor back differently", file=str(file), tensor=name,
                          field="dtype")
    return type_name, raw.reshape(array.shape[:-1] + (-1,))


def _spill(data: Any, gguf_name: str, type_name: str, raw: np.ndarray) -> _Written:
    offset = data.tell()
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    data.write(raw.tobytes())
    return _Written(gguf_name, type_name, tuple(raw.shape), offset, int(raw.nbytes))


@hookimpl
def qformat_register_exporters(register: Any) -> None:
    register(GGUFExporter())


__all__ = ["GGUFExporter"]
