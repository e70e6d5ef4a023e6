"""The container: a Hugging Face-style model folder holding qformat shards (spec/container.md).

    <folder>/config.json                          with quantization_config.quant_method == "qformat"
    <folder>/model-00001-of-0000N.safetensors     qformat files (records in each shard's metadata)
    <folder>/model.safetensors.index.json         weight_map: every stored tensor -> its shard
    <folder>/tokenizer files, generation_config.json, README.md (copied / generated)

Writing goes to a work folder first (shard by shard, each shard atomic) and the finished folder is moved into place
in one rename, so a failure never leaves a half-written output and never touches an existing one. A kill during that
move can leave ``<out>.old``; the next writer for the same output recovers it (:func:`recover_interrupted_swap`).
The writer deletes or moves only folders it can prove it wrote (see "what qformat may delete or move" below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, shorten
from .codecs import CORE_CODECS, CodecRegistry
from .qfile import QFile, QuantizedTensor, write_file
from .record import FORMAT_VERSION, bits_per_weight, total_bits_per_weight
from .safetensors_io import parse_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
QUANT_METHOD = "qformat"
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_NAME_BYTES = 255  # longer file names cannot be created on common file systems


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file of at most MAX_JSON_BYTES. Only regular files: a FIFO would block forever and a device (a link to
    /dev/zero) would be read without end, so the size is checked on the open descriptor and the read is bounded."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError("unreadable", "not a regular file", file=str(path))
            data = handle.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise FormatError("unreadable", f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    if len(data) > MAX_JSON_BYTES:
        raise FormatError("limit_exceeded", f"JSON file over {MAX_JSON_BYTES} bytes", file=str(path))
    return parse_json(data, path.name, str(path))


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

    def __init__(self, path: str | os.PathLike, registry: CodecRegistry = CORE_CODECS) -> None:
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
                if "/" in shard or "\\" in shard or "\0" in shard or shard.startswith("."):
                    raise FormatError("bad_index", f"shard name {shorten(repr(shard))} must be a plain file name",
                                      file=str(index_path), field="weight_map")
                if len(shard.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                    raise FormatError("bad_index", f"shard name {shorten(repr(shard))} is longer than the "
                                      f"{MAX_NAME_BYTES} bytes file systems allow", file=str(index_path),
                                      field="weight_map")
                if not _is_file(self.path / shard):
                    raise FormatError("missing_shard", f"shard {shorten(repr(shard))} named by the index is missing",
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

    def check(self, name: str, **options: Any) -> None:
        """Every check of :meth:`decode` on a record, without keeping its weight."""
        self.file(self.record_shard[name]).check(name, **options)

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


def _is_file(path: Path) -> bool:
    """Whether a regular file is there; a name the system cannot even look up (too long) is not one."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def open_folder(path: str | os.PathLike, registry: CodecRegistry = CORE_CODECS) -> ModelFolder:
    return ModelFolder(path, registry)


def verify_folder(path: str | os.PathLike, *, deep: bool = True,
                  registry: CodecRegistry = CORE_CODECS) -> dict[str, Any]:
    """Validate a folder: structure, checksums recorded at write time, index coverage, and (deep) every decode.

    A folder must have ``config.json`` with ``quantization_config.files`` (``bad_config`` otherwise: without it there
    is nothing to check the shards against). A single file carries no checksums: its structure and data are checked
    and the summary says ``checksums_available: False``. Deep verification checks one record at a time, by row
    ranges, without keeping decoded weights, and unmaps each shard after each record, so memory stays bounded by
    the largest record's working set, not the model size. Returns a summary; raises FormatError on the first problem.
    ``registry``: the codecs to read with (default the core codecs; pass ``get_plugins().codecs`` for plugin codecs).
    """
    folder = open_folder(path, registry)
    try:
        return _verify(folder, deep)
    finally:
        folder.close()


def _verify(folder: ModelFolder, deep: bool) -> dict[str, Any]:
    root = folder.root
    config_path = root / "config.json"
    is_folder = folder.path.is_dir()
    checked = 0
    if is_folder:
        if not config_path.is_file():
            raise FormatError("bad_config", "the folder has no config.json: a model folder needs one, and its "
                              "quantization_config.files holds the shard checksums to verify against",
                              file=str(config_path))
        files = folder.quantization_config.get("files")
        if not isinstance(files, dict):
            raise FormatError("bad_config", "quantization_config.files (each shard's sha256 and size) is missing or "
                              "not an object: the shards cannot be checked", file=str(config_path),
                              field="quantization_config.files")
        if set(files) != set(folder.shards):
            raise FormatError("checksum_mismatch", "quantization_config.files must list exactly the shards "
                              f"{sorted(folder.shards)}", file=str(config_path), field="quantization_config.files")
        for shard, expected in files.items():
            if not isinstance(expected, dict):
                raise FormatError("bad_config", "each files entry must be an object with sha256 and size",
                                  file=str(config_path), field=f"quantization_config.files.{shard}")
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
        for shard in folder.shards:
            qfile = folder.file(shard)
            for name in qfile.records:
                qfile.check(name)
                qfile.close()  # unmap: the pages this record touched leave the process (they stay in the page cache)
    records = folder.records
    return {"shards": len(folder.shards), "records": len(records), "plain": len(folder.plain_names),
            "checksums_verified": checked, "checksums_available": is_folder,
            "bits_per_weight": total_bits_per_weight(records.values())}


