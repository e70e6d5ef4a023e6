"""compressed-tensors' ``quantization_config``: which scheme (``config_groups``) and which compression format apply
to a module, and which int32 packing its ``pack-quantized`` tensors use.

Formats are compressed-tensors' ``CompressionFormat`` names (``config/base.py``); a scheme's own ``format`` wins over
the top-level one (``mixed-precision`` checkpoints give every scheme its own), and where neither names one the stored
tensors tell (as ``compressors/format.py`` infers it when compressing).

Packing of ``pack-quantized`` (``compressors/pack_quantized/helpers.py``): up to 0.17.1 ``pack_to_int32`` put
``32 // b`` codes in each int32 and left the high bits unused; from 0.18.0 (commit 66e631f6, "CT support for humming",
2026-06-22) codes are a dense bit stream, 32 codes in exactly ``b`` words. The two agree bit for bit for b = 1, 2, 4
and 8 (the library's own ``test_power_of_2_bits_same_packed_output_as_old``). The library does not tell them apart:
0.18.0 and later read every checkpoint densely, so a 3/5/6/7-bit checkpoint written by 0.17.x (which allowed those
widths since commit 3f01c782, 2026-05-29) decodes wrongly there. This importer follows the writer: the config's
``version`` (the compressed-tensors version that wrote it, ``model_compressor.update_config``) below 0.18 means the
padded layout; without a version the tensor's word count decides where only one layout fits it, else the dense one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qformat.errors import SourceError

from ._import_bits import padded_words, stream_words

KNOWN_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask", "int-quantized", "float-quantized",
                 "naive-quantized", "pack-quantized", "marlin-24", "mixed-precision", "nvfp4-pack-quantized",
                 "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")
SUPPORTED_FORMATS = ("dense", "pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized",
                     "float-quantized", "naive-quantized", "int-quantized")
DENSE_SINCE = (0, 18)


@dataclass(frozen=True)
class Scheme:
    """One ``config_groups`` entry: its name, targets, weight arguments (QuantizationArgs as a dict) and format."""

    name: str
    targets: tuple[str, ...]
    weights: dict[str, Any] | None
    format: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int((self.weights or {}).get("num_bits") or 8)

    @property
    def kind(self) -> str:
        return str((self.weights or {}).get("type") or "int")

    @property
    def strategy(self) -> str:
        return str((self.weights or {}).get("strategy") or "tensor")

    @property
    def symmetric(self) -> bool:
        return (self.weights or {}).get("symmetric", True) is not False

    @property
    def group_size(self) -> int | None:
        value = (self.weights or {}).get("group_size")
        return int(value) if value is not None else None

    def describe(self, fmt: str) -> str:
        weights = self.weights or {}
        if not weights:
            return f"{fmt} (no weights)"
        size = f" {self.group_size}" if self.strategy in ("group", "tensor_group") and self.group_size else ""
        block = weights.get("block_structure")
        block = f" {block[0]}x{block[1]}" if self.strategy == "block" and block else ""
        symmetric = "" if fmt != "pack-quantized" and self.symmetric else " sym" if self.symmetric else " asym"
        return f"{fmt} {self.kind}{self.bits} {self.strategy}{size}{block}{symmetric}"


@dataclass(frozen=True)
class CTConfig:
    schemes: tuple[Scheme, ...]
    format: str | None
    version: tuple[int, ...] | None
    version_text: str | None
    ignore: tuple[str, ...]


def ct_quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The compressed-tensors config of a config.json: ``quantization_config``, or the older ``compression_config``
    (with its own nested ``quantization_config`` in early versions)."""
    for key in ("quantization_config", "compression_config"):
        qc = config.get(key)
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "compressed-tensors":
            inner = qc.get("quantization_config")
            if "config_groups" not in qc and isinstance(inner, dict):
                return {**inner, "version": qc.get("version"), "quant_method": "compressed-tensors",
                        "sparsity_config": qc.get("sparsity_config")}
            return qc
    return None


def parse_version(text: Any) -> tuple[int, ...] | None:
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text)) if text is not None else None
    return tuple(int(part) for part in match.groups() if part is not None) if match else None


