"""Assemble a transformers model from an open folder: skeleton on the meta device, QLinear swaps, prepared kernel
weights, plain tensors bound to the mapped shards, completeness checks."""

from __future__ import annotations

import mmap
import re
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import LoadError, shorten
from ..format import ModelFolder
from ..format.dtypes import NUMPY_BY_NAME
from .nn import QEmbedding, QLinear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

def _resolve_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    """None: float32 (transformers' default); "auto": the dtype the config declares."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        declared = getattr(config, "dtype", None) or torch.float32
        return getattr(torch, declared) if isinstance(declared, str) else declared
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def build_skeleton(config: Any, dtype: torch.dtype) -> PreTrainedModel:
    """The model with its parameters on the meta device and its buffers (rotary tables) computed for real."""
    import transformers
    from accelerate import init_empty_weights

    model_cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    with init_empty_weights(include_buffers=False):
        if model_cls is None:
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model_cls._from_config(config, dtype=dtype)


def _tensor_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}


def model_name_for(model: nn.Module, name: str, known: set[str]) -> str | None:
    """The model's name for a stored tensor, allowing for a base-model prefix present on one side only."""
    if name in known:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        for candidate in (f"{prefix}.{name}", name.removeprefix(prefix + ".")):
            if candidate in known:
                return candidate
    return None


def swap_in_qlinears(model: nn.Module, records: Mapping[str, dict]) -> dict[str, str]:
    """Replace each Linear whose weight is a record with a QLinear placeholder; return {module name: record name}."""
    known = _tensor_names(model)
    swapped: dict[str, str] = {}
    for record_name, record in records.items():
        name = model_name_for(model, record_name, known)
        if name is None or not name.endswith(".weight"):
            raise LoadError(f"record {record_name!r} names no weight of {type(model).__name__}")
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            _swap_embedding(model, module_name, module, record_name, record, swapped)
            continue
        if not isinstance(module, nn.Linear):
            raise LoadError(f"record {record_name!r} quantizes a {type(module).__name__}; the runtime computes "
                            "quantized nn.Linear layers only (use load_dequantized for a dense model)")
        if [module.out_features, module.in_features] != list(record["shape"]):
            raise LoadError(f"record {record_name!r} has shape {record['shape']} but {module_name} is "
                            f"[{module.out_features}, {module.in_features}]")
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, QLinear.like(module, record))
        swapped[module_name] = record_name
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):  # a quantized output layer is no longer tied to the (plain) embedding
        for target in [t for t, s in tied.items() if t.removesuffix(".weight") in swapped
                       or s.removesuffix(".weight") in swapped]:
            tied.pop(target)
    return swapped


def _swap_embedding(model: nn.Module, module_name: str, module: nn.Embedding, record_name: str, record: dict,
                    swapped: dict[str, str]) -> None:
    """A quantized token embedding becomes a :class:`QEmbedding`; a tied output layer computes with the same record
    (the embedding's packed data, prepared for a kernel like any linear)."""
    if [module.num_embeddings, module.embedding_dim] != list(record["shape"]):
        raise LoadError(f"record {record_name!r} has shape {record['shape']} but {module_name} is "
                        f"[{module.num_embeddings}, {module.embedding_dim}]")
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, QEmbedding.like(module, record))
    swapped[module_name] = record_name
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(output, nn.Linear):
        out_name = next(n for n, m in model.named_modules() if m is output)
        if out_name not in swapped:
            parent_name, _, child = out_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, QLinear.like(output, record))
            swapped[out_name] = record_name


def attach_prepared(model: nn.Module, folder: ModelFolder, swapped: Mapping[str, str], device: str,
                    kernel: str | None = None, keep_terms: Mapping[str, int] | None = None,
                    planes: tuple[int, Collection[str]] | None = None) -> None:
    """Prepare every QLinear's weight from the folder's mapped packed tensors, with the dispatcher's choice or the
    forced ``kernel`` (a name, ``"torch"`` included; errors as for ``QFORMAT_KERNEL``: see dispatch.select_kernel).
    ``keep_terms``: record name -> terms of its stack to keep (a partial load, spec/partial.md; the dropped terms'
    tensors are never read); ``planes``: (P, record names) read at P bit-planes."""
    from .dispatch import prepare_weight

    for module_name, record_name in swapped.items():
        module = model.get_submodule(module_name)
        quantized = folder.quantized(record_name)
        if keep_terms and record_name in keep_terms:
            quantized = quantized.keep_terms(keep_terms[record_name], folder.registry)
        if planes and record_name in planes[1]:
            quantized = quantized.use_planes(planes[0])
        if isinstance(module, QEmbedding):
            module.attach(quantized.row_reader(folder.registry),
                          sum(int(a.nbytes) for a in quantized.tensors.values()))
            continue
        module.attach(prepare_weight(quantized, device, forced=kernel))
        module.kernel_device = torch.device(device).type


