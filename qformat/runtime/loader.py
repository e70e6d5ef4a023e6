"""Load a qformat model folder into a transformers model whose quantized linears compute from packed data.

    model = qformat.load("path/or/hub-id")            # QLinear layers, kernels chosen by the dispatcher
    model = qformat.load_dequantized("path")          # plain nn.Linear with reference-decoded fp32 weights

Steps of :func:`load`: open the folder (every record is validated, and a codec no installed plugin provides stops
the load naming the codec), check the shards against the checksums config.json records (hashed on first load, then
remembered by file identity: :func:`verify_shards`), build the model on the meta device with real non-persistent
buffers (rotary tables), swap each Linear whose ``<module>.weight`` is a record for a :class:`QLinear`, check the
folder holds every other tensor the model needs, prepare the QLinears from the memory-mapped packed tensors, bind
the plain tensors (embeddings, norms, biases) to the mapped shards without a copy where the dtype already matches,
tie weights as the config says. No pickle is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoadError, shorten
from ..format import ModelFolder
from ..format.container import QUANT_METHOD
from .assemble import (
    _resolve_dtype,
    attach_prepared,
    bind_plain_tensors,
    build_skeleton,
    check_complete,
    finish,
    release_record_pages,
    swap_in_qlinears,
)
from .checksums import VerifyMode
from .model_folder import _exists, local_path, open_model_folder
from .nn import fuse_shared_inputs
from .partial_load import plan_partial

if TYPE_CHECKING:
    from transformers import PreTrainedModel

def _read_config(path: Path) -> Any:
    from transformers import AutoConfig

    root = path if path.is_dir() else path.parent
    if not (root / "config.json").is_file():
        raise LoadError(f"{root} has no config.json; a model folder is needed to build the model")
    try:
        return AutoConfig.from_pretrained(root)
    except RecursionError:
        raise LoadError(f"{root / 'config.json'} nests too deeply to be a model config") from None
    except (ValueError, KeyError, TypeError, OSError) as exc:  # transformers' ways of refusing a config
        raise LoadError(f"transformers cannot read {root / 'config.json'}: {type(exc).__name__}: {exc}") from None


def _attach_metadata(model: PreTrainedModel, path: Path, folder: ModelFolder) -> None:
    from transformers import GenerationConfig

    from .hf_integration import QformatConfig, QformatHfQuantizer

    root = path if path.is_dir() else path.parent
    model.config.name_or_path = str(root)
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root)
    qconfig = QformatConfig.from_dict(dict(folder.quantization_config))
    model.config.quantization_config = qconfig
    # Marks the model as quantized for transformers (save_pretrained refuses: see QformatHfQuantizer.is_serializable).
    model.hf_quantizer = QformatHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def _device_name(device: str | torch.device) -> str:
    return str(torch.device(device))


# ---------------------------------------------------------------------------------------------------------------
# public


@contextmanager
def _skeleton(source: str | os.PathLike, dtype: torch.dtype | str | None,
              verify: VerifyMode) -> Iterator[tuple[Path, ModelFolder, torch.dtype, PreTrainedModel]]:
    """(folder path, the open folder, the resolved dtype, the model skeleton); the folder is closed afterwards
    (prepared weights and bound tensors keep the mappings they still use alive)."""
    path = local_path(source)
    folder = open_model_folder(path, verify)
    try:
        config = _read_config(path)
        resolved = _resolve_dtype(dtype, config)
        yield path, folder, resolved, build_skeleton(config, resolved)
    finally:
        folder.close()


def load(source: str | os.PathLike, device: str | torch.device = "cpu", *,
         kernel: str | None = None, dtype: torch.dtype | str | None = None, fuse: bool = True,
         verify: VerifyMode = "auto", max_memory: int | str | None = None,
         keep_terms: int | None = None, planes: int | None = None, trainable: bool = False,
         sidecars: str | os.PathLike | None = None) -> PreTrainedModel:
    """A transformers model whose quantized linears are :class:`QLinear` layers holding packed weights.

    ``source``: a local qformat model folder (:func:`qformat.load` also takes Hub ids).
    ``kernel``: force one installed kernel (by name) instead of the dispatcher's choice.
    ``dtype``: dtype of the unquantized parts and activations; None is float32, "auto" the config's dtype.
    ``fuse``: stack sibling layers that read the same input (q/k/v, gate/up) where the kernel allows
    (:func:`qformat.runtime.nn.fuse_shared_inputs`; ``QFORMAT_FUSE=0`` also turns it off).
    ``verify``: check the shards against the checksums config.json records: "auto" (default) hashes files not
    verified before (remembered by file identity), True hashes every time, False skips the check (unsafe);
    see :func:`verify_shards`.
    ``max_memory`` (bytes or "60MB", "1.5GiB"): load the largest prefix of the file's stacks (BitStack blocks, BCQ
    planes) whose tensors fit; ``keep_terms``: keep that many terms of every stack; ``planes``: read every
    bit-plane code (``-p planes=true`` files) at that many planes (spec/partial.md). The plan is
    ``model.qformat_partial`` (None for a full load).
    ``trainable``: load for fine-tuning (:mod:`qformat.runtime.trainable`): packed codes frozen, gradients through
    the kernels to the inputs, ``sum(base, lowrank)`` sidecars split off as fp32 ``sidecar_a`` / ``sidecar_b``
    parameters, float parameters (norms, biases; not the embeddings) copied to writable memory and trainable,
    no fusing, peft's LoRA able to wrap the QLinears; ``model.qformat_trainable`` says which layers have a trainable
    sidecar and which stay frozen. Not with a partial load.
    ``sidecars``: a file written by :func:`qformat.runtime.trainable.save_sidecars` (tuned sidecars and float
    parameters) to load over the folder's; the sidecars are split off as with ``trainable`` (without it they do not
    require grad).
    """
    split = trainable or sidecars is not None
    if split and (max_memory is not None or keep_terms is not None or planes is not None):
        raise LoadError("trainable / sidecars loads need the whole model: not with max_memory, keep_terms or planes")
    with _skeleton(source, dtype, verify) as (path, folder, dtype, model):
        plan = plan_partial(folder, max_memory, keep_terms, planes)
        swapped = swap_in_qlinears(model, folder.records)
        check_complete(model, folder, path)
        unused = bind_plain_tensors(model, folder, dtype)
        device = _device_name(device)
        if split:
            from .trainable import attach_trainable

            model.qformat_trainable = attach_trainable(model, folder, swapped, device, kernel, trainable)
        else:
            attach_prepared(model, folder, swapped, device, kernel, plan.terms if plan else None,
                            (plan.planes, set(plan.plane_records)) if plan and plan.planes else None)
        model.qformat_partial = plan
        if fuse and not split:
            fuse_shared_inputs(model)
        release_record_pages(folder, list(swapped.values()))
        _attach_metadata(model, path, folder)
        model = finish(model, path, device, unused)
    if split:
        from .trainable import install_peft_dispatch, load_sidecars, make_trainable

        if trainable:
            make_trainable(model)
            install_peft_dispatch()
        if sidecars is not None:
            load_sidecars(model, sidecars)
    return model


def load_dequantized(source: str | os.PathLike, device: str | torch.device = "cpu", *,
                     dtype: torch.dtype | str | None = None, verify: VerifyMode = "auto") -> PreTrainedModel:
    """The reference path: a plain transformers model whose quantized weights are the format's fp32 decode.

    Used to check kernels against the reference decoder and as a benchmark baseline; it holds full-size weights.
    ``verify`` as for :func:`load`.
    """
    with _skeleton(source, dtype, verify) as (path, folder, dtype, model):
        check_complete(model, folder, path)
        dense = {name: folder.decode(name) for name in folder.records}
        unused = bind_plain_tensors(model, folder, dtype, dense)
        model.config.name_or_path = str(path)
        return finish(model, path, _device_name(device), unused)


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Bytes held by QLinear layers (packed) and by everything else, and the kernels in use."""
    from .nn import qlinear_modules

    layers = qlinear_modules(model)
    packed = sum(m.nbytes() for m in layers.values())
    seen: set[int] = set()
    plain = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            plain += tensor.numel() * tensor.element_size()
    bias = sum(m.bias.numel() * m.bias.element_size() for m in layers.values() if m.bias is not None)
    kernels: dict[str, int] = {}
    for m in layers.values():
        kernels[m.kernel_name or "?"] = kernels.get(m.kernel_name or "?", 0) + 1
    return {"quantized_layers": len(layers), "packed_bytes": packed, "plain_bytes": plain - bias, "kernels": kernels}


