"""Importing a checkpoint another tool quantized: the importer plugin maps its stored integers, scales and tables onto
records; this module streams them into a qformat folder (shards, ``config.json``, tokenizer files, model card).

Peak memory is about one tensor: the importer yields tensors one at a time from a memory-mapped source, and a shard
is written once it holds :data:`SHARD_BYTES`. Every record is validated by the writer (the format's own checks) and,
with ``check=True`` (the default), decoded once by the reference decoder before the folder is put in place, so a
mapping error in an importer cannot leave a folder that loads but computes something else without a value check.
Nothing appears at ``out`` until the folder is complete (:class:`FolderWriter` swaps it into place).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConversionError, FormatError, SourceError
from ..format import FolderWriter, QuantizedTensor
from ..importers import ImportedModel, Importer

SHARD_BYTES = 2 << 30
_HUB_CACHE_DIR = re.compile(r"models--([A-Za-z0-9][\w.-]*)--([\w.-]+)")


@dataclass
class ImportResult:
    out: Path
    importer: str
    source_format: str
    records: int
    plain: int
    bits_per_weight: float | None
    source_bits: float | None
    seconds: float
    quantization_config: dict[str, Any] = field(default_factory=dict)


def choose_importer(source: Path, format: str | None = None) -> Importer:
    """The importer named ``format``, or the one that detects ``source``; a clear error when none does."""
    from ..plugins import detect_importer, get_importer, get_plugins

    if format is not None:
        return get_importer(format)
    found = detect_importer(source)
    if found is None:
        known = ", ".join(sorted(get_plugins().importers)) or "none installed"
        raise ConversionError(f"{source} is not a checkpoint any installed importer reads (importers: {known}); "
                              "a plain Hugging Face model is converted with a method, e.g. --method rtn")
    return found


def import_checkpoint(source: str | Path, out: str | Path, *, format: str | None = None,
                      base_model: str | None = None, overwrite: bool = False, quiet: bool = True,
                      check: bool = True, resolve: Callable[[str], Path] | None = None,
                      command: str | None = None, gguf_file: str | None = None) -> ImportResult:
    """Import ``source`` (a file, a folder, or a Hub id when ``resolve`` downloads it) into the folder ``out``.

    ``gguf_file``: the file of a folder or Hub repo of several GGUF files to import (for a Hub id, ``resolve`` is the
    one that downloads it); the lineage records it beside the repo id."""
    start = time.perf_counter()
    text = str(source)
    path = Path(text).expanduser()
    out = Path(out)
    if path.exists():
        path = _chosen_file(path, gguf_file) if gguf_file is not None else path
    else:
        if resolve is None:
            raise ConversionError(f"{text} does not exist")
        _refuse_unwritable_output(out, overwrite)  # before the download, not after it
        path = resolve(text)
    importer = choose_importer(path, format)
    model = importer.open(path)
    lineage = base_model or model.base_model or hub_id_from_cache_path(path)
    hub_id = text if not Path(text).expanduser().exists() and resolve is not None else None
    try:
        writer = FolderWriter(out, overwrite=overwrite)
    except FormatError as exc:
        raise ConversionError(str(exc)) from None
    counts = _write_shards(writer, model, importer, path, check, quiet)
    origin = _origin(hub_id, gguf_file, path)
    qconfig = _quantization_config(importer, model, path, origin, lineage, counts,
                                   command or _command(importer, hub_id or Path(text).expanduser().name, out, format,
                                                      base_model, origin.file))
    config = dict(model.config)
    config.pop("quantization_config", None)
    card = _model_card(config, qconfig, counts["records_json"])
    extra = {"README.md": card} if card else {}
    files = {name: data for name, data in model.files.items() if name != "README.md"}
    try:
        staged = _stage_files(writer.work_dir, files)
        writer.finalize(config, qconfig, staged, extra)
    except FormatError as exc:
        raise ConversionError(str(exc)) from None
    records = counts["records_json"]
    from ..format import total_bits_per_weight

    bits = total_bits_per_weight(records.values()) if records else None
    return ImportResult(out, importer.name, model.source_format, len(records), counts["plain"], bits,
                        model.source_bits, time.perf_counter() - start, qconfig)


def _chosen_file(folder: Path, name: str) -> Path:
    """The file ``name`` of a local folder (``gguf_file=`` picks one of several GGUF files)."""
    if not folder.is_dir():
        raise ConversionError(f"gguf_file picks a file in a folder or Hub repository, but {folder} is a file")
    chosen = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not chosen.is_file():
        held = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".gguf")
        raise ConversionError(f"gguf_file {name!r} is not a file in {folder}; its .gguf files: "
                              f"{', '.join(held) or 'none'}")
    return chosen


def _refuse_unwritable_output(out: Path, overwrite: bool) -> None:
    """The output checks of :class:`FolderWriter`, made before a download (the writer is created after it)."""
    from ..format.container import output_replace_problem

    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise ConversionError(str(FormatError("output_exists", "the output folder exists; choose another or pass "
                                              "overwrite", file=str(out))))
    problem = output_replace_problem(out)
    if problem is not None:
        raise ConversionError(str(FormatError("output_exists", f"{problem}; only a qformat output folder is ever "
                                              "replaced: choose another output or remove it yourself",
                                              file=str(out))))


def _stage_files(work_dir: Path, files: Mapping[str, bytes]) -> list[Path]:
    """Side files (tokenizer, generation config) written into the work folder so the writer copies them in place."""
    staged = []
    folder = work_dir / "side-files"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ConversionError(f"importer returned an unsafe file name {name!r}")
        target = folder / name
        target.write_bytes(data)
        staged.append(target)
    return staged


def _write_shards(writer: FolderWriter, model: ImportedModel, importer: Importer, path: Path, check: bool,
                  quiet: bool) -> dict[str, Any]:
    plain: dict[str, np.ndarray] = {}
    records: list[QuantizedTensor] = []
    records_json: dict[str, dict] = {}
    size = 0
    index = 0
    plain_count = 0
    seen: set[str] = set()
    progress = None if quiet else _progress(path)

    def flush() -> None:
        nonlocal plain, records, size, index
        if not plain and not records:
            return
        try:
            writer.write_shard(index, plain, records)
        except FormatError as exc:
            raise ConversionError(f"importer {importer.name!r} produced an invalid record: {exc}") from None
        index += 1
        plain, records, size = {}, [], 0

    try:
        for name, value in model.iter_tensors():
            if name in seen:
                raise ConversionError(f"importer {importer.name!r} returned tensor {name!r} twice")
            seen.add(name)
            if isinstance(value, QuantizedTensor):
                if value.name != name:
                    raise ConversionError(f"importer {importer.name!r} returned record {value.name!r} as {name!r}")
                if check:
                    _check_decodes(value, importer)
                records.append(value)
                records_json[name] = value.record
                size += sum(int(a.nbytes) for a in value.tensors.values())
            else:
                array = np.asarray(value)
                plain[name] = array
                plain_count += 1
                size += int(array.nbytes)
            if progress is not None:
                progress.update(1)
            if size >= SHARD_BYTES:
                flush()
        flush()
    finally:
        if progress is not None:
            progress.close()
    if index == 0:
        raise SourceError("the source holds no tensors", file=str(path))
    return {"records_json": records_json, "plain": plain_count, "shards": index}


def _check_decodes(record: QuantizedTensor, importer: Importer) -> None:
    """Decode once with the reference decoder: every data check of the spec (code ranges, padding, indices) runs."""
    try:
        record.decode()
    except FormatError as exc:
        raise ConversionError(f"importer {importer.name!r}: record {record.name!r} does not decode: {exc}") from None


def _progress(path: Path) -> Any:
    from tqdm import tqdm

    return tqdm(desc=f"importing {path.name}", unit=" tensors", leave=False)


def hub_id_from_cache_path(path: Path) -> str | None:
    """``org/name`` when ``path`` lies inside a Hugging Face cache folder ``models--org--name/snapshots/...``."""
    for part in Path(path).resolve().parts:
        match = _HUB_CACHE_DIR.fullmatch(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def snapshot_location(path: Path) -> tuple[str, str] | None:
    """(commit, path inside the repo) when ``path`` lies in a Hugging Face cache snapshot
    ``models--org--name/snapshots/<commit>/...``, else None."""
    parts = Path(path).absolute().parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and _HUB_CACHE_DIR.fullmatch(parts[i - 1]):
            return parts[i + 1], "/".join(parts[i + 2:])
    return None


@dataclass(frozen=True)
class _Origin:
    """Where an import came from: the Hub repo, the file of it that was imported, the commit."""

    hub_id: str | None
    file: str | None
    revision: str | None


def _origin(hub_id: str | None, gguf_file: str | None, path: Path) -> _Origin:
    """A Hub source names its commit, and the file it was imported from when that is one file (a GGUF repo's)."""
    where = snapshot_location(path) if hub_id else None
    if where is None:
        return _Origin(hub_id, gguf_file, None)
    commit, inside = where
    return _Origin(hub_id, gguf_file or (inside if inside and path.is_file() else None), commit)


def _quantization_config(importer: Importer, model: ImportedModel, path: Path, origin: _Origin,
                         base_model: str | None, counts: Mapping[str, Any], command: str) -> dict[str, Any]:
    from ..format import iter_nodes
    from ..plugins import get_plugins
    from ..version import __version__

    plugins = get_plugins()
    owner = plugins.importer_owner.get(importer.name)
    info = plugins.info.get(owner) if owner else None
    records = counts["records_json"]
    source: dict[str, Any] = {"id": origin.hub_id or path.name, "format": model.source_format}
    if origin.hub_id is None:
        source["local"] = True
    if origin.file is not None:
        source["file"] = origin.file
    if origin.revision is not None:
        source["revision"] = origin.revision
    if model.source_bits is not None:
        source["bits_per_weight"] = round(float(model.source_bits), 4)
    if model.details:
        source["details"] = json.loads(json.dumps(model.details, default=str))
    qconfig: dict[str, Any] = {
        "method": "import", "method_params": {"format": importer.name},
        "importer_plugin": f"{info.package} {info.version}" if info else importer.name,
        "source": source, "quantized_modules": sorted(n.rsplit(".", 1)[0] for n in records),
        "qformat_version": __version__, "command": command,
    }
    if base_model:
        qconfig["base_model"] = base_model
    used = {node["codec"] for record in records.values() for node in iter_nodes(record["weight"])}
    providers = {}
    for codec in sorted(used):
        codec_owner = plugins.codec_owner.get(codec)
        if codec_owner is not None:
            owner_info = plugins.info[codec_owner]
            providers[codec] = f"{owner_info.package}>={owner_info.version}"
    if providers:
        qconfig["codec_providers"] = providers
    return qconfig


def _command(importer: Importer, source: str, out: Path, format: str | None, base_model: str | None,
             gguf_file: str | None) -> str:
    parts = ["qformat convert --method import", source, f"--out {out.name}"]
    if format:
        parts.append(f"-p format={importer.name}")
    if gguf_file:
        parts.append(f"-p gguf_file={gguf_file}")
    if base_model:
        parts.append(f"--base-model {base_model}")
    return " ".join(parts)


def _model_card(config: dict[str, Any], qconfig: dict[str, Any], records: Mapping[str, dict]) -> str | None:
    try:
        from ..model_card import render_model_card
    except ImportError:
        return None
    from ..format import FORMAT_VERSION
    from ..format.container import QUANT_METHOD, rounded_bits

    full = {**config, "quantization_config": {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                              **qconfig, "bits_per_weight": rounded_bits(records.values())}}
    return render_model_card(full)
