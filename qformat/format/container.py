"""The container: a Hugging Face-style model folder holding qformat shards (spec/container.md).

    <folder>/config.json                          with quantization_config.quant_method == "qformat"
    <folder>/model-00001-of-0000N.safetensors     qformat files (records in each shard's metadata)
    <folder>/model.safetensors.index.json         weight_map: every stored tensor -> its shard
    <folder>/tokenizer files, generation_config.json, README.md (copied / generated)

Writing goes to a work folder first (shard by shard, each shard atomic) and the finished folder is moved into place
in one rename, so a failure never leaves a half-written output and never touches an existing one. A kill during that
move can leave ``<out>.old``; the next writer for the same output recovers it (:func:`recover_interrupted_swap`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .codecs import REGISTRY, CodecRegistry
from .qfile import QFile, QuantizedTensor, write_file
from .record import FORMAT_VERSION, bits_per_weight
from .safetensors_io import parse_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
QUANT_METHOD = "qformat"
MAX_JSON_BYTES = 64 * 1024 * 1024


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FormatError("limit_exceeded", f"JSON file over {MAX_JSON_BYTES} bytes", file=str(path))
        return parse_json(path.read_bytes(), path.name, str(path))
    except OSError as exc:
        raise FormatError("unreadable", f"cannot read: {exc.strerror or exc}", file=str(path)) from None


def _check_quantization_config(config: dict, path: Path) -> None:
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise FormatError("bad_config", "config.json needs quantization_config.quant_method == 'qformat' (is this a "
                          "qformat model folder?)", file=str(path), field="quantization_config.quant_method")
    version = qconfig.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise FormatError("unsupported_format_version", f"format_version {version!r} is not supported (this reader "
                          f"knows {FORMAT_VERSION})", file=str(path), field="quantization_config.format_version")


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class ModelFolder:
    """A model folder (or a single qformat file) opened for reading; shards are opened lazily."""

    def __init__(self, path: str | os.PathLike, registry: CodecRegistry = REGISTRY) -> None:
        self.path = Path(path)
        self.registry = registry
        self.config: dict[str, Any] = {}
        self.weight_map: dict[str, str] | None = None
        if self.path.is_file():
            self.root = self.path.parent
            shard_files = [self.path.name]
        elif self.path.is_dir():
            self.root = self.path
            config_path = self.path / "config.json"
            if config_path.exists():
                self.config = read_json(config_path)
                if not isinstance(self.config, dict):
                    raise FormatError("bad_config", "config.json must be a JSON object", file=str(config_path))
                _check_quantization_config(self.config, config_path)
            shard_files = self._shard_files()
        else:
            raise FormatError("unreadable", "no such file or folder", file=str(self.path))
        self._files: dict[str, QFile] = {}
        self.shards = shard_files
        self.record_shard: dict[str, str] = {}
        self.tensor_shard: dict[str, str] = {}
        for shard in shard_files:
            qfile = self.file(shard)
            for name in qfile.records:
                self._claim(name, shard)
                self.record_shard[name] = shard
            for name in qfile.plain_names:
                self._claim(name, shard)
                self.tensor_shard[name] = shard

    def _claim(self, name: str, shard: str) -> None:
        other = self.record_shard.get(name) or self.tensor_shard.get(name)
        if other is not None:
            raise FormatError("duplicate_name", f"{name!r} appears in {other!r} and {shard!r}", file=str(self.root),
                              tensor=name)

    def _shard_files(self) -> list[str]:
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise FormatError("bad_index", "weight_map must map tensor names to shard file names",
                                  file=str(index_path), field="weight_map")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise FormatError("bad_index", f"shard name {shard!r} must be a plain file name",
                                      file=str(index_path), field="weight_map")
                if not (self.path / shard).is_file():
                    raise FormatError("missing_shard", f"shard {shard!r} named by the index is missing",
                                      file=str(index_path))
            self.weight_map = weight_map
            return shards
        if (self.path / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        raise FormatError("missing_shard", f"no {INDEX_NAME} or {SINGLE_NAME} in the folder", file=str(self.path))

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def quantization_config(self) -> dict[str, Any]:
        return self.config.get("quantization_config") or {}

    def file(self, shard: str) -> QFile:
        if shard not in self._files:
            self._files[shard] = QFile(self.root / shard, self.registry)
        return self._files[shard]

    @property
    def records(self) -> dict[str, dict]:
        return {name: self.file(shard).records[name] for name, shard in self.record_shard.items()}

    @property
    def plain_names(self) -> list[str]:
        return list(self.tensor_shard)

    def tensor(self, name: str) -> np.ndarray:
        return self.file(self._shard_of(name)).tensor(name)

    def decode(self, name: str, **options: Any) -> np.ndarray:
        return self.file(self._shard_of(name)).decode(name, **options)

    def quantized(self, name: str) -> QuantizedTensor:
        return self.file(self.record_shard[name]).quantized(name)

    def _shard_of(self, name: str) -> str:
        shard = self.record_shard.get(name) or self.tensor_shard.get(name)
        if shard is None:
            raise FormatError("missing_tensor", f"{name!r} is neither a record nor a tensor", file=str(self.root),
                              tensor=name)
        return shard

    def iter_weights(self) -> Iterator[str]:
        yield from self.record_shard
        yield from self.tensor_shard

    def close(self) -> None:
        for qfile in self._files.values():
            qfile.close()


def open_folder(path: str | os.PathLike, registry: CodecRegistry = REGISTRY) -> ModelFolder:
    return ModelFolder(path, registry)


def verify_folder(path: str | os.PathLike, *, deep: bool = True) -> dict[str, Any]:
    """Validate a folder: structure, checksums recorded at write time, index coverage, and (deep) every decode.

    Returns a summary; raises FormatError on the first problem.
    """
    folder = open_folder(path)
    root = folder.root
    qconfig = folder.quantization_config
    files = qconfig.get("files") or {}
    if folder.path.is_dir():
        if not isinstance(files, dict) or set(files) != set(folder.shards):
            raise FormatError("checksum_mismatch", "quantization_config.files must list exactly the shards "
                              f"{sorted(folder.shards)}", file=str(root / "config.json"), field="quantization_config.files")
    checked = 0
    for shard, expected in files.items():
        if not isinstance(expected, dict):
            raise FormatError("bad_config", "each files entry must be an object with sha256 and size",
                              file=str(root / "config.json"), field=f"quantization_config.files.{shard}")
        target = root / shard
        size = target.stat().st_size if target.exists() else None
        if size != expected.get("size"):
            raise FormatError("checksum_mismatch", f"size is {size}, config.json records {expected.get('size')}",
                              file=str(target))
        actual = sha256_file(target)
        if actual != expected.get("sha256"):
            raise FormatError("checksum_mismatch", f"sha256 is {actual}, config.json records "
                              f"{expected.get('sha256')}", file=str(target))
        checked += 1
    if folder.weight_map is not None:
        stored = {n: s for s in folder.shards for n in folder.file(s).st.entries}
        for name, shard in stored.items():
            if folder.weight_map.get(name) != shard:
                raise FormatError("bad_index", f"tensor is in {shard!r} but the index says "
                                  f"{folder.weight_map.get(name)!r}", file=str(root / INDEX_NAME), tensor=name)
        extra = sorted(set(folder.weight_map) - set(stored))
        if extra:
            raise FormatError("bad_index", "the index names a tensor no shard holds", file=str(root / INDEX_NAME),
                              tensor=extra[0])
    if deep:
        for name in folder.records:
            folder.decode(name)
    records = folder.records
    total_bits = sum(r["storage_bytes"] * 8 for r in records.values())
    total_weights = sum(int(np.prod(r["shape"])) for r in records.values())
    folder.close()
    return {"shards": len(folder.shards), "records": len(records), "plain": len(folder.plain_names),
            "checksums_verified": checked, "bits_per_weight": total_bits / total_weights if total_weights else None}


class FolderWriter:
    """Writes a model folder shard by shard into ``work_dir``; :meth:`finalize` moves it to ``out_dir`` atomically.

    Shards already present in ``work_dir`` (from an interrupted run) are kept, so a caller can resume.
    """

    def __init__(self, out_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None,
                 overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        recover_interrupted_swap(self.out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FormatError("output_exists", "the output folder exists; choose another or pass overwrite",
                              file=str(self.out_dir))
        self.overwrite = overwrite
        self.work_dir = Path(work_dir) if work_dir else self.out_dir.with_name(self.out_dir.name + ".partial")
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def shard_path(self, index: int) -> Path:
        return self.work_dir / f"shard-{index:05d}.safetensors"

    def has_shard(self, index: int) -> bool:
        return self.shard_path(index).is_file()

    def write_shard(self, index: int, plain: Mapping[str, np.ndarray] | None = None,
                    quantized: Iterable[QuantizedTensor] = ()) -> Path:
        return write_file(self.shard_path(index), plain, quantized)

    def finalize(self, config: Mapping[str, Any], quantization_config: Mapping[str, Any],
                 copy_files: Iterable[Path] = (), extra_files: Mapping[str, str] | None = None) -> Path:
        shards = sorted(self.work_dir.glob("shard-*.safetensors"))
        if not shards:
            raise FormatError("missing_shard", "nothing was written", file=str(self.work_dir))
        staging = self.work_dir / "final"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        weight_map: dict[str, str] = {}
        files: dict[str, dict[str, Any]] = {}
        total_size = 0
        record_bits: list[tuple[str, dict]] = []
        for i, shard in enumerate(shards, start=1):
            name = shard_name(i, len(shards))
            os.link(shard, staging / name) if _same_device(shard, staging) else shutil.copy2(shard, staging / name)
            qfile = QFile(staging / name)
            for tensor in qfile.st.entries:
                weight_map[tensor] = name
            record_bits.extend(qfile.records.items())
            total_size += (staging / name).stat().st_size
            files[name] = {"sha256": sha256_file(staging / name), "size": (staging / name).stat().st_size}
            qfile.close()
        index = {"metadata": {"total_size": total_size, "format": "qformat"},
                 "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        qconfig = {**quantization_config, "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                   "bits_per_weight": _overall_bits(record_bits),
                   "bits_by_layer_type": bits_by_layer_type(dict(record_bits)), "files": files}
        full_config = {**config, "quantization_config": qconfig}
        (staging / "config.json").write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
        for path in copy_files:
            shutil.copy2(path, staging / Path(path).name)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        self._swap_into_place(staging)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.out_dir

    def _swap_into_place(self, staging: Path) -> None:
        # A kill between the two renames leaves only <out>.old; recover_interrupted_swap puts it back next time.
        recover_interrupted_swap(self.out_dir)
        backup = None
        if self.out_dir.exists():
            backup = _backup_of(self.out_dir)
            os.replace(self.out_dir, backup)
        os.replace(staging, self.out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _backup_of(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".old")


def recover_interrupted_swap(out_dir: str | os.PathLike) -> None:
    """Undo what a finalize killed midway leaves behind, never dropping the only copy of an output.

    Only ``<out>.old`` (killed between the two renames): it is the previous output; rename it back. Both (killed while
    deleting the backup): the stale backup is removed only when ``<out>`` is a complete folder; otherwise nothing is
    touched and ``output_exists`` asks the user to choose, since either may be the copy they want.
    """
    out_dir = Path(out_dir)
    backup = _backup_of(out_dir)
    if not backup.is_dir():
        return
    if not out_dir.exists():
        os.replace(backup, out_dir)
    elif _is_complete(out_dir):
        shutil.rmtree(backup)
    else:
        raise FormatError("output_exists", f"the output folder is incomplete and {backup.name} (left by an interrupted "
                          "write) also exists; keep the one you want under the output name and remove the other",
                          file=str(out_dir))


def _is_complete(folder_path: Path) -> bool:
    """The folder opens and holds every shard its config lists, at the recorded size (a cheap check: no hashing)."""
    try:
        folder = open_folder(folder_path)
    except (FormatError, OSError):
        return False
    try:
        files = folder.quantization_config.get("files")
        return isinstance(files, dict) and folder.path.is_dir() and set(files) == set(folder.shards) and all(
            isinstance(entry, dict) and (folder.root / shard).stat().st_size == entry.get("size")
            for shard, entry in files.items())
    finally:
        folder.close()


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _overall_bits(records: list[tuple[str, dict]]) -> float | None:
    weights = sum(int(np.prod(r["shape"])) for _, r in records)
    return round(sum(r["storage_bytes"] * 8 for _, r in records) / weights, 4) if weights else None


def bits_by_layer_type(records: Mapping[str, dict]) -> dict[str, float]:
    """Bits per weight grouped by the module's last name part (q_proj, down_proj, ...)."""
    totals: dict[str, list[int]] = {}
    for name, record in records.items():
        parts = name.split(".")
        kind = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
        acc = totals.setdefault(kind, [0, 0])
        acc[0] += record["storage_bytes"] * 8
        acc[1] += int(np.prod(record["shape"]))
    return {k: round(bits / n, 4) for k, (bits, n) in sorted(totals.items())}


__all__ = ["FolderWriter", "ModelFolder", "bits_by_layer_type", "bits_per_weight", "open_folder", "sha256_file",
           "verify_folder"]
