"""The exporter contract: a plugin that writes a qformat model folder out in a format people deploy with (GGUF for
llama.cpp, compressed-tensors for vLLM), keeping the stored integers and scales, never dequantizing and re-quantizing
unless asked to. It is the mirror image of :mod:`qformat.importers`.

An exporter is registered like an importer (``qformat_register_exporters(register)``, an instance with a unique
``name``). ``qformat export --to NAME DIR OUT`` runs the exporter ``NAME`` on the qformat folder ``DIR``.

The rules an exporter keeps:

- **Exact, decided by construction and checked.** A record is written only in a target layout that expresses its
  tree exactly; before the output is put in place, every written tensor is dequantized by the target's own library
  (gguf-py's ``dequantize``, compressed-tensors' ``decompress``) and compared, bit for bit in fp32 (uint32 view),
  with the record's reference decode. A record no target layout expresses is *inexpressible*.
- **Inexpressible tensors.** Without ``allow_requant`` the export fails with :class:`InexpressibleError`, which lists
  every such tensor with its tree signature and the reason, before anything is written. With ``allow_requant`` those
  tensors alone are re-quantized from their reference decode by the target library's own quantizer, each with a
  :class:`RequantizedWarning` giving its relative error; they are listed in :attr:`ExportReport.tensors` with
  ``exact=False``.
- **Atomic output.** The output is written under a temporary name beside ``out`` and renamed into place once
  complete and verified (:func:`staged_output`); an error leaves nothing at ``out``. An existing ``out`` is refused.
- **Errors** name the folder or file, the tensor and the field (:class:`qformat.errors.ConversionError`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import ConversionError
from .format import CodecRegistry, ModelFolder, open_folder


class ExportWarning(UserWarning):
    """Something about an export the user should know (a tokenizer detail the target handles differently, ...)."""


class RequantizedWarning(ExportWarning):
    """A tensor was re-quantized (``allow_requant``) because the target cannot express its record exactly."""


@dataclass
class ExportedTensor:
    """One tensor as written: its qformat ``name``, its name in the output (``target``), the ``kind`` written
    (``"Q4_1"``, ``"F32"``, ``"pack-quantized int4 group 128 asym"``), whether it is ``exact`` (bit-identical
    reference decode) and, for a re-quantized one, its ``relative_error`` ``||got - ref|| / ||ref||``."""

    name: str
    target: str
    kind: str
    exact: bool = True
    relative_error: float | None = None


@dataclass
class ExportReport:
    """What an export wrote. ``details``: anything else worth telling (JSON-serialisable)."""

    exporter: str
    out: Path
    tensors: list[ExportedTensor]
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def emit(self, stacklevel: int = 3) -> None:
        """Issue the report's warnings as Python warnings: :class:`RequantizedWarning` for re-quantized tensors,
        :class:`ExportWarning` for the rest."""
        requantized = {t.name for t in self.requantized}
        for line in self.warnings:
            kind = RequantizedWarning if line.split(" ", 1)[0] in requantized else ExportWarning
            warnings.warn(line, kind, stacklevel=stacklevel)

    @property
    def requantized(self) -> list[ExportedTensor]:
        return [t for t in self.tensors if not t.exact]

    @property
    def kinds(self) -> dict[str, int]:
        return dict(Counter(t.kind for t in self.tensors).most_common())

    def as_dict(self) -> dict[str, Any]:
        return {"exporter": self.exporter, "out": str(self.out), "tensors": len(self.tensors),
                "exact": sum(t.exact for t in self.tensors), "kinds": self.kinds,
                "requantized": [{"name": t.name, "target": t.target, "kind": t.kind,
                                 "relative_error": t.relative_error} for t in self.requantized],
                "warnings": list(self.warnings), "seconds": round(self.seconds, 2), "details": self.details}


@dataclass(frozen=True)
class Inexpressible:
    """A tensor the target cannot hold exactly: its name, its tree signature and why."""

    name: str
    signature: str
    reason: str
    file: str | None = None


class InexpressibleError(ConversionError):
    """Some tensors of the folder cannot be expressed exactly in the target; lists every one of them."""

    def __init__(self, exporter: str, folder: str | os.PathLike, tensors: list[Inexpressible]) -> None:
        self.exporter, self.folder, self.tensors = exporter, str(folder), list(tensors)
        lines = [f"  - {t.name} [{t.signature}]: {t.reason}" + (f" (file {t.file!r})" if t.file else "")
                 for t in self.tensors]
        super().__init__(f"{len(self.tensors)} tensor(s) of {self.folder} cannot be expressed exactly in "
                         f"{exporter}; pass --allow-requant (allow_requant=True) to re-quantize just these:\n"
                         + "\n".join(lines))


class Exporter(ABC):
    """Writes a qformat folder in one external format (GGUF, compressed-tensors, ...).

    ``name``: unique among installed exporters (``qformat export --to NAME``). ``description``: one line for
    ``qformat plugins``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def export(self, folder: ModelFolder | str | os.PathLike, out: Path, *,
               allow_requant: bool = False) -> ExportReport:
        """Write ``folder`` (an open :class:`~qformat.format.ModelFolder` or its path) to ``out``, atomically;
        :class:`InexpressibleError` before anything is written when a tensor cannot be expressed exactly and
        ``allow_requant`` is false."""


@contextmanager
def opened(folder: ModelFolder | str | os.PathLike, registry: CodecRegistry | None = None) -> Iterator[ModelFolder]:
    """``folder`` as an open :class:`ModelFolder` (opened here, and closed after the block, when given a path;
    ``registry``: the codecs to read with, for a path)."""
    if isinstance(folder, ModelFolder):
        yield folder
        return
    path = Path(folder)
    if not path.is_dir():
        raise ConversionError(f"{path} is not a qformat model folder (a folder with config.json and shards)")
    model = open_folder(path) if registry is None else open_folder(path, registry)
    try:
        yield model
    finally:
        model.close()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``||got - want|| / ||want||`` in float64 (0 when both are zero)."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    norm = float(np.linalg.norm(want64))
    diff = float(np.linalg.norm(got64 - want64))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-identical in fp32 (uint32 view): -0.0 differs from 0.0, a NaN equals only the same NaN."""
    got32 = np.ascontiguousarray(got, dtype=np.float32)
    want32 = np.ascontiguousarray(want, dtype=np.float32)
    return got32.shape == want32.shape and bool(np.array_equal(got32.view(np.uint32), want32.view(np.uint32)))


@contextmanager
def staged_output(out: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``out`` (a file, or a folder when ``folder``) to write into; renamed to ``out`` when
    the block completes, removed when it raises. An existing ``out`` is refused before anything is written."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ConversionError(f"{out} exists; choose another output or remove it first")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConversionError(f"the folder {parent} of the output {out.name} does not exist")
    temp = parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    if folder:
        temp.mkdir()
    try:
        yield temp
        if out.exists() or out.is_symlink():
            raise ConversionError(f"{out} appeared while the export was being written; nothing was put there")
        os.replace(temp, out)
    except BaseException:
        if temp.is_dir() and not temp.is_symlink():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                temp.unlink()
        raise


__all__ = ["ExportReport", "ExportWarning", "ExportedTensor", "Exporter", "Inexpressible", "InexpressibleError",
           "RequantizedWarning",
           "opened", "relative_error", "same_bits", "staged_output"]