def is_qformat_folder(path: Path) -> bool:
    root = path if path.is_dir() else path.parent
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_any(source: str | os.PathLike, device: str | torch.device = "cpu", *,
             kernel: str | None = None, dtype: torch.dtype | str | None = None,
             reference: bool = False, verify: VerifyMode = "auto", max_memory: int | str | None = None,
             keep_terms: int | None = None, planes: int | None = None) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) for a qformat folder or Hub id (kernels, or ``reference`` decode), a plain transformers
    folder or Hub id, or a ``.gguf`` file (through transformers' ``gguf_file``). ``verify``, ``max_memory`` and
    ``keep_terms`` apply to qformat folders (see :func:`load`)."""
    partial_load = max_memory is not None or keep_terms is not None or planes is not None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dtype = "auto" if dtype == "auto" else _resolve_dtype(dtype, None)
    text = os.fspath(source)
    if partial_load and (text.endswith(".gguf") or reference):
        raise LoadError("max_memory / keep_terms / planes (a partial load) need a qformat folder loaded with its kernels, "
                        f"not {'the reference decode' if reference else 'a .gguf file'}")
    if text.endswith(".gguf"):
        path = Path(text).expanduser()
        if not _exists(path) or not path.is_file():
            raise LoadError(f"no such GGUF file: {shorten(path)}")
        kwargs = {"gguf_file": path.name}
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=hf_dtype, **kwargs)
        return model.to(device).eval(), AutoTokenizer.from_pretrained(path.parent, **kwargs)
    path = local_path(source)
    root = path if path.is_dir() else path.parent
    if is_qformat_folder(path):
        model = (load_dequantized(path, device, dtype=dtype, verify=verify) if reference
                 else load(path, device, kernel=kernel, dtype=dtype, verify=verify, max_memory=max_memory,
                           keep_terms=keep_terms, planes=planes))
    elif partial_load:
        raise LoadError(f"{shorten(root)} is not a qformat folder: max_memory / keep_terms / planes (a partial load) "
                        "need one")
    else:
        model = AutoModelForCausalLM.from_pretrained(root, dtype=hf_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(root)