class FolderWriter:
    """Writes a model folder shard by shard into ``work_dir``; :meth:`finalize` moves it to ``out_dir`` atomically.

    Shards already present in ``work_dir`` (from an interrupted run) are kept, so a caller can resume. The work folder
    carries :data:`RUN_MARKER`; a work folder without it (not made by qformat) is refused unless empty. With
    ``overwrite``, an existing ``out_dir`` is replaced only when it is provably a qformat output
    (:func:`output_replace_problem`): a folder holding anything else is never deleted. ``registry``: the codecs the
    shards are read back with (plugin codecs need the plugin set's).
    """

    def __init__(self, out_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None,
                 overwrite: bool = False, registry: CodecRegistry = CORE_CODECS) -> None:
        self.out_dir = Path(out_dir)
        self.registry = registry
        recover_interrupted_swap(self.out_dir, registry)
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not overwrite:
                raise FormatError("output_exists", "the output folder exists; choose another or pass overwrite",
                                  file=str(self.out_dir))
            _check_replaceable(self.out_dir)
        self.overwrite = overwrite
        self.work_dir = Path(work_dir) if work_dir else self.out_dir.with_name(self.out_dir.name + ".partial")
        self.run_id = claim_work_dir(self.work_dir, self.out_dir)

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
            qfile = QFile(staging / name, self.registry)
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
                   "bits_per_weight": rounded_bits(r for _, r in record_bits),
                   "bits_by_layer_type": bits_by_layer_type(dict(record_bits)), "files": files}
        full_config = {**config, "quantization_config": qconfig}
        (staging / "config.json").write_text(json.dumps(full_config, indent=2, sort_keys=True) + "\n")
        for path in copy_files:
            shutil.copy2(path, staging / Path(path).name)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        self._swap_into_place(staging)
        with contextlib.suppress(OSError, FormatError):  # the output is in place; leftovers are finished next time
            remove_marked_folder(self.work_dir)
        return self.out_dir

    def _swap_into_place(self, staging: Path) -> None:
        # A kill between the two renames leaves only <out>.old; recover_interrupted_swap puts it back next time. The
        # previous output is marked as this run's backup first: only a marked <out>.old is ever restored or deleted.
        recover_interrupted_swap(self.out_dir, self.registry)
        backup = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            _check_replaceable(self.out_dir)  # again: the folder may have changed since the writer was created
            backup = _backup_of(self.out_dir)
            _mark_as_backup(self.out_dir, self.out_dir.name, self.run_id)
            os.replace(self.out_dir, backup)
        os.replace(staging, self.out_dir)
        if backup is not None:
            with contextlib.suppress(OSError, FormatError):  # a marked leftover is removed by the next writer
                remove_marked_folder(backup)


# -- what qformat may delete or move ----------------------------------------------------------------------------
# qformat deletes or moves only folders it can prove it wrote: a work folder or a backup carrying RUN_MARKER (written
# by qformat when it creates them), or an output folder whose config.json says quant_method "qformat" and which holds
# nothing but the files a qformat output has. Finished outputs carry no marker (their file list is the model's).

RUN_MARKER = ".qformat-run.json"
# Files copied from the source next to the weights (tokenizer, chat template, generation config).
# A size-budget conversion's measurements and allocation (qformat.conversion.budget), kept for reuse.
ALLOCATION_NAME = "allocation.json"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "spiece.model",
              "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


def read_run_marker(folder: Path) -> dict[str, Any] | None:
    """The marker qformat put into ``folder`` (a real folder, not a link), or None."""
    path = folder / RUN_MARKER
    if folder.is_symlink() or path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("qformat"), str) else None


def _write_marker(folder: Path, marker: Mapping[str, Any]) -> None:
    tmp = folder / f"{RUN_MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dict(marker), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / RUN_MARKER)


