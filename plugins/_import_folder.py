"""A Hugging Face checkpoint folder as importers of quantized checkpoints read it: ``config.json`` (with the source
tool's ``quantization_config``), safetensors shards read one tensor at a time (memory-mapped), and the tokenizer and
generation files to carry over.

Shared by the folder importers (GPTQ, AWQ, compressed-tensors, bitsandbytes, HQQ, AQLM, BitNet). Every error is a
:class:`SourceError` naming the file and tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qformat.errors import FormatError, SourceError
from qformat.format.container import SIDE_FILES
from qformat.format.safetensors_io import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_SIDE_FILE = 64 << 20  # tokenizer files beyond this are not tokenizers


class CheckpointFolder:
    """``config`` (dict), ``quantization_config`` (dict or None), :meth:`names`, :meth:`read`, :meth:`files`."""

    file_class: type[SafetensorsFile] = SafetensorsFile  # the shard reader (a subclass may accept more dtypes)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except OSError as exc:
            raise SourceError(f"cannot read config.json: {exc.strerror or exc}", file=str(config_path)) from None
        except json.JSONDecodeError as exc:
            raise SourceError(f"config.json is not valid JSON: {exc}", file=str(config_path)) from None
        if not isinstance(self.config, dict):
            raise SourceError("config.json is not a JSON object", file=str(config_path))
        qconfig = self.config.get("quantization_config")
        self.quantization_config: dict[str, Any] | None = qconfig if isinstance(qconfig, dict) else None
        self._open: dict[str, SafetensorsFile] = {}
        self._where = self._locate_tensors()

    @staticmethod
    def quantization_config_of(path: Path) -> dict[str, Any] | None:
        """The ``quantization_config`` of a folder's config.json, or None (no file, not JSON, none): for ``detect``."""
        try:
            config = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError):
            return None
        qconfig = config.get("quantization_config") if isinstance(config, dict) else None
        return qconfig if isinstance(qconfig, dict) else None

    def _locate_tensors(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SourceError(f"bad safetensors index: {exc}", file=str(index)) from None
            for shard in set(weight_map.values()):
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                    raise SourceError(f"the index names a shard outside the folder: {shard!r}", file=str(index))
            return dict(weight_map)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise SourceError("no safetensors weights in the folder", file=str(self.path))
        where: dict[str, str] = {}
        for shard in shards:
            for name in self._file(shard).names():
                where.setdefault(name, shard)
        return where

    def _file(self, shard: str) -> SafetensorsFile:
        handle = self._open.get(shard)
        if handle is None:
            path = self.path / shard
            try:
                handle = self.file_class(path)
            except FormatError as exc:
                raise SourceError(f"unreadable safetensors shard: {exc}", file=str(path)) from None
            except OSError as exc:
                raise SourceError(f"cannot open: {exc.strerror or exc}", file=str(path)) from None
            self._open[shard] = handle
        return handle

    def names(self) -> list[str]:
        return sorted(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shard_of(self, name: str) -> str:
        return self._where[name]

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as stored (memory-mapped, read-only; BF16 as ml_dtypes.bfloat16)."""
        shard = self._where.get(name)
        if shard is None:
            raise SourceError("tensor not found in the checkpoint", file=str(self.path), tensor=name)
        handle = self._file(shard)
        try:
            return handle.get(name)
        except FormatError as exc:
            raise SourceError(f"unreadable tensor: {exc}", file=str(self.path / shard), tensor=name) from None

    def expect(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] | None = None) -> np.ndarray:
        """Tensor ``name``, checked to have ``shape`` (and a dtype among ``dtypes``, numpy names)."""
        array = self.read(name)
        if tuple(array.shape) != tuple(shape):
            raise SourceError(f"shape {list(array.shape)} where the config implies {list(shape)}",
                              file=str(self.path / self._where[name]), tensor=name, field="shape")
        if dtypes is not None and array.dtype.name not in dtypes:
            raise SourceError(f"dtype {array.dtype.name} where {' or '.join(dtypes)} is expected",
                              file=str(self.path / self._where[name]), tensor=name, field="dtype")
        return array

    def files(self) -> dict[str, bytes]:
        """Tokenizer, chat template and generation files (regular files in the folder; symlinks out are skipped)."""
        out: dict[str, bytes] = {}
        root = self.path.resolve()
        for name in SIDE_FILES:
            path = self.path / name
            if not path.is_file() or path.resolve().parent != root or path.stat().st_size > MAX_SIDE_FILE:
                continue
            out[name] = path.read_bytes()
        return out

    def plain_config(self) -> dict[str, Any]:
        """config.json without the source tool's ``quantization_config`` (the output gets qformat's)."""
        return {k: v for k, v in self.config.items() if k != "quantization_config"}

    def iter_names(self, prefix: str = "") -> Iterator[str]:
        return (n for n in self.names() if n.startswith(prefix))

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
