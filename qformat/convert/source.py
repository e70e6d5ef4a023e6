"""The model being converted: a local Hugging Face folder, a Hub id, or a GGUF file, read tensor by tensor.

Only the model's skeleton is built up front (parameters on the ``meta`` device, buffers real); weights are read from
the safetensors files when a block needs them and dropped afterwards, each file opened per read so that no mapping
keeps earlier blocks' pages resident.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, FormatError
from ..format.safetensors_io import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED = "decoder-only causal language models whose blocks are at model.layers (Llama, Mistral, Qwen2, ...)"


@dataclass
class ModelSource:
    spec: str  # what the user named
    folder: Path  # Hugging Face folder the weights are streamed from
    kind: str  # "folder", "hub" or "gguf"
    config: dict[str, Any]  # config.json as stored
    weight_file: dict[str, Path]  # tensor name -> safetensors file
    dtypes: dict[str, str]  # tensor name -> safetensors dtype
    shapes: dict[str, tuple[int, ...]]
    hub_id: str | None = None
    revision: str | None = None
    gguf_file: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    # -- description ----------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What quantization_config records about the source (no local absolute paths)."""
        info: dict[str, Any] = {"format": "gguf" if self.kind == "gguf" else "safetensors"}
        if not self.hub_id:
            info["local"] = True  # the id is a local path, not a Hub id (a model card must not link it)
        if self.hub_id:
            info["id"] = self.hub_id
            if self.revision:
                info["revision"] = self.revision
        elif self.gguf_file is not None:
            info["file"] = self.gguf_file.name
        return info

    def fingerprint(self) -> str:
        """Identifies the source content cheaply: config.json bytes and every safetensors header and size."""
        if self._fingerprint is None:
            digest = hashlib.sha256((self.folder / "config.json").read_bytes())
            for file in sorted(set(self.weight_file.values())):
                with open(file, "rb") as handle:
                    header_len = int.from_bytes(handle.read(8), "little")
                    digest.update(file.name.encode() + handle.read(header_len))
                digest.update(str(file.stat().st_size).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # -- reading ----------------------------------------------------------------------------------------------------
    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored (original dtype), each file opened only for this call."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.weight_file:
                raise ConversionError(f"the source model {self.spec} has no tensor {name!r}")
            by_file.setdefault(self.weight_file[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in file_names:
                        out[name] = handle.get_tensor(name)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ConversionError(f"cannot read {', '.join(file_names[:3])} from {file}: {exc}") from None
        return out

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
            raise ConversionError(f"cannot load the tokenizer of {self.spec} (needed for calibration): "
                                  f"{type(exc).__name__}: {exc}") from None

    def extra_files(self) -> list[Path]:
        """Tokenizer and generation files to copy next to the converted weights."""
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]

    def card_metadata(self) -> dict[str, Any] | None:
        card = self.folder / "README.md"
        if not card.is_file():
            return None
        try:
            from huggingface_hub import ModelCard

            return ModelCard.load(card).data.to_dict()
        except Exception:  # a malformed source card must not stop a conversion; the card is only decoration
            return None


def open_source(spec: str, revision: str | None = None, *, quiet: bool = False) -> ModelSource:
    """Resolve and check a source: local folder, ``.gguf`` file or Hub id. Raises a QformatError naming the problem."""
    path = Path(spec).expanduser()
    hub_id = None
    gguf_file = None
    kind = "folder"
    if path.is_file() or spec.endswith(".gguf"):
        if not path.is_file():
            raise ConversionError(f"no such GGUF file: {spec}")
        if path.suffix.lower() != ".gguf":
            raise ConversionError(f"{spec} is a file but not a .gguf; give a Hugging Face model folder, a Hub id "
                                  "or a .gguf file")
        if revision is not None:
            raise ConversionError("--revision applies to Hub ids, not to a local .gguf file")
        from .gguf import expand_gguf

        gguf_file, kind = path.resolve(), "gguf"
        folder = expand_gguf(gguf_file, quiet=quiet)
    elif path.is_dir():
        if revision is not None:
            raise ConversionError(f"--revision applies to Hub ids, but {spec} is a local folder")
        folder = path
    elif path.exists():
        raise ConversionError(f"{spec} is neither a folder nor a .gguf file")
    else:
        try:
            from ..hub import resolve_model_source
        except ImportError:
            raise ConversionError(f"no such model folder or file: {spec}") from None
        folder = Path(resolve_model_source(spec, revision))
        if folder != path:
            hub_id, kind = spec, "hub"
            revision = folder.name if len(folder.name) == 40 else revision
    config = _read_config(folder, spec)
    weight_file, dtypes, shapes = _scan_weights(folder, spec)
    return ModelSource(spec, folder, kind, config, weight_file, dtypes, shapes, hub_id, revision, gguf_file)


def _read_config(folder: Path, spec: str) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{spec} is not a Hugging Face model folder: config.json is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ConversionError(f"{spec} is already quantized (quantization_config.quant_method = {method!r}); "
                              "convert the unquantized model")
    return config


def _scan_weights(folder: Path, spec: str) -> tuple[dict[str, Path], dict[str, str], dict[str, tuple[int, ...]]]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConversionError(f"cannot read {index}: {exc}") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (found {', '.join(others[:3])}: qformat reads safetensors only)" if others else ""
        raise ConversionError(f"{spec} has no model.safetensors or {INDEX_NAME}{hint}")
    weight_file: dict[str, Path] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = folder / name
        try:
            header = SafetensorsFile(path)  # validates header and layout: catches truncated files up front
        except FormatError as exc:
            raise ConversionError(f"the source weights are unreadable: {exc}") from None
        for tensor, entry in header.entries.items():
            weight_file[tensor] = path
            dtypes[tensor] = entry.dtype
            shapes[tensor] = entry.shape
    return weight_file, dtypes, shapes


# ---------------------------------------------------------------------------------------------------------------
# the skeleton


@dataclass
class Skeleton:
    model: nn.Module
    blocks: nn.ModuleList
    blocks_prefix: str  # e.g. "model.layers"
    architecture: str

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}."


def build_skeleton(source: ModelSource) -> Skeleton:
    """The model with parameters on ``meta`` (no memory) and real buffers, and its list of decoder blocks."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = ", ".join(source.config.get("architectures") or []) or source.config.get("model_type") or "unknown"
    try:
        config = AutoConfig.from_pretrained(str(source.folder))
    except Exception as exc:  # unknown model_type and friends
        raise ConversionError(f"unsupported architecture {arch}: transformers cannot read its config ({exc})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ConversionError(f"unsupported architecture {arch}: encoder-decoder models are not supported; "
                              f"qformat converts {SUPPORTED}")
    try:
        with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"unsupported architecture {arch}: no causal-LM class for it in transformers "
                              f"({str(exc).splitlines()[0]}); qformat converts {SUPPORTED}") from None
    model.eval()
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or (expected and len(layers) != expected):
        raise ConversionError(f"unsupported architecture {arch}: no list of decoder blocks at "
                              f"{type(model).__name__}.{model.base_model_prefix}.layers; qformat converts {SUPPORTED}")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return Skeleton(model, layers, prefix, arch)


def tied_source(model: nn.Module, name: str) -> str | None:
    """The parameter that ``name`` is tied to (lm_head -> embeddings), if the config ties them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(config, "tie_word_embeddings", False):
        return None
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        return tied.get(name)
    if name in tied:  # transformers 4: a list of names tied to the input embeddings
        embeddings = model.get_input_embeddings()
        return next((f"{n}.weight" for n, m in model.named_modules() if m is embeddings), None)
    return None


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer of ``root`` (meta or real) by ``value``."""
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise ConversionError(f"the model has no parameter or buffer {name!r}")


def release(module: nn.Module) -> None:
    """Put a module's parameters back on ``meta`` so their memory is freed."""
    for sub in module.modules():
        for leaf, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                     requires_grad=False)


def state_names(module: nn.Module) -> list[str]:
    """Names of the parameters and persistent buffers a checkpoint holds for ``module`` (in module order)."""
    return list(module.state_dict(keep_vars=True).keys())


__all__ = ["ModelSource", "Skeleton", "build_skeleton", "open_source", "release", "set_tensor", "state_names",
           "tied_source"]