def claim_work_dir(work_dir: Path, out_dir: Path) -> str:
    """Create ``work_dir`` with a marker, or adopt it when it carries one (a resumed run keeps its run id); a folder
    without the marker is adopted only when empty. Returns the run id."""
    if work_dir.is_symlink() or (work_dir.exists() and not work_dir.is_dir()):
        raise FormatError("output_exists", "the work folder is a symbolic link or not a folder; move it away",
                          file=str(work_dir))
    marker = read_run_marker(work_dir)
    if marker is not None and marker.get("qformat") == "work" and isinstance(marker.get("run"), str):
        return marker["run"]
    if work_dir.exists() and any(work_dir.iterdir()):
        raise FormatError("output_exists", f"the work folder exists and was not made by qformat (it has no "
                          f"{RUN_MARKER}); move it away or remove it", file=str(work_dir))
    work_dir.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(8)
    _write_marker(work_dir, {"qformat": "work", "out": out_dir.name, "run": run_id, "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return run_id


def remove_marked_folder(folder: Path) -> None:
    """Delete a folder qformat marked as its own; the marker goes last, so an interrupted delete leaves a folder
    that is still recognisably qformat's (and is finished next time) rather than anonymous leftovers."""
    if read_run_marker(folder) is None:
        raise FormatError("output_exists", f"refusing to delete a folder without {RUN_MARKER}", file=str(folder))
    for entry in folder.iterdir():
        if entry.name == RUN_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / RUN_MARKER).unlink()
    folder.rmdir()


def output_replace_problem(folder: Path) -> str | None:
    """Why ``folder`` may not be replaced as a qformat output (None when it may): it must be a real folder whose
    config.json has quantization_config.quant_method "qformat" and that holds only the files a qformat output has
    (config, index, the shards the config lists, README.md, tokenizer and generation files)."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    except FormatError:
        config = None
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        return f"{folder} is not a qformat output (no config.json with quantization_config.quant_method 'qformat')"
    shards = qconfig.get("files")
    known = {"config.json", INDEX_NAME, SINGLE_NAME, "README.md", RUN_MARKER, ALLOCATION_NAME, *SIDE_FILES,
             *(shards if isinstance(shards, dict) else ())}
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.is_symlink() or not p.is_file() or (p.name not in known and not p.name.startswith(
                         (".README.md.", f"{RUN_MARKER}."))))  # temp files of an interrupted card or marker write
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"{folder} holds files a qformat output does not have ({shown})"
    return None


def _check_replaceable(out_dir: Path) -> None:
    problem = output_replace_problem(out_dir)
    if problem is not None:
        raise FormatError("output_exists", f"{problem}; only a qformat output folder is ever replaced: choose "
                          "another output or remove it yourself", file=str(out_dir))
    backup = _backup_of(out_dir)
    if backup.exists() or backup.is_symlink():  # recover_interrupted_swap handled a backup of ours already
        raise FormatError("output_exists", f"{backup.name} exists and was not made by qformat; the output is moved "
                          "there while it is replaced, so move it away first", file=str(out_dir))


def _backup_of(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".old")


def _mark_as_backup(folder: Path, out_name: str, run_id: str) -> None:
    """Mark ``folder`` (an output about to be moved to ``<out>.old``) as qformat's backup of the output named
    ``out_name``: the proof recovery needs before it renames or deletes a ``.old``."""
    _write_marker(folder, {"qformat": "backup", "of": out_name, "run": run_id})


def _is_our_backup(backup: Path, out_dir: Path) -> bool:
    marker = read_run_marker(backup)
    return marker is not None and marker.get("qformat") == "backup" and marker.get("of") == out_dir.name


def recover_interrupted_swap(out_dir: str | os.PathLike, registry: CodecRegistry = CORE_CODECS) -> None:
    """Undo what a finalize killed midway leaves behind, never dropping the only copy of an output.

    Only a ``<out>.old`` marked as qformat's backup of this output is acted on; any other ``<out>.old`` is the user's
    and is left alone. Only the backup (killed between the two renames): it is the previous output; rename it back.
    Both (killed while deleting the backup): the backup is removed only when ``<out>`` is a complete folder;
    otherwise nothing is touched and ``output_exists`` asks the user to choose, since either may be the copy they
    want.
    """
    out_dir = Path(out_dir)
    backup = _backup_of(out_dir)
    if backup.is_symlink() or not backup.is_dir() or not _is_our_backup(backup, out_dir):
        return
    if not out_dir.exists() and not out_dir.is_symlink():
        os.replace(backup, out_dir)
        with contextlib.suppress(OSError):  # restored as it was before the swap marked it
            (out_dir / RUN_MARKER).unlink()
    elif _is_complete(out_dir, registry):
        remove_marked_folder(backup)
    else:
        raise FormatError("output_exists", f"the output folder is incomplete and {backup.name} (left by an interrupted "
                          "write) also exists; keep the one you want under the output name and remove the other",
                          file=str(out_dir))


def _is_complete(folder_path: Path, registry: CodecRegistry = CORE_CODECS) -> bool:
    """The folder opens and holds every shard its config lists, at the recorded size (a cheap check: no hashing)."""
    try:
        folder = open_folder(folder_path, registry)
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


def rounded_bits(records: Iterable[dict]) -> float | None:
    """Overall bits per weight as config.json and the model card record it (4 decimals)."""
    bits = total_bits_per_weight(records)
    return None if bits is None else round(bits, 4)


def layer_type(name: str) -> str:
    """A weight's layer type: its module's last name part (``...mlp.down_proj.weight`` -> ``down_proj``)."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


def bits_by_layer_type(records: Mapping[str, dict]) -> dict[str, float]:
    """Bits per weight grouped by layer type (q_proj, down_proj, ...)."""
    groups: dict[str, list[dict]] = {}
    for name, record in records.items():
        groups.setdefault(layer_type(name), []).append(record)
    return {kind: rounded_bits(group) for kind, group in sorted(groups.items())}


__all__ = ["FolderWriter", "ModelFolder", "bits_by_layer_type", "bits_per_weight", "open_folder", "sha256_file",
           "verify_folder"]
