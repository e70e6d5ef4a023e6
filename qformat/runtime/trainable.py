"""Fine-tuning a converted model: packed codes frozen, float parts, low-rank sidecars and LoRA adapters trained.

    model = qformat.load(folder, trainable=True)             # sidecars + float parts are fp32 Parameters
    ...train...
    qformat.runtime.trainable.save_sidecars(model, "tuned.safetensors")
    model = qformat.load(folder, trainable=True, sidecars="tuned.safetensors")   # same logits

    from peft import LoraConfig, get_peft_model               # as with a bitsandbytes 4-bit model
    peft_model = get_peft_model(qformat.load(folder, trainable=True), LoraConfig(target_modules=[...]))

What trains, what does not:

- Every quantized linear stays a :class:`qformat.runtime.nn.QLinear` whose packed codes are frozen; gradients flow
  through it to its input (:class:`qformat.runtime.nn.PackedLinearFunction`: the backward decodes that one layer's
  weight for the call, ``grad_x = grad_y @ W``, and drops it).
- A record of the form ``sum(base..., lowrank(a, b))`` (the sidecars :mod:`qformat.sidecar` writes: F16 factors or
  8-bit affine codes) is split: the kernel computes the base terms, and ``a``, ``b`` (reference-decoded, several
  low-rank terms concatenated along the rank) become the QLinear's fp32 ``sidecar_a`` / ``sidecar_b`` parameters.
  Any other record (no sidecar, a ``sign_lowrank`` stack, a low-rank term nested under another codec) loads exactly
  as without ``trainable`` and stays frozen; only a record that holds a low-rank part that cannot be split is
  mentioned (one warning), and ``model.qformat_trainable`` lists what was split and what stays frozen.
- Floating-point parameters outside the packed records (norms, biases) are copied out of the read-only shard mapping
  into ordinary memory and made trainable; the embeddings and a float output layer stay frozen and mapped (see
  :func:`make_trainable`). Freeze
  any of them with ``requires_grad_(False)`` before building the optimizer; peft's ``get_peft_model`` freezes them all.
- Fusing siblings that read the same input (q/k/v, gate/up) is off for a trainable load, and so are partial loads.

:func:`save_sidecars` writes the sidecar factors and the trainable float parameters (safetensors, model names);
:func:`load_sidecars` (or ``qformat.load(..., sidecars=path)``) puts them back, refusing a tensor the model does not
have or whose shape differs, naming it.

peft: :func:`install_peft_dispatch` (run by ``qformat.load(..., trainable=True)``, and by the transformers integration
when peft is already imported) makes peft's LoRA dispatch wrap a QLinear in :class:`QLoraLinear` (peft's own LoRA
``Linear`` over the packed base layer), through peft's documented custom-module mapping
(``LoraConfig._register_custom_module``) added to whichever config targets a QLinear, so ``get_peft_model`` and
``PeftModel.from_pretrained`` need nothing qformat-specific. :func:`register_peft` does the same for one config
explicitly. Merging an adapter into packed codes is refused (load with ``qformat.load_dequantized`` to merge).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LoadError, shorten
from ..format import ModelFolder, QuantizedTensor, iter_nodes
from ..format.partial import referenced
from .nn import QLinear

SIDECAR_PARAMS = ("sidecar_a", "sidecar_b")
SIDECAR_FILE_KIND = "qformat-trainable-sidecars"


# -- splitting records ------------------------------------------------------------------------------------------------


def split_sidecar(qt: QuantizedTensor, registry: Any) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor] | None:
    """(the record without its top-level low-rank terms, a [out, r], b [r, in]) for ``sum(base..., lowrank...)``;
    None for any other record. ``a`` and ``b`` are the reference decode of the factors (float32), several low-rank
    terms concatenated along the rank; the base keeps only the tensors its tree reads."""
    weight = qt.record["weight"]
    if weight.get("codec") != "sum":
        return None
    terms = weight["terms"]
    lowrank = [t for t in terms if isinstance(t, dict) and t.get("codec") == "lowrank"]
    base = [t for t in terms if not (isinstance(t, dict) and t.get("codec") == "lowrank")]
    if not lowrank or not base:
        return None
    ctx = qt.context(registry)
    ctx.infer(weight, "weight")
    factors = [(np.array(ctx.decode(t["a"], "a"), dtype=np.float32), np.array(ctx.decode(t["b"], "b"), dtype=np.float32))
               for t in lowrank]
    a = torch.from_numpy(np.concatenate([f[0] for f in factors], axis=1))
    b = torch.from_numpy(np.concatenate([f[1] for f in factors], axis=0))
    node = base[0] if len(base) == 1 else {**weight, "terms": base}
    record = {**qt.record, "weight": node}
    tensors = {name: qt.tensors[name] for name in referenced(node, qt.tensor_info, registry)}
    record["storage_bytes"] = sum(int(t.nbytes) for t in tensors.values())
    return QuantizedTensor(qt.name, record, tensors), a, b


def _has_lowrank(record: dict) -> bool:
    return any(node.get("codec") in ("lowrank", "sign_lowrank") for node in iter_nodes(record["weight"]))


def attach_trainable(model: nn.Module, folder: ModelFolder, swapped: Mapping[str, str], device: str,
                     kernel: str | None = None, requires_grad: bool = True) -> dict[str, list[str]]:
    """Prepare the QLinears like :func:`qformat.runtime.assemble.attach_prepared`, splitting every record with a
    sidecar into a kernel over its base plus ``sidecar_a`` / ``sidecar_b`` parameters; return {"sidecars": module
    names split, "frozen": module names whose record has no trainable form}."""
    from .assemble import attach_prepared
    from .dispatch import prepare_weight

    split: list[str] = []
    frozen: dict[str, str] = {}
    unsplittable: list[str] = []
    for module_name, record_name in swapped.items():
        module = model.get_submodule(module_name)
        parts = split_sidecar(folder.quantized(record_name), folder.registry) if isinstance(module, QLinear) else None
        if parts is None:
            frozen[module_name] = record_name
            if isinstance(module, QLinear) and _has_lowrank(folder.records[record_name]):
                unsplittable.append(record_name)
            continue
        base, a, b = parts
        module.attach(prepare_weight(base, device, forced=kernel))
        module.kernel_device = torch.device(device).type
        module.set_sidecar(a.to(device), b.to(device), requires_grad)
        split.append(module_name)
    attach_prepared(model, folder, frozen, device, kernel)
    if unsplittable and requires_grad:
        warnings.warn(f"qformat: {len(unsplittable)} record(s) hold a low-rank part that has no trainable form (not a "
                      f"top-level sum(base, lowrank) term), e.g. {unsplittable[:3]}; they stay frozen", stacklevel=3)
    return {"sidecars": split, "frozen": list(frozen)}


def make_trainable(model: nn.Module) -> list[str]:
    """Make every floating-point parameter trainable (sidecars included) except the embeddings and a float output
    layer, copying those still bound to the read-only shard mapping into writable memory first; tied parameters stay
    one parameter. Return their names.

    The embeddings stay frozen and mapped, as QLoRA keeps them: on a small model they are the largest float tensor
    (SmolLM2-135M: 113 MB of fp32, more than its packed linears), and copying them for an optimizer that then skips them
    would break "resident = packed bytes + what trains". Train them by replacing the weight with a writable
    ``nn.Parameter(weight.detach().clone())`` yourself."""
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if isinstance(m, nn.Module) for p in m.parameters(recurse=False)} if hasattr(
        model, "get_input_embeddings") else set()
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is None or not param.is_floating_point():
                continue
            if id(param) in frozen:
                param.requires_grad_(False)
                continue
            new = replaced.get(id(param))
            if new is None:
                new = nn.Parameter(param.detach().clone(), requires_grad=True)
                replaced[id(param)] = new
            module._parameters[leaf] = new
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count and bytes, and the optimizer state Adam(W) would hold for them (two fp32 moments)."""
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    return {"trainable_params": count, "trainable_bytes": sum(p.numel() * p.element_size() for p in params),
            "adam_state_bytes": 2 * 4 * count}