def _file_mapping(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """(the ``mmap`` a memory-mapped array is a view of, the array's byte offset in it), through public attributes
    only (``ndarray.base`` chains end at the mapping; addresses from the buffer protocol); None if not mapped."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or len(base) == 0:
        return None
    start = np.frombuffer(base, dtype=np.uint8).ctypes.data
    offset = array.ctypes.data - start
    return (base, offset) if 0 <= offset and offset + array.nbytes <= len(base) else None


def release_record_pages(folder: ModelFolder, record_names: list[str]) -> int:
    """Drop the mapped pages of the records' packed tensors from this process's resident set; return bytes advised.

    Kernels repack records into memory of their own, but the pages they read stay resident in the shard mapping
    (which plain tensors keep alive), so the packed bytes would count twice. ``MADV_DONTNEED`` on a read-only file
    mapping only forgets the pages: a later read (e.g. a kernel that kept views) faults them in again from the file.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    page = mmap.PAGESIZE
    spans: dict[int, tuple[mmap.mmap, list[list[int]]]] = {}  # per mapping: byte ranges of record tensors
    for name in record_names:
        for array in folder.quantized(name).tensors.values():
            found = _file_mapping(array) if isinstance(array, np.ndarray) and array.nbytes else None
            if found is not None:
                mapping, offset = found
                spans.setdefault(id(mapping), (mapping, []))[1].append([offset, offset + array.nbytes])
    advised = 0
    for mapping, ranges in spans.values():
        merged: list[list[int]] = []
        for begin, end in sorted(ranges):
            if merged and begin <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([begin, end])
        for begin, end in merged:
            start = begin // page * page
            stop = min(-(-end // page) * page, len(mapping))
            if stop > start:
                mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)
                advised += stop - start
    return advised


def as_torch(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (read-only, memory-mapped) numpy array; bf16 goes through an int16 view."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the mapped array is read-only
        if array.dtype == NUMPY_BY_NAME["BF16"]:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def _bind(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise LoadError(f"{where}: stored shape {list(tensor.shape)} does not match the model's {name} "
                        f"{list(current.shape)}")
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def bind_plain_tensors(model: nn.Module, folder: ModelFolder, dtype: torch.dtype,
                       dense: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Point the model's parameters at the folder's plain tensors (and ``dense`` decoded records); return unused."""
    known = _tensor_names(model)
    unused = []
    sources = [(n, lambda n=n: folder.tensor(n)) for n in folder.plain_names]
    sources += [(n, lambda a=a: a) for n, a in (dense or {}).items()]
    for stored_name, get in sources:
        name = model_name_for(model, stored_name, known)
        if name is None:
            unused.append(stored_name)
            continue
        _bind(model, name, as_torch(get()), dtype, f"tensor {stored_name!r}")
    return unused


def missing_tensors(model: nn.Module, folder: ModelFolder) -> list[str]:
    """The parameters and persistent buffers ``model`` needs that ``folder`` holds neither as a plain tensor nor as a
    record, after weight tying: a tied pair counts as present when either side is stored.

    Checked before any weight is bound, so that neither :func:`load` nor ``from_pretrained`` (which would otherwise
    initialise a missing tensor at random and carry on) builds a model from an incomplete folder.
    """
    known = _tensor_names(model)
    stored = {model_name_for(model, n, known) for n in [*folder.plain_names, *folder.records]}
    needed = set(model.state_dict(keep_vars=True))  # a QLinear's packed weight is not in it; its record is stored
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):  # transformers < 5: only the output layer is tied, when the config says so
        tied = {}
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if getattr(model.config, "tie_word_embeddings", False) and out is not None and inp is not None:
            names = {id(m): n for n, m in model.named_modules()}
            tied = {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}
    for target, source in tied.items():
        if target in stored or source in stored:
            stored |= {target, source}
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    return sorted(n for n in needed - stored if not any(p.search(n) for p in ignored))


def check_complete(model: nn.Module, folder: ModelFolder, path: Path | str) -> None:
    """Raise :class:`LoadError` if the folder lacks tensors the model needs (see :func:`missing_tensors`)."""
    missing = missing_tensors(model, folder)
    if missing:
        raise _lacks(path, model, missing)


def _lacks(path: Path | str, model: nn.Module, missing: list[str] | set[str]) -> LoadError:
    return LoadError(f"{shorten(path)} lacks {len(missing)} tensor(s) the {type(model).__name__} needs, e.g. "
                     f"{sorted(missing)[:5]}; the folder is incomplete (convert the model again)")


def finish(model: PreTrainedModel, path: Path, device: str, unused: list[str]) -> PreTrainedModel:
    """Tie weights, check nothing is left on the meta device, move to ``device`` and switch to inference."""
    missing = {n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
               if t.device.type == "meta"}
    if missing and getattr(model, "all_tied_weights_keys", None):
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    elif missing:
        model.tie_weights()
        missing = {n for n in missing if model.get_parameter(n).device.type == "meta"}
    if missing:
        raise _lacks(path, model, missing)
    if unused:
        warnings.warn(f"{path}: {len(unused)} stored tensor(s) match nothing in {type(model).__name__}, e.g. "
                      f"{unused[:3]}", stacklevel=3)
    if torch.device(device).type != "cpu":
        model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
