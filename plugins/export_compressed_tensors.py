"""compressed-tensors exporter: ``qformat export --to compressed-tensors DIR OUT`` writes a qformat folder as a
Hugging Face folder in compressed-tensors' ``pack-quantized`` format (what llm-compressor saves and vLLM loads for
W4A16/W8A16), each affine integer record as one module (``_export_ct_records``: the layout and why it is exact).

- **Config**: ``quantization_config`` as ``ModelCompressor.update_config`` writes it: ``version`` (the installed
  compressed-tensors'), ``quant_method: compressed-tensors``, ``format: pack-quantized``, ``quantization_status:
  compressed``, ``sparsity_config``/``transform_config`` empty, ``config_groups`` (one group per scheme; a single
  scheme over linears targets ``Linear``; several, or a quantized embedding, target module names) and ``ignore``
  (the linears left unquantized, e.g. ``lm_head``), validated by compressed-tensors' ``QuantizationConfig``. The
  rest of config.json, the tokenizer and generation files are copied; the tensors go to ``model.safetensors``
  (shards of at most 4 GiB with an index beyond that).
- **Checked**: the written folder is dequantized by compressed-tensors' own ``CompressedTensorsDequantizer``
  (each module's compressor ``decompress``, reading config.json as vLLM and transformers do), in fp32, and every
  module's weight must equal the record's reference decode bit for bit (uint32 view); plain tensors must come back
  unchanged. The library computes in the scale's dtype, which is float32 here (``_export_ct_records``).
- **Inexpressible** records (see ``_export_ct_records``): :class:`InexpressibleError` listing each with its tree
  signature, before anything is put at ``OUT``; with ``allow_requant`` they are re-quantized by compressed-tensors'
  own quantizer with its W8A16 or W4A16 preset (``_export_ct_records.requantize``) and a
  :class:`RequantizedWarning` gives each one's relative error (measured on the library's own decompression).
- vLLM quantizes linear layers only: a quantized token embedding is written (compressed-tensors decompresses it)
  but vLLM will not load it; convert such a model with an unquantized embedding for vLLM.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from qformat.format import signature
from qformat.format.safetensors_io import write_safetensors
from qformat.plugin import (
    ExportedTensor,
    Exporter,
    ExportReport,
    Inexpressible,
    InexpressibleError,
    PluginError,
    SourceError,
    hookimpl,
    opened,
    relative_error,
    same_bits,
    staged_output,
)

from . import _export_ct_records as ct
from ._export_affine import NotExpressible, Tree

SHARD_BYTES = 4 << 30
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "spiece.model",
              "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


def _library() -> tuple[str, tuple[int, ...] | None]:
    try:
        import compressed_tensors
    except ImportError:
        raise PluginError("the compressed-tensors exporter checks its output with the compressed-tensors package: "
                          "pip install compressed-tensors") from None
    text = str(compressed_tensors.__version__)
    match = re.match(r"(\d+)\.(\d+)", text)
    return text, (int(match.group(1)), int(match.group(2))) if match else None


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    description = ("compressed-tensors pack-quantized (int1-8, group/channel, sym/asym; llm-compressor's and vLLM's "
                   "format), exactly (checked with compressed-tensors' decompress)")

    def export(self, folder: Any, out: Path, *, allow_requant: bool = False) -> ExportReport:
        start = time.perf_counter()
        version, parsed = _library()
        how = ct.layout(parsed)
        with opened(folder) as model, staged_output(out, folder=True) as temp:
            report = _export(model, Path(out), temp, version, how, allow_requant)
        report.seconds = time.perf_counter() - start
        report.emit()
        return report


class _Shards:
    """Tensors collected into shards of at most SHARD_BYTES, written as they fill (a module never straddles two)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.pending, self.size, self.files, self.where = folder, {}, 0, [], {}

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        size = sum(int(a.nbytes) for a in tensors.values())
        if self.pending and self.size + size > SHARD_BYTES:
            self.flush()
        self.pending.update(tensors)
        self.size += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f".shard-{len(self.files):05d}.safetensors"
        write_safetensors(self.folder / name, self.pending, {"format": "pt"})
        self.files.append(name)
        for key in self.pending:
            self.where[key] = name
        self.pending, self.size = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names (and write the index when there are several)."""
        self.flush()
        total = len(self.files)
        final = ["model.safetensors"] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                                          for i in range(total)]
        for temp, name in zip(self.files, final, strict=True):
            (self.folder / temp).rename(self.folder / name)
        renamed = dict(zip(self.files, final, strict=True))
        self.where = {k: renamed[v] for k, v in self.where.items()}
        if total > 1:
            size = sum((self.folder / n).stat().st_size for n in final)
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(self.where.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def _export(model: Any, out: Path, temp: Path, version: str, how: str, allow_requant: bool) -> ExportReport:
    root = Path(model.root)
    config = {k: v for k, v in model.config.items() if k != "quantization_config"}
    shards = _Shards(temp)
    exported: list[ExportedTensor] = []
    refused: list[Inexpressible] = []
    notes: list[str] = []
    schemes: dict[str, ct.Scheme] = {}  # module -> scheme
    requantized: set[str] = set()
    for name in model.record_shard:
        qt = model.quantized(name)
        try:
            module = ct.module(Tree(qt, model.registry), how)
        except NotExpressible as exc:
            if not allow_requant:
                refused.append(Inexpressible(name, signature(qt.record["weight"]), str(exc),
                                             str(root / model.record_shard[name])))
                continue
            if not name.endswith(".weight") or len(qt.record["shape"]) != 2:
                raise SourceError(f"cannot be re-quantized either ({exc})", file=str(root), tensor=name) from None
            module = ct.requantize(name[: -len(".weight")], qt.decode(model.registry), qt.bits_per_weight, how)
            requantized.add(module.name)
            notes.append(f"{name} cannot be expressed exactly ({exc}); re-quantized to {module.scheme.describe()}")
        if refused:
            continue
        schemes[module.name] = module.scheme
        shards.add({f"{module.name}.{part}": array for part, array in module.tensors.items()})
        exported.append(ExportedTensor(name, f"{module.name}.weight_packed", module.scheme.describe(),
                                       module.name not in requantized))
    if refused:
        raise InexpressibleError("compressed-tensors", root, refused)
    for name in model.plain_names:
        if name.rsplit(".", 1)[0] in schemes:
            raise SourceError("a plain tensor beside a quantized weight of the same module", file=str(root),
                              tensor=name)
        shards.add({name: np.asarray(model.tensor(name))})
        exported.append(ExportedTensor(name, name, _dtype_name(model.tensor(name))))
    files = shards.finish()
    qconfig = _quantization_config(schemes, model, version)
    (temp / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}, indent=2,
                                                 sort_keys=True) + "\n")
    for side in SIDE_FILES:
        if (root / side).is_file():
            shutil.copyfile(root / side, temp / side)
    errors = _verify(temp, files, model, schemes, requantized)
    for item in exported:
        module = item.target.rsplit(".", 1)[0]
        if module in requantized:
            item.relative_error = errors[module]
            notes = [n + f", relative error {errors[module]:.3e}" if n.startswith(f"{module}.weight ") else n
                     for n in notes]
    details = {"compressed_tensors_version": version, "packing": how, "shards": files,
               "config_groups": len(qconfig["config_groups"]), "ignore": qconfig["ignore"]}
    return ExportReport("compressed-tensors", out, exported, warnings=notes, details=details)


def _dtype_name(array: np.ndarray) -> str:
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(array.dtype.name, array.dtype.name)


def _is_embedding(module: str) -> bool:
    return "embed" in module.rsplit(".", 1)[-1]


def _quantization_config(schemes: dict[str, ct.Scheme], model: Any, version: str) -> dict[str, Any]:
    """``ModelCompressor.update_config``'s dict, validated by compressed-tensors' ``QuantizationConfig``."""
    from compressed_tensors.quantization import QuantizationConfig

    by_scheme: dict[ct.Scheme, list[str]] = {}
    for module, scheme in schemes.items():
        by_scheme.setdefault(scheme, []).append(module)
    linears_only = not any(_is_embedding(m) for m in schemes)
    named = len(by_scheme) > 1 or not linears_only
    groups = {}
    for i, (scheme, modules) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[0].describe())):
        groups[f"group_{i}"] = {"targets": sorted(modules) if named else ["Linear"], "weights": scheme.weights(),
                                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    ignore = [] if named else sorted(
        name.rsplit(".", 1)[0] for name in model.plain_names
        if name.endswith(".weight") and np.ndim(model.tensor(name)) == 2 and not _is_embedding(name.rsplit(".", 1)[0]))
    body = {"config_groups": groups, "format": "pack-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "ignore": ignore}
    checked = QuantizationConfig.model_validate({**body, "quant_method": "compressed-tensors"})
    dumped = checked.model_dump(exclude=["quant_method"])
    return {"version": version, "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
            **json.loads(json.dumps(dumped, default=str))}


def _verify(folder: Path, files: list[str], model: Any, schemes: dict[str, ct.Scheme],
            requantized: set[str]) -> dict[str, float]:
    """Dequantize the written folder with compressed-tensors, one module at a time (memory: one module), and compare
    every module with the reference decode; returns the requantized modules' relative errors."""
    import torch
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors import safe_open

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dequantizer = CompressedTensorsDequantizer(str(folder), dtype=torch.float32)
    seen: set[str] = set()
    errors: dict[str, float] = {}
    for file in files:
        path = folder / file
        with safe_open(str(path), framework="pt") as handle:
            groups: dict[str, list[str]] = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
            for module, keys in groups.items():
                try:
                    result = dequantizer.process({key: handle.get_tensor(key) for key in keys})
                except Exception as exc:  # noqa: BLE001 - whatever the library says, the file is not what it reads
                    raise SourceError(f"compressed-tensors cannot decompress this module: {type(exc).__name__}: "
                                      f"{exc}", file=str(path), tensor=module) from None
                for name, value in result.items():
                    got = value.float().numpy() if value.dtype.is_floating_point else None
                    if module in schemes and name == f"{module}.weight":
                        seen.add(module)
                        _compare(path, name, got, model.decode(name), module in requantized, errors, module)
                    elif name in model.tensor_shard:
                        stored = np.asarray(model.tensor(name))
                        if got is None or not same_bits(got, stored.astype(np.float32)):
                            raise SourceError("compressed-tensors reads this plain tensor back differently",
                                              file=str(path), tensor=name)
    missing = sorted(set(schemes) - seen)
    if missing:
        raise SourceError(f"compressed-tensors did not decompress {len(missing)} module(s) its config targets "
                          f"(first: {missing[0]})", file=str(folder / "config.json"), tensor=missing[0])
    return errors


def _compare(path: Path, name: str, got: np.ndarray | None, reference: np.ndarray, requantized: bool,
             errors: dict[str, float], module: str) -> None:
    if got is None:
        raise SourceError("compressed-tensors decompressed this module to integers", file=str(path), tensor=name)
    if requantized:
        errors[module] = relative_error(got, reference)
        return
    if not same_bits(got, reference):
        diff = int(np.count_nonzero(np.asarray(got, np.float32).view(np.uint32)
                                    != np.asarray(reference, np.float32).view(np.uint32)))
        raise SourceError(f"compressed-tensors decompresses this module differently from the reference decode "
                          f"({diff} of {reference.size} values differ)", file=str(path), tensor=name,
                          field="weight_packed")


@hookimpl
def qformat_register_exporters(register: Any) -> None:
    register(CompressedTensorsExporter())


__all__ = ["CompressedTensorsExporter"]
