"""What transformers builds from a GGUF file, reused so an import matches
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``: the config, the tokenizer files, and where each GGUF
tensor goes (its parameter name, and the row order transformers' ``TensorProcessor`` gives it).

transformers 5 loads most architectures through ``transformers.modeling_gguf_pytorch_utils`` (its "legacy" path,
which dequantizes with gguf-py) and a few (``GGUF_ARCHS``: qwen35, qwen35moe, lfm2) through a newer path with its
own conversions; this importer follows the first and refuses the second by name.

A processor is a function of the dequantized array; what it does to a tensor is found without reading the tensor, by
running it on a probe whose rows hold their own index: if the result is a reordering of those rows, the tensor's rows
(GGUF quantizes each row on its own) are reordered the same way, losslessly; anything else (a transpose, ``w - 1``,
``log(-w)``) changes values, which only an unquantized tensor can take (it is then computed as transformers does).
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import SourceError

from ._gguf_scan import Header

_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?!datasets/|spaces/)([\w.-]+/[\w.-]+?)(?:/.*)?/?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

IDENTITY = "identity"
PERMUTE = "permute"
VALUES = "values"
SPECIAL = "special"


@dataclass
class RowOrder:
    """What transformers does to one GGUF tensor: its parameter name (None: not a parameter of the model) and how
    the rows move: ``identity``, ``permute`` (``rows[perm]``), ``values`` (anything else) or ``special`` (the
    processor files the tensor under other names itself: not supported)."""

    hf_name: str | None
    kind: str
    perm: np.ndarray | None = None


@dataclass
class HFView:
    config: dict[str, Any]
    files: dict[str, bytes]
    expected: dict[str, tuple[int, ...]]  # parameter name -> shape, from the model transformers builds
    key_map: dict[str, str]  # GGUF name (after the processor's rename) -> parameter name
    processor: Any
    model_class: str
    tied: bool
    required: frozenset[str]  # parameters the GGUF must provide (tied ones once)
    orders: dict[str, RowOrder] = field(default_factory=dict)

    def order(self, name: str, shape: tuple[int, ...]) -> RowOrder:
        if name not in self.orders:
            self.orders[name] = probe_rows(self.processor, name, shape, self.key_map)
        return self.orders[name]


def _error(path: Path, message: str, **where: Any) -> SourceError:
    return SourceError(message, file=str(path), **where)


def load(path: Path, header: Header) -> HFView:
    """Config, tokenizer and name map for the GGUF at ``path`` (whose header was already checked)."""
    import transformers.modeling_gguf_pytorch_utils as legacy

    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise _error(path, "the GGUF has no general.architecture", field="general.architecture")
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # a transformers without the newer path loads every architecture the legacy way
        GGUF_ARCHS = {}
    if arch in GGUF_ARCHS:
        raise _error(path, f"architecture {arch!r} is loaded by transformers' newer GGUF path, whose conversions "
                     "this importer does not follow yet", field="general.architecture")
    with _memoized(legacy, "load_gguf_checkpoint", copy=True):  # parsed once, for the config and the tokenizer
        try:
            parsed = legacy.load_gguf_checkpoint(str(path), return_tensors=False)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise _error(path, f"transformers cannot load architecture {arch!r} from GGUF: {exc}",
                         field="general.architecture") from None
        config = _config(path, parsed["config"])
        view = _model_view(path, arch, parsed["config"], config)
        view.files = _side_files(path, config)
    return view


def _model_view(path: Path, arch: str, raw_config: dict[str, Any], config: Any) -> HFView:
    """The model transformers builds (on the meta device: no memory), its parameters and the GGUF name map."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise _error(path, f"transformers has no causal language model for architecture {arch!r}: {exc}",
                     field="general.architecture") from None
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=raw_config)
    try:
        with _memoized(gguf, "get_tensor_name_map"):
            key_map = get_gguf_hf_weights_map(model, processor)
    except NotImplementedError as exc:
        raise _error(path, f"gguf-py has no tensor names for architecture {arch!r}: {exc}",
                     field="general.architecture") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    required = frozenset(name for name, _ in model.named_parameters())  # a tied lm_head is the embedding's
    config_dict = config.to_dict()
    for key in ("_name_or_path", "quantization_config"):
        config_dict.pop(key, None)
    config_dict["architectures"] = [type(model).__name__]
    config_dict["dtype"] = "float32"  # what from_pretrained(gguf_file=...) computes in; the records decode in fp32
    return HFView(config_dict, {}, expected, key_map, processor, type(model).__name__,
                  bool(config.tie_word_embeddings), required)


