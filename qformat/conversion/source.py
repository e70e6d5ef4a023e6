"""The model being converted: a local Hugging Face folder, a Hub id, or a GGUF file, read tensor by tensor.

Only the model's skeleton is built up front (parameters on the ``meta`` device, buffers real); weights are read from
the safetensors files when a block needs them and dropped afterwards, each file opened per read so that no mapping
keeps earlier blocks' pages resident.

Every file a source names is read only from inside the source folder: plain file names (no paths, no ``..``, not
hidden), and a symbolic link only when its target stays in the folder (or, for a Hugging Face cache snapshot, in the
repository's ``blobs``). Each tensor read is hashed as it streams (sha256 of its bytes) and its floats checked, so a
resumed conversion can prove it reads the same weights and a corrupt checkpoint is named before it is quantized.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, FormatError
from ..format.container import SIDE_FILES
from ..format.safetensors_io import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = SIDE_FILES  # tokenizer, chat template and generation files copied next to the weights
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED = "decoder-only causal language models whose blocks are at model.layers (Llama, Mistral, Qwen2, ...)"
# No trained model holds a weight this large (activations would overflow fp32 at once); random bytes read as floats
# exceed it in about a quarter of the values.
MAX_PLAUSIBLE_WEIGHT = 1e20


def source_roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may live after following symbolic links: the folder itself and, for a Hugging Face
    cache snapshot (``models--x--y/snapshots/<commit>``, whose files link into ``../../blobs``), that repo's blobs."""
    root = folder.resolve()
    roots = [root]
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        roots.append((repo / "blobs").resolve())
    return roots


