"""GGUF importer: ``qformat convert --method import model.gguf --out DIR`` keeps llama.cpp's stored integers and fp16
scales (re-packed into the format's layouts, never dequantized and re-quantized), so every record's reference decode
is bit for bit what gguf-py's ``dequantize`` computes from the same file (the trees: ``_gguf_records``).

- **Source**: a ``.gguf`` file (first four bytes ``GGUF``), or a folder holding exactly one ``.gguf`` file at its top
  level and no ``config.json`` (a folder with a Hugging Face model is converted with a method instead). Split GGUFs
  (``split.count`` > 1) are refused: merge them first (``llama-gguf-split --merge``).
- **Types**: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 become
  records; F32, F16 and BF16 tensors stay plain arrays in their stored dtype. Any other type is refused by name.
- **Model**: config, tokenizer and tensor names are transformers' own for this GGUF (``_gguf_hf``), so the folder
  holds what ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` builds, including its row permutation
  of Llama's q/k projections (a permutation of quantized rows, which is lossless). A GGUF without ``output.weight``
  has tied embeddings (no lm_head tensor); the token embedding stays quantized.
- **Errors**: a truncated file, an unknown or unsupported type, a shape that disagrees with the config, an
  architecture transformers cannot load from GGUF: :class:`SourceError` naming the file, the tensor and the field,
  from :meth:`GGUFImporter.open`, before any tensor is read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import ImportedModel, Importer, SourceError, hookimpl

from . import _gguf_hf as hf
from ._gguf_records import SUPPORTED, build_record
from ._gguf_scan import MAGIC, Header, TensorEntry, scan

PLAIN = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": None}  # BF16: ml_dtypes.bfloat16
RECORD_DTYPE = "F32"  # the records' declared dtype: what transformers computes a GGUF model in


@dataclass
class _Item:
    """One tensor to import: where it is in the file and what transformers makes of it."""

    entry: TensorEntry
    type_name: str
    hf_name: str
    order: hf.RowOrder

    @property
    def quantized(self) -> bool:
        return self.type_name not in PLAIN


def gguf_file(source: Path) -> Path | None:
    """The GGUF file ``source`` names (itself, or the one ``.gguf`` of a folder without config.json), or None."""
    source = Path(source)
    try:
        if source.is_dir():
            found = [p for p in source.iterdir() if p.suffix.lower() == ".gguf" and p.is_file()]
            if len(found) != 1 or (source / "config.json").exists():
                return None
            source = found[0]
        if not source.is_file():
            return None
        with open(source, "rb") as handle:
            return source if handle.read(4) == MAGIC else None
    except OSError:
        return None


class GGUFImporter(Importer):
    name = "gguf"
    description = ("llama.cpp GGUF files (Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0; F16/BF16/F32), "
                   "bit-exact")
    priority = 10

    def detect(self, source: Path) -> bool:
        return gguf_file(source) is not None

    def open(self, source: Path) -> ImportedModel:
        path = gguf_file(source)
        if path is None:
            raise SourceError("not a GGUF file, nor a folder holding exactly one .gguf file (and no config.json)",
                              file=str(source))
        path = path.absolute()  # not resolve(): a Hub cache snapshot links to a blob named by its hash
        header = scan(path, SUPPORTED)
        parts = header.metadata.get("split.count", 1)
        if isinstance(parts, int) and parts > 1:
            raise SourceError(f"this is part of a split GGUF ({parts} files); merge the parts first "
                              "(llama-gguf-split --merge)", file=str(path), field="split.count")
        view = hf.load(path, header)
        items, skipped = _plan(path, header, view)
        types = Counter(item.type_name for item in items)
        quantized = [item for item in items if item.quantized]
        bits = (sum(i.entry.nbytes for i in quantized) * 8 / sum(_elements(i.entry) for i in quantized)
                if quantized else None)
        details = {"architecture": header.metadata.get("general.architecture"), "gguf_version": header.version,
                   "types": dict(types.most_common()), "file_type": _file_type(header),
                   "permuted_rows": [i.hf_name for i in items if i.order.kind == hf.PERMUTE],
                   "skipped": skipped, "tied_embeddings": view.tied, "model_class": view.model_class}

        def tensors():
            data = _memmap(path, header)
            for item in items:
                yield item.hf_name, _read(path, data, header, item, view)

        return ImportedModel(config=view.config, tensors=tensors, source_format=_describe(header, types),
                             files=view.files, base_model=hf.base_model(header.metadata), details=details,
                             source_bits=bits)


def _elements(entry: TensorEntry) -> int:
    count = 1
    for dim in entry.ne:
        count *= int(dim)
    return count


def _memmap(path: Path, header: Header) -> np.ndarray:
    """The file as read-only uint8 pages; a tensor's bytes are ``[data_start + offset, + nbytes)`` (the offsets of
    the checked header walk, which gguf-py's GGUFReader reads alike: the tests compare the two). GGUFReader itself is
    not used here: it builds a Python object per vocabulary string (seconds per parse on a 49k vocabulary), and
    transformers already parses the file twice, for the config and for the tokenizer."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if data.shape[0] != header.file_size:
        raise SourceError("the GGUF file changed while it was being read", file=str(path), field="data")
    return data


