"""What the importers of Hugging Face quantized folders (bitsandbytes, HQQ, AQLM, BitNet) share: which folder is
whose (``quant_method``), the tensors of each quantized module, the shapes the config implies, the base model named
by the model card, and the :class:`ImportedModel` with the bits the source spends on its quantized weights.

An importer plans one :class:`Planned` record per quantized module (the source tensors it consumes and how to build
the record); every tensor no plan consumes passes through as a plain array in its stored dtype.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformat.plugin import ImportedModel, QuantizedTensor, SourceError

from ._import_folder import CheckpointFolder

RECORD_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MAX_CARD = 1 << 20
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def quant_method_of(source: Path) -> tuple[str, dict[str, Any]] | None:
    """(lower-case ``quant_method``, ``quantization_config``) of a folder's config.json, or None (for ``detect``)."""
    source = Path(source)
    if not source.is_dir():
        return None
    qconfig = CheckpointFolder.quantization_config_of(source)
    method = qconfig.get("quant_method") if qconfig else None
    return (method.lower(), qconfig) if isinstance(method, str) and qconfig is not None else None


def detects_quant_method(source: Path, quant_method: str) -> bool:
    """``detect`` of an importer of folders whose config.json says ``quant_method``."""
    found = quant_method_of(source)
    return found is not None and found[0] == quant_method


def open_quantized_folder(source: Path) -> tuple[CheckpointFolder, dict[str, Any], str]:
    """The start of ``open``: (the folder, its ``quantization_config``, config.json's path for errors)."""
    folder = CheckpointFolder(Path(source))
    return folder, folder.quantization_config or {}, str(folder.path / "config.json")


def quantized_modules(folder: CheckpointFolder, marker: str, what: str, known: Iterable[str],
                      required: Iterable[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(prefix, tensors by suffix) of every module holding a ``<prefix>.<marker>`` tensor, in name order, each with
    no tensor outside ``known`` and every one of ``required``; a SourceError when there is none."""
    names = folder.names()
    prefixes = {n[: -len(marker) - 1] for n in names if n.endswith(f".{marker}")}
    if not prefixes:
        raise SourceError(f"no {what} modules ({marker} tensors) in the checkpoint", file=str(folder.path))
    for prefix, tensors in sorted(group_modules(names, prefixes).items()):
        refuse_unknown(folder, tensors, known, what)
        require(folder, tensors, prefix, *required)
        yield prefix, tensors


def where(folder: CheckpointFolder, name: str) -> str:
    return str(folder.path / folder.shard_of(name)) if folder.has(name) else str(folder.path)


def source_error(folder: CheckpointFolder, name: str, message: str, field: str | None = None) -> SourceError:
    return SourceError(message, file=where(folder, name), tensor=name, field=field)


def config_dtype(config: dict[str, Any], default: str = "F16") -> str:
    """The record dtype of the model's own dtype (``dtype``/``torch_dtype`` in config.json)."""
    value = config.get("dtype", config.get("torch_dtype"))
    return RECORD_DTYPES.get(value, default) if isinstance(value, str) else default


_SHAPES: dict[str, dict[str, tuple[int, ...]] | None] = {}


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of the unquantized transformers model ``config`` describes (built on the meta device), or
    None when transformers cannot build it (then only the source's own metadata is checked)."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _SHAPES:
        _SHAPES[key] = _build_shapes(config)
    return _SHAPES[key]


def _build_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    try:
        import torch
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_config = transformers.AutoConfig.for_model(**config)
            names = config.get("architectures") or []
            cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
            with torch.device("meta"):
                model = cls(hf_config) if cls is not None else transformers.AutoModelForCausalLM.from_config(hf_config)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}
    except Exception:  # any architecture transformers cannot build: the config check is skipped, not the import
        return None


def check_shape(folder: CheckpointFolder, shapes: dict[str, tuple[int, ...]] | None, weight: str,
                shape: tuple[int, ...], tensor: str, field: str = "shape") -> None:
    """``shape`` (what the source's tensors say of ``weight``) must be what the config implies."""
    want = shapes.get(weight) if shapes else None
    if want is not None and tuple(want) != tuple(shape):
        raise source_error(folder, tensor, f"{weight} is {list(shape)} in the checkpoint where the config implies "
                           f"{list(want)}", field)


def group_modules(names: Iterable[str], prefixes: Iterable[str]) -> dict[str, dict[str, str]]:
    """For each module prefix, its tensors by suffix (``{"weight": "m.weight", "weight.absmax": ...}``); a tensor
    belongs to the longest prefix it extends."""
    out: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = out.get(".".join(parts[:i]))
            if module is not None:
                module[".".join(parts[i:])] = name
                break
    return out


def refuse_unknown(folder: CheckpointFolder, tensors: dict[str, str], known: Iterable[str], what: str) -> None:
    extra = sorted(set(tensors) - set(known))
    if extra:
        raise source_error(folder, tensors[extra[0]], f"unknown {what} tensor {extra[0]!r}", extra[0])


def require(folder: CheckpointFolder, tensors: dict[str, str], prefix: str, *suffixes: str) -> None:
    for suffix in suffixes:
        if suffix not in tensors:
            raise SourceError(f"module {prefix} lacks its {suffix!r} tensor", file=str(folder.path),
                              tensor=f"{prefix}.{suffix}", field=suffix)


def card_base_model(path: Path) -> str | None:
    """``base_model`` of the folder's model card (README.md front matter: a string or the first of a list)."""
    card = Path(path) / "README.md"
    try:
        if not card.is_file() or card.stat().st_size > MAX_CARD:
            return None
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    lines = text[3:end if end > 0 else len(text)].splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"base_model\s*:\s*(.*)$", line)
        if not match:
            continue
        value = match.group(1).strip()
        if not value and i + 1 < len(lines):
            item = re.match(r"\s*-\s*(.+)$", lines[i + 1])
            value = item.group(1).strip() if item else ""
        value = value.strip("[]").split(",")[0].strip().strip("'\"")
        return value if _HUB_ID.fullmatch(value) else None
    return None


@dataclass
class Planned:
    """One record to build: its name, the source tensors it is made of, its weight count, and how to build it."""

    name: str
    sources: tuple[str, ...]
    weights: int
    build: Callable[[], QuantizedTensor]


def imported_model(folder: CheckpointFolder, planned: list[Planned], source_format: str,
                   details: dict[str, Any]) -> ImportedModel:
    """The model: records from ``planned``, every other tensor plain; source bits = stored bits of the planned
    records' source tensors per weight."""
    records = {p.name: p for p in planned}
    consumed = {s for p in planned for s in p.sources}
    plain = [n for n in folder.names() if n not in consumed]
    clash = sorted(records.keys() & set(plain))
    if clash:
        raise source_error(folder, clash[0], "the checkpoint holds both a quantized module and a plain tensor of "
                           "this name")
    stored = sum(folder.read(name).nbytes for name in consumed)
    weights = sum(p.weights for p in planned)
    order = sorted([*records, *plain])

    def tensors() -> Iterator[tuple[str, Any]]:
        for name in order:
            plan = records.get(name)
            yield name, plan.build() if plan is not None else folder.read(name)

    return ImportedModel(config=folder.plain_config(), tensors=tensors, source_format=source_format,
                         files=folder.files(), base_model=card_base_model(folder.path), details=details,
                         source_bits=stored * 8 / weights if weights else None)