def check_format(fmt: str, where: str) -> None:
    if fmt in SUPPORTED_FORMATS or fmt == "mixed-precision":
        return
    if fmt in KNOWN_FORMATS:
        raise SourceError(f"compressed-tensors format {fmt!r} is not supported by this importer (supported: "
                          f"{', '.join(SUPPORTED_FORMATS)})", file=where, field="format")
    raise SourceError(f"unknown compressed-tensors format {fmt!r} (known formats: {', '.join(KNOWN_FORMATS)})",
                      file=where, field="format")


def parse(qc: dict[str, Any], where: str) -> CTConfig:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise SourceError("quantization_config.config_groups is not an object", file=where, field="config_groups")
    sparsity = qc.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
        check_format(str(sparsity["format"]), where)  # the sparse formats: named and refused
    if qc.get("transform_config"):
        raise SourceError("compressed-tensors transforms (transform_config: online rotations) are not supported",
                          file=where, field="transform_config")
    status = str(qc.get("quantization_status") or "compressed").lower()
    if status != "compressed":
        raise SourceError(f"quantization_status {status!r}: the weights are stored unquantized (only 'compressed' "
                          "checkpoints hold the integers to import)", file=where, field="quantization_status")
    schemes = []
    for name, raw in groups.items():
        if not isinstance(raw, dict):
            raise SourceError(f"config_groups.{name} is not an object", file=where, field="config_groups")
        targets = raw.get("targets") or []
        fmt = raw.get("format")
        if fmt is not None:
            check_format(str(fmt), where)
        weights = raw.get("weights")
        schemes.append(Scheme(str(name), tuple(str(t) for t in targets), weights if isinstance(weights, dict) else None,
                              str(fmt) if fmt else None))
    fmt = qc.get("format")
    if fmt is not None:
        check_format(str(fmt), where)
    version = qc.get("version")
    return CTConfig(tuple(schemes), str(fmt) if fmt else None, parse_version(version),
                    str(version) if version is not None else None, tuple(str(i) for i in qc.get("ignore") or ()))


def _target_rank(target: str, module: str) -> int:
    """How a target matches a module: 3 its exact name, 2 a ``re:`` pattern, 1 a class name that fits, 0 none."""
    if target == module:
        return 3
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    if "." in target:
        return 0
    if target == "Embedding":
        return 1 if module.endswith("embed_tokens") else 0
    if target.endswith("Linear"):
        return 1 if not module.endswith("embed_tokens") else 0
    return 0


def scheme_for(config: CTConfig, module: str, where: str) -> Scheme:
    """The scheme whose targets match ``module`` best (name, then pattern, then class), as compressed-tensors
    resolves overlapping targets; a single scheme with weights applies to every quantized module."""
    ranked = sorted(((max((_target_rank(t, module) for t in s.targets), default=0), i, s)
                     for i, s in enumerate(config.schemes) if s.weights), key=lambda r: (-r[0], r[1]))
    if ranked and ranked[0][0] > 0:
        return ranked[0][2]
    if len(ranked) == 1:
        return ranked[0][2]
    raise SourceError(f"no config group targets the quantized module {module}", file=where, tensor=module,
                      field="config_groups")


def module_format(config: CTConfig, scheme: Scheme, stored: dict[str, Any]) -> str:
    """The compression format of one module: the scheme's, the top-level one unless ``mixed-precision``, else what its
    stored tensors (name -> numpy array) are."""
    if scheme.format:
        return scheme.format
    if config.format and config.format != "mixed-precision":
        return config.format
    packed = stored.get("weight_packed")
    if packed is not None:
        if packed.dtype.name == "int32":
            return "pack-quantized"
        return "nvfp4-pack-quantized" if "weight_global_scale" in stored else "mxfp4-pack-quantized"
    weight = stored.get("weight")
    if weight is not None and weight.dtype.name.startswith("float8"):
        return "mxfp8-quantized" if scheme.group_size == 32 and stored["weight_scale"].dtype.name == "uint8" \
            else "float-quantized"
    return "int-quantized"


def int_layout(config: CTConfig, bits: int, cols: int, words: int) -> str:
    """``"stream"`` (0.18 and later) or ``"padded"`` (before) for a row of ``cols`` codes stored in ``words`` int32."""
    if bits in (1, 2, 4, 8):
        return "stream"  # the same bits either way
    if config.version is not None:
        return "padded" if config.version < DENSE_SINCE else "stream"
    if words == padded_words(cols, bits) != stream_words(cols, bits):
        return "padded"
    return "stream"
