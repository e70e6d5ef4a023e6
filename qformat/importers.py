"""The importer contract: a plugin that reads a checkpoint some other tool quantized and hands over its stored
integers, scales and tables as the format's records, with no dequantize-and-requantize.

An importer is registered like a method (``qformat_register_importers(register)``, an instance with a unique
``name``). ``qformat convert --method import SRC --out DIR`` asks each installed importer whether it
:meth:`~Importer.detect`-s the source and imports with the one that does (``-p format=NAME`` picks one by name);
:mod:`qformat.conversion.importing` writes the shards, ``config.json`` and model card, so an importer only maps.

The rules an importer keeps (``qformat.testing.check_import`` checks the first two on a real file):

- **Bit-exact.** Every record's reference decode equals, in fp32 with atol 0, what the source's own library computes
  when it dequantizes the same file. Where the format cannot express a layout exactly, extend the spec (a codec
  version or a new codec) instead of approximating; an importer never re-quantizes.
- **Streaming.** :attr:`ImportedModel.tensors` yields one tensor at a time, reading the source lazily
  (memory-mapped), so peak memory is about one tensor whatever the model's size.
- **Names.** Tensors carry the names the transformers model built from :attr:`ImportedModel.config` expects
  (``model.layers.0.self_attn.q_proj.weight``), in that model's orientation ([out, in] for linears).
- **Errors.** A source the importer detects but cannot import (a truncated file, an unknown type, shapes that
  disagree with the config) raises :class:`qformat.errors.SourceError` naming the file, the tensor and the field or
  type; nothing is written before the first tensor is read successfully, and a failure leaves no output folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .format import QuantizedTensor

ImportedTensor = tuple[str, "QuantizedTensor | np.ndarray"]


@dataclass
class ImportedModel:
    """What an importer found in a source, before any tensor is read.

    ``config``: the Hugging Face ``config.json`` content (without ``quantization_config``), as transformers would
    build it for this source. ``tensors``: a zero-argument callable returning a fresh iterator of (name, record or
    plain array) in a stable order; plain arrays keep their stored dtype (F16 stays F16). ``files``: other files of the
    output folder, by name (tokenizer, generation config), as bytes. ``source_format``: a short description written
    to ``quantization_config["source"]["format"]``, e.g. ``"gguf Q4_1"`` or ``"gptq v1 4-bit g128 act-order"``.
    ``base_model``: the Hub id of the model the source was quantized from, where the source says it.
    ``details``: anything else worth recording (JSON-serialisable), e.g. the GGUF's type counts.
    ``source_bits``: bits per weight of the source's quantized tensors as the source stores them, for the report.
    """

    config: dict[str, Any]
    tensors: Any  # Callable[[], Iterator[ImportedTensor]]
    source_format: str
    files: Mapping[str, bytes] = field(default_factory=dict)
    base_model: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    source_bits: float | None = None

    def iter_tensors(self) -> Iterator[ImportedTensor]:
        return iter(self.tensors())


class Importer(ABC):
    """Reads one family of quantized checkpoints (GGUF, GPTQ, AWQ, compressed-tensors, bitsandbytes, HQQ, ...).

    ``name``: unique among installed importers (``-p format=NAME``). ``description``: one line for
    ``qformat plugins``. ``priority``: when several importers detect a source, the highest wins (a generic
    safetensors reader should say less than a specific one).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    @abstractmethod
    def detect(self, source: Path) -> bool:
        """Whether ``source`` (a file or a folder, already downloaded) is in this importer's layout. Cheap: read
        headers and config only, never raise for a source of another layout."""

    @abstractmethod
    def open(self, source: Path) -> ImportedModel:
        """Read the source's headers and config and describe the model; tensors are read when iterated."""
