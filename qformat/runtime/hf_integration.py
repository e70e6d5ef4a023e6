"""qformat as a transformers quantization method: ``AutoModelForCausalLM.from_pretrained(folder)`` after ``import qformat``.

How the weights get in (transformers 5.x): transformers' own loader only knows tensors that are parameters or
buffers of the model, and a record's tensors (``<module>.weight.<role>``, any number, nested node trees) are neither.
Rather than describing every codec tree to transformers' ``WeightConverter`` machinery, the quantizer reads the
records itself from the checkpoint files transformers resolved (local or downloaded from the Hub):

- ``_process_model_before_weight_loading`` (model on the meta device): open and validate the folder (a missing codec
  plugin fails here, before any weight is read), check its shards against the recorded checksums as
  :func:`qformat.load` does (``verify="auto"``: hashed on first load, remembered by file identity), swap each
  quantized Linear for a :class:`QLinear` placeholder, refuse a folder lacking a tensor the model needs (transformers
  would initialise it at random and carry on; :func:`qformat.load` raises the same :class:`LoadError`), and tell
  transformers to ignore the record tensors it will find unexpected;
- transformers then loads the plain tensors (embeddings, norms, biases) and ties weights as usual;
- ``_process_model_after_weight_loading``: prepare every QLinear's kernel weight from the memory-mapped records, and
  stack siblings that read the same input (:func:`qformat.runtime.nn.fuse_shared_inputs`), as :func:`qformat.load` does.

This uses only the documented hooks plus ``_keys_to_ignore_on_load_unexpected``, so it survives changes to the
converter API. Saving a loaded model back with ``save_pretrained`` is not supported (``is_serializable`` is False):
the folder already is the serialized form. ``is_trainable`` is True: gradients flow through the QLinears' kernels
(the codes frozen), so peft adapters train on a model loaded this way (:mod:`qformat.runtime.trainable`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format.container import QUANT_METHOD
from .assemble import attach_prepared, check_complete, release_record_pages, swap_in_qlinears
from .model_folder import open_model_folder
from .nn import fuse_shared_inputs, qlinear_modules
from .partial_load import plan_partial


class QformatConfig(QuantizationConfigMixin):
    """``quantization_config`` of a qformat folder. Keeps every field of config.json so it round-trips.

    Loading attributes (optional, not stored by the converter; passed as ``from_pretrained(path,
    quantization_config=QformatConfig(...))`` they override the folder's): ``kernel`` forces one installed kernel
    instead of the dispatcher's choice; ``max_memory`` / ``keep_terms`` make a partial load (spec/partial.md, as
    ``qformat.load``).
    """

    LOADING_ATTRIBUTES = ("kernel", "max_memory", "keep_terms", "planes")

    def __init__(self, format_version: int = 1, kernel: str | None = None, max_memory: int | str | None = None,
                 keep_terms: int | None = None, planes: int | None = None, **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.kernel = kernel
        self.max_memory = max_memory
        self.keep_terms = keep_terms
        self.planes = planes
        for key, value in kwargs.items():
            setattr(self, key, value)

    def get_loading_attributes(self) -> dict[str, Any]:
        """What a config passed to ``from_pretrained`` sets on the folder's (transformers merges only these)."""
        return {key: getattr(self, key) for key in self.LOADING_ATTRIBUTES if getattr(self, key, None) is not None}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for key in self.LOADING_ATTRIBUTES:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class QformatHfQuantizer(HfQuantizer):
    """Loads pre-quantized qformat folders; quantizing on the fly is the converter's job (``qformat convert``)."""

    requires_calibration = True  # transformers refuses QformatConfig on an unquantized checkpoint
    quantization_config: QformatConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._folder = None
        self._swapped: dict[str, str] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in {str(d) for d in device_map.values()}:
            raise ValueError("qformat models cannot be offloaded to disk; they are already memory-mapped")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        if not checkpoint_files:
            raise ValueError("qformat needs the checkpoint's safetensors files (no state_dict loading)")
        root = Path(checkpoint_files[0]).parent
        # Always "auto": a setting in the (untrusted) config.json must not be able to switch the check off.
        self._folder = open_model_folder(root, verify="auto")
        try:
            self._swapped = swap_in_qlinears(model, self._folder.records)
            check_complete(model, self._folder, root)
        except BaseException:
            self._folder.close()
            self._folder = None
            raise
        # The record tensors are read from the folder after loading; transformers would report them as unexpected.
        names = "|".join(re.escape(name) for name in self._folder.records)
        pattern = rf"(^|\.)({names})\." if names else None
        if pattern:
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), pattern}
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        folder, self._folder = self._folder, None
        if folder is None:
            return model
        try:
            by_device: dict[str, dict[str, str]] = {}
            for module_name, record_name in self._swapped.items():
                by_device.setdefault(_device_of(model, module_name), {})[module_name] = record_name
            config = self.quantization_config
            plan = plan_partial(folder, getattr(config, "max_memory", None), getattr(config, "keep_terms", None),
                                getattr(config, "planes", None))
            for device, swapped in by_device.items():
                attach_prepared(model, folder, swapped, device, getattr(config, "kernel", None),
                                plan.terms if plan else None,
                                (plan.planes, set(plan.plane_records)) if plan and plan.planes else None)
            model.qformat_partial = plan
            fuse_shared_inputs(model)
            release_record_pages(folder, list(self._swapped.values()))
        finally:
            folder.close()
        if "peft" in sys.modules:  # let peft's LoRA wrap QLinears (importing peft here would cost seconds)
            from .trainable import install_peft_dispatch

            install_peft_dispatch()
        return model

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        """``model.dequantize()``: every QLinear becomes an nn.Linear holding its decoded weight."""
        for name, module in qlinear_modules(model).items():
            weight = module.prepared.dequantize()
            linear = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None,
                                     device=weight.device, dtype=dtype or weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        """True: gradients flow through every QLinear to its input (the packed codes frozen; see
        :class:`qformat.runtime.nn.PackedLinearFunction`), so peft adapters and the float parameters train, as on
        a bitsandbytes 4-bit model. Sidecars stay inside the kernels on this path (``qformat.load(...,
        trainable=True)`` splits them off as parameters)."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """False: the codes are fixed; there is no quantization-aware training of the packed weights."""
        return False


def _device_of(model: torch.nn.Module, module_name: str) -> str:
    """Where a QLinear's neighbours were loaded: its bias, else the nearest enclosing module holding a tensor."""
    parts = module_name.split(".")
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        for tensor in module.parameters():
            if tensor.device.type != "meta":
                return str(tensor.device)
    return "cpu"


def register() -> None:
    """Add qformat to transformers' quantization registries (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QformatConfig)
    import transformers.quantizers.auto as auto

    # transformers copies loading attributes from a config passed to from_pretrained only for the types listed here
    if QformatConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, QformatConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QformatHfQuantizer)


if "transformers.quantizers.auto" in sys.modules:  # imported before transformers' registry was: qformat's hook waited
    register()