def source_file_problem(folder: Path, name: object) -> str | None:
    """Why ``folder/name`` must not be read as part of the source (None when it may): the reader's name rules (a plain
    file name: no path, no ``..``, not hidden) plus no symbolic link leaving the folder, and a regular file."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        return f"{name!r} is not a plain file name"
    path = folder / name
    if not path.is_symlink():
        return None if path.is_file() or not path.exists() else f"{name} is not a regular file"
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return f"{name} is a broken symbolic link"
    if not any(target == root or root in target.parents for root in source_roots(folder)):
        return f"{name} is a symbolic link to {target}, outside the source folder"
    return None if target.is_file() else f"{name} is not a regular file"


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
    # sha256 of the bytes of every tensor read so far, and those a resumed conversion was made from (checked on read)
    digests: dict[str, str] = field(default_factory=dict, repr=False)
    expected_digests: dict[str, str] = field(default_factory=dict, repr=False)
    # tensors that must hold finite, plausible floats (the model's parameters; buffers may hold anything)
    checked_values: frozenset[str] = field(default=frozenset(), repr=False)

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
        """Identifies the source cheaply: config.json bytes and every safetensors header and size. The weights' bytes
        are identified per tensor as they are read (:attr:`digests`)."""
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
        """The named tensors as stored (original dtype), each file opened only for this call. Each is hashed
        (:attr:`digests`) and checked against :attr:`expected_digests` and, for parameters, for NaN, Inf and garbage."""
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
                        self._check(name, file, out[name])
            except (OSError, RuntimeError, ValueError) as exc:
                raise ConversionError(f"cannot read {', '.join(file_names[:3])} from {file}: {exc}") from None
        return out

    def verify(self, names: Iterable[str]) -> None:
        """Read and hash the named tensors one at a time, only to compare them with :attr:`expected_digests`."""
        for name in names:
            self.read([name])

    def _check(self, name: str, file: Path, tensor: torch.Tensor) -> None:
        digest = tensor_digest(tensor)
        where = f"{name} in {file.name}"
        if self.digests.get(name, digest) != digest:
            raise ConversionError(f"the source changed while it was being converted: {where} no longer holds the bytes "
                                  "read earlier in this run")
        expected = self.expected_digests.get(name)
        if expected is not None and expected != digest:
            raise ConversionError(f"the source changed since the partial conversion was made: {where} differs from "
                                  f"the tensor converted then (sha256 {digest[:12]}..., was {expected[:12]}...); "
                                  "resuming would mix two models: pass --restart to convert from scratch")
        self.digests[name] = digest
        if name in self.checked_values and tensor.is_floating_point() and tensor.numel():
            low, high = (float(v) for v in torch.aminmax(tensor))  # one pass; NaN propagates to both
            peak = max(-low, high)
            if math.isnan(low) or math.isnan(high) or math.isinf(peak):
                raise ConversionError(f"the source model is corrupt: {where} ({self.folder}) holds NaN or Inf "
                                      "values; re-download or re-export the checkpoint")
            if peak > MAX_PLAUSIBLE_WEIGHT:
                raise ConversionError(f"the source model is corrupt: {where} ({self.folder}) holds values of "
                                      f"magnitude {peak:.3g}, which no trained model has (bytes that are not "
                                      "weights?); re-download or re-export the checkpoint")

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.folder))
        except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
            raise ConversionError(f"cannot load the tokenizer of {self.spec} (needed for calibration): "
                                  f"{type(exc).__name__}: {exc}") from None

    def extra_files(self) -> list[Path]:
        """Tokenizer and generation files to copy next to the converted weights: regular files inside the source
        folder only (a symbolic link leaving it is not followed, so no file from elsewhere is copied or published)."""
        files = []
        for name in TOKENIZER_FILES:
            path = self.folder / name
            if not path.exists() and not path.is_symlink():
                continue
            problem = source_file_problem(self.folder, name)
            if problem is None:
                files.append(path)
            else:
                print(f"qformat: warning: not copying {name} from {self.spec}: {problem}", file=sys.stderr)
        return files

    def card_metadata(self) -> dict[str, Any] | None:
        card = self.folder / "README.md"
        if not card.is_file() or source_file_problem(self.folder, card.name) is not None:
            return None
        try:
            from huggingface_hub import ModelCard

            return ModelCard.load(card).data.to_dict()
        except Exception:  # a malformed source card must not stop a conversion; the card is only decoration
            return None


HubResolver = Callable[[str, "str | None"], Path]


def open_source(spec: str, revision: str | None = None, *, quiet: bool = False,
                resolve_hub: HubResolver | None = None) -> ModelSource:
    """Resolve and check a source: local folder, ``.gguf`` file or Hub id. Raises a QformatError naming the problem.

    Hub ids are downloaded by ``resolve_hub`` (``qformat.hub.resolve_model_source``, passed in by the layer above:
    :func:`qformat.conversion` and the CLI); without one, only local sources are accepted."""
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
        if resolve_hub is None:
            raise ConversionError(f"no such model folder or file: {spec} (Hub ids are downloaded by qformat.convert() "
                                  "and `qformat convert`)")
        folder = Path(resolve_hub(spec, revision))
        if folder != path:
            hub_id, kind = spec, "hub"
            revision = folder.name if len(folder.name) == 40 else revision
    config = _read_config(folder, spec)
    weight_file, dtypes, shapes = _scan_weights(folder, spec)
    return ModelSource(spec, folder, kind, config, weight_file, dtypes, shapes, hub_id, revision, gguf_file)


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (the bytes of its safetensors entry)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(raw.numpy())).hexdigest()


def _read_config(folder: Path, spec: str) -> dict[str, Any]:
    path = folder / "config.json"
    problem = source_file_problem(folder, path.name)
    if problem is not None:
        raise ConversionError(f"{spec}: refusing to read {problem}")
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
    if index.is_file() or index.is_symlink():
        problem = source_file_problem(folder, INDEX_NAME)
        if problem is not None:
            raise ConversionError(f"{spec}: refusing to read {problem}")
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConversionError(f"cannot read {index}: {exc}") from None
    elif (folder / "model.safetensors").is_file() or (folder / "model.safetensors").is_symlink():
        files = ["model.safetensors"]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (found {', '.join(others[:3])}: qformat reads safetensors only)" if others else ""
        raise ConversionError(f"{spec} has no model.safetensors or {INDEX_NAME}{hint}")
    weight_file: dict[str, Path] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        problem = source_file_problem(folder, name)
        if problem is not None:  # an index naming /abs/path or ../x would make qformat read (and publish) that file
            raise ConversionError(f"{spec}: the weights must be files inside the model folder, but {problem}")
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