def _plan(path: Path, header: Header, view: hf.HFView) -> tuple[list[_Item], list[str]]:
    """What to import, checked against the model transformers builds, before any tensor data is read."""
    items: list[_Item] = []
    skipped: list[str] = []
    owner: dict[str, str] = {}
    for entry in header.tensors:
        type_name = header.type_names[entry.type_id]
        order = view.order(entry.name, entry.shape)
        if order.kind == hf.SPECIAL:
            raise SourceError("transformers files this tensor under other names itself (merged MoE experts or a "
                              "moved output layer), which this importer does not support", file=str(path),
                              tensor=entry.name, field="name")
        if order.hf_name is None:
            skipped.append(entry.name)
            continue
        where = {"file": str(path), "tensor": f"{entry.name} ({order.hf_name})"}
        if order.hf_name in owner:
            raise SourceError(f"two GGUF tensors map to {order.hf_name} ({owner[order.hf_name]} and this one)",
                              **where, field="name")
        owner[order.hf_name] = entry.name
        if type_name not in PLAIN and type_name not in SUPPORTED:
            raise SourceError(f"GGUF type {type_name} is not supported; supported: {', '.join(SUPPORTED)}, "
                              f"{', '.join(PLAIN)}", **where, field="type")
        expected = view.expected.get(order.hf_name)
        if type_name not in PLAIN:
            if len(entry.shape) != 2:
                raise SourceError(f"a quantized {type_name} tensor of shape {list(entry.shape)} (only 2-D quantized "
                                  "tensors are imported)", **where, field="shape")
            if order.kind == hf.VALUES:
                raise SourceError(f"transformers changes this {type_name} tensor's values (not only its row order) "
                                  "when it loads it; a quantized tensor cannot follow bit-exactly", **where,
                                  field="type")
        if order.kind != hf.VALUES and expected is not None and tuple(entry.shape) != expected:
            raise SourceError(f"shape {list(entry.shape)} ({type_name}) does not match {list(expected)}, what the "
                              "config makes of this parameter", **where, field="shape")
        items.append(_Item(entry, type_name, order.hf_name, order))
    missing = sorted(set(view.required) - set(owner))
    if missing:
        raise SourceError(f"the GGUF has no tensor for {len(missing)} parameters of the model its config describes "
                          f"(first: {', '.join(missing[:3])})", file=str(path), tensor=missing[0], field="tensors")
    return items, skipped


def _read(path: Path, pages: np.ndarray, header: Header, item: _Item, view: hf.HFView) -> Any:
    """One tensor, read from the memory map: a record, or a plain array in its stored dtype."""
    start = header.data_start + item.entry.offset
    data = pages[start:start + item.entry.nbytes]
    perm = item.order.perm
    if item.quantized:
        raw = data.reshape(item.entry.shape[0], -1)
        raw = raw if perm is None else raw[perm]
        _, type_size = _sizes(item.type_name)
        return build_record(item.hf_name, item.type_name, raw, item.entry.shape, type_size, RECORD_DTYPE)
    data = data.view(_plain_dtype(item.type_name)).reshape(item.entry.shape)
    if item.order.kind == hf.VALUES:
        return _processed(path, item, data, view)
    return np.array(data if perm is None else data[perm])  # a copy: nothing keeps the memory map alive


def _processed(path: Path, item: _Item, data: np.ndarray, view: hf.HFView) -> np.ndarray:
    """A plain tensor transformers changes (``w - 1``, ``log(-w)``, a reshape): computed as transformers does, from
    the fp32 values, and kept in fp32."""
    values = data.astype(np.float32)
    result = view.processor.process(weights=values, name=item.entry.name, tensor_key_mapping=view.key_map,
                                    parsed_parameters={"tensors": {}, "config": {}})
    out = np.ascontiguousarray(result.weights, dtype=np.float32)
    expected = view.expected.get(item.hf_name)
    if expected is not None and tuple(out.shape) != expected:
        raise SourceError(f"shape {list(out.shape)} does not match {list(expected)}, what the config makes of this "
                          "parameter", file=str(path), tensor=f"{item.entry.name} ({item.hf_name})", field="shape")
    return out


def _plain_dtype(type_name: str) -> np.dtype:
    if type_name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return PLAIN[type_name]


def _sizes(type_name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def _file_type(header: Header) -> str | None:
    """``general.file_type`` by name (``Q4_K_M``), as llama.cpp's quantize wrote it."""
    from gguf import LlamaFileType

    value = header.metadata.get("general.file_type")
    try:
        name = LlamaFileType(value).name if isinstance(value, int) else None
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_") if name else None


def _describe(header: Header, types: Counter) -> str:
    """``gguf Q4_1 (210 Q4_1, 1 Q8_0, 61 F32)``: the file type, then the tensors imported per type."""
    quantized = [name for name, _ in types.most_common() if name not in PLAIN]
    main = _file_type(header) or (quantized[0] if quantized else next(iter(types), "F32"))
    counts = ", ".join(f"{n} {name}" for name, n in types.most_common())
    return f"gguf {main} ({counts})"


@hookimpl
def qformat_register_importers(register):
    register(GGUFImporter())


__all__ = ["GGUFImporter", "gguf_file"]