# -- saving and loading tuned sidecars -----------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # a PeftModel
    return get() if callable(get) else model


def _canonical(name: str) -> str:
    """A parameter's name in the model qformat.load builds (peft wraps a layer as ``<layer>.base_layer``)."""
    return name.replace(".base_layer.", ".")


def tuned_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`save_sidecars` writes: every QLinear's sidecar factors and every trainable float parameter, by
    the name it has in the model ``qformat.load`` builds (peft's adapter parameters excluded: peft saves those)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in _base_model(model).named_parameters():
        leaf = name.rpartition(".")[2]
        if "lora_" in name or not (leaf in SIDECAR_PARAMS or param.requires_grad):
            continue
        out[_canonical(name)] = param.detach().to("cpu").contiguous()
    return out


def save_sidecars(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write the tuned sidecars and float parameters (:func:`tuned_tensors`) to the safetensors file ``path``;
    return the tensor names written."""
    from safetensors.torch import save_file

    tensors = tuned_tensors(model)
    if not tensors:
        raise ValueError("the model has no sidecar and no trainable parameter to save (load it with trainable=True)")
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "qformat": SIDECAR_FILE_KIND})
    return sorted(tensors)


def load_sidecars(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Put the tensors of a :func:`save_sidecars` file into ``model`` (loaded with ``trainable=True``, or with
    ``sidecars=``); a tensor the model lacks, or of another shape, is a :class:`LoadError` naming it. Parameters keep
    their identity (ties and optimizer references hold) and their ``requires_grad``."""
    from safetensors import safe_open

    base = _base_model(model)
    params = {_canonical(n): p for n, p in base.named_parameters(remove_duplicate=False)}
    loaded: list[str] = []
    try:
        handle = safe_open(os.fspath(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for missing or malformed files
        raise LoadError(f"cannot read sidecar file {shorten(path)}: {type(exc).__name__}: {exc}") from None
    with handle as f:
        for name in f.keys():
            param = params.get(name)
            if param is None:
                hint = (" (the model has no sidecar there: load it with trainable=True from the folder the sidecars "
                        "were tuned on)" if name.rpartition(".")[2] in SIDECAR_PARAMS else "")
                raise LoadError(f"sidecar file {shorten(path)}: tensor {name!r} matches no parameter of "
                                f"{type(base).__name__}{hint}")
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise LoadError(f"sidecar file {shorten(path)}: tensor {name!r} has shape {list(tensor.shape)}, the "
                                f"model's is {list(param.shape)}")
            param.data = tensor.to(device=param.device, dtype=param.dtype)
            loaded.append(name)
    return loaded


# -- peft ---------------------------------------------------------------------------------------------------------


_PEFT: dict[str, Any] = {}


def _lora_class() -> type:
    cls = _PEFT.get("cls")
    if cls is not None:
        return cls
    from peft.tuners.lora.layer import Linear

    class QLoraLinear(Linear):
        """peft's LoRA ``Linear`` over a :class:`QLinear` base layer: forward is the packed base plus the adapter;
        merging into the packed codes is not possible."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int] | tuple[None, None]:
            if isinstance(module, QLinear):  # peft's generic lookup works too, but warns "unsupported layer type"
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("qformat: a LoRA adapter cannot be merged into packed codes; merge into "
                                      "qformat.load_dequantized(folder) instead, or keep the adapter separate")

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    _PEFT["cls"] = QLoraLinear
    return QLoraLinear


def register_peft(config: Any) -> Any:
    """``config`` (a peft ``LoraConfig``) with QLinear registered as a LoRA target (its custom-module mapping)."""
    if getattr(config, "_custom_modules", None) is None or QLinear not in config._custom_modules:
        config._register_custom_module({QLinear: _lora_class()})
    return config


def install_peft_dispatch() -> bool:
    """Let peft's LoRA wrap QLinear layers with any ``LoraConfig`` (idempotent; False when peft is not installed).

    Wraps ``LoraModel._create_new_module`` so that, for a target whose base layer is a QLinear, the config gets the
    QLinear mapping (:func:`register_peft`) before peft's own dispatch runs; other targets are untouched."""
    if _PEFT.get("installed"):
        return True
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:
        return False
    original = LoraModel._create_new_module

    def create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if isinstance(base, QLinear):
            register_peft(lora_config)
        return original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(create_new_module)
    _PEFT["installed"] = True
    return True