@contextmanager
def _memoized(module: Any, attr: str, copy: bool = False) -> Iterator[None]:
    """While the block runs, ``module.attr`` remembers its results by arguments (returning deep copies when
    ``copy``). Two of transformers' GGUF functions are called repeatedly with the same arguments and look themselves
    up on their module at each call:

    - ``gguf.get_tensor_name_map(arch, n_blocks)``: ``get_gguf_hf_weights_map`` recurses into every submodule and
      rebuilds gguf-py's ``TensorNameMap`` at each (about 400 builds of 0.1 s for a 30-layer Llama);
    - ``load_gguf_checkpoint(path, return_tensors=False)``: parsed for the config, then again inside
      ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` (a full GGUFReader parse of the vocabulary each time).
    """
    original = getattr(module, attr)
    cache: dict[Any, Any] = {}

    @functools.wraps(original)
    def remembered(*args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:
            return original(*args, **kwargs)
        if key not in cache:
            cache[key] = original(*args, **kwargs)
        return deepcopy(cache[key]) if copy else cache[key]

    setattr(module, attr, remembered)
    try:
        yield
    finally:
        setattr(module, attr, original)


def _config(path: Path, config_dict: dict[str, Any]) -> Any:
    """The config object ``AutoConfig.from_pretrained(folder, gguf_file=name)`` builds from the same dict."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict = dict(config_dict)
    if config_dict.get("model_type") == "mistral" and "layer_types" in config_dict:  # AutoConfig's own heuristic
        config_dict["model_type"] = "ministral"
    try:
        return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    except KeyError as exc:
        raise _error(path, f"transformers does not know model type {config_dict.get('model_type')!r}: {exc}",
                     field="general.architecture") from None


def _side_files(path: Path, config: Any) -> dict[str, bytes]:
    """Tokenizer and generation config files, as transformers writes them for this GGUF."""
    from transformers import AutoTokenizer, GenerationConfig

    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="qformat-gguf-") as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a property of this source
            raise _error(path, f"transformers cannot build the tokenizer from this GGUF: {type(exc).__name__}: "
                         f"{exc}", field="tokenizer.ggml.model") from None
        tokenizer.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        for item in sorted(Path(tmp).iterdir()):
            if item.is_file():
                files[item.name] = item.read_bytes()
    return files


def probe_rows(processor: Any, name: str, shape: tuple[int, ...], key_map: dict[str, str]) -> RowOrder:
    """Run ``processor`` on a probe of ``shape`` whose rows hold their index (a narrow one first, ``[R, 1, ...]``,
    then the full width for processors that reshape by the row length)."""
    rows = int(shape[0])
    index = np.arange(rows, dtype=np.int64)
    narrow = index.reshape((rows,) + (1,) * (len(shape) - 1))
    for probe in (narrow, np.broadcast_to(narrow, shape)):
        try:
            result = processor.process(weights=probe, name=name, tensor_key_mapping=key_map,
                                       parsed_parameters={"tensors": {}, "config": {}})
        except Exception:  # noqa: BLE001, S112 - a processor that cannot take the probe: try the next one
            continue
        if result.name is None:  # the processor stored it itself (MoE experts merged, GPT-2's output layer)
            return RowOrder(None, SPECIAL)
        hf_name = key_map.get(result.name)
        out = np.asarray(result.weights)
        if out.shape != probe.shape or out.dtype.kind not in "iu":
            return RowOrder(hf_name, VALUES)
        perm = out.reshape(rows, -1)
        if not (perm == perm[:, :1]).all():
            return RowOrder(hf_name, VALUES)
        perm = perm[:, 0].astype(np.int64)
        if not np.array_equal(np.sort(perm), index) or not _columns_stay(processor, name, shape, key_map):
            return RowOrder(hf_name, VALUES)
        if np.array_equal(perm, index):
            return RowOrder(hf_name, IDENTITY)
        return RowOrder(hf_name, PERMUTE, perm)
    return RowOrder(key_map.get(name), VALUES)


def _columns_stay(processor: Any, name: str, shape: tuple[int, ...], key_map: dict[str, str]) -> bool:
    """Whether the processor leaves every row's columns in place (the row probe cannot see a column reordering):
    a probe whose columns hold their index, read-only and broadcast, so an untouched tensor costs nothing."""
    if len(shape) < 2:
        return True
    cols = int(np.prod(shape[1:]))
    dtype = np.uint16 if cols <= 1 << 16 else np.int64
    probe = np.broadcast_to(np.arange(cols, dtype=dtype).reshape(shape[1:]), shape)
    try:
        result = processor.process(weights=probe, name=name, tensor_key_mapping=key_map,
                                   parsed_parameters={"tensors": {}, "config": {}})
    except Exception:  # noqa: BLE001 - it took the row probe of this shape; refusing this one is a value change
        return False
    out = np.asarray(result.weights)
    return out.shape == probe.shape and out.dtype == probe.dtype and bool((out == probe).all())


def base_model(metadata: dict[str, Any]) -> str | None:
    """The Hub id of the model this GGUF was converted from: ``general.source.*`` (the repository converted), else
    ``general.base_model.0.*`` (what that model was trained from), from a Hugging Face URL or an ``org/name`` pair."""
    for key in ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url",
                "general.base_model.0.repo_url", "general.base_model.0.url"):
        value = metadata.get(key)
        if isinstance(value, str):
            match = _HUB_URL.match(value.strip())
            if match:
                return match.group(1)
            if _HUB_ID.match(value.strip()):
                return value.strip()
    org, name = metadata.get("general.base_model.0.organization"), metadata.get("general.base_model.0.name")
    if isinstance(org, str) and isinstance(name, str) and _HUB_ID.match(f"{org}/{name}"):
        return f"{org}/{name}"
    return None
