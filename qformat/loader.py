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
import mmap
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from .errors import FormatError, PluginError, QformatError, UnknownCodecError, shorten
from .format import REGISTRY, ModelFolder, QuantizedTensor, open_folder, signature
from .format.container import INDEX_NAME, QUANT_METHOD, SINGLE_NAME, sha256_file
from .format.dtypes import NUMPY_BY_NAME
from .format.safetensors_io import QFORMAT_METADATA_KEY, SafetensorsFile
from .kernel_api import PreparedWeight
from .nn import QLinear, fuse_shared_inputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class LoadError(QformatError):
    """The folder cannot be turned into a model (unknown architecture, names or shapes that do not fit it)."""


# ---------------------------------------------------------------------------------------------------------------
# opening


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder or file as is; anything else is treated as a Hub id and downloaded (qformat.hub)."""
    path = Path(os.fspath(source)).expanduser()
    if _exists(path) and revision is None:
        return path
    from .hub import resolve_model_source  # huggingface_hub is only needed for Hub ids

    return Path(resolve_model_source(source, revision))


def _exists(path: Path) -> bool:
    """``path.exists()``, but a path the OS refuses to look up (e.g. a name over its length limit) is a LoadError."""
    try:
        return path.exists()
    except OSError as exc:
        raise LoadError(f"cannot use the path {shorten(path)}: {exc.strerror or exc}") from None


VerifyMode = bool | Literal["auto"]


def open_model_folder(path: str | os.PathLike, verify: VerifyMode = "auto") -> ModelFolder:
    """Open and validate a qformat folder, with plugin codecs registered first, and check its shard checksums.

    A record needing a codec that no installed plugin provides raises :class:`PluginError` naming the codec and,
    where the folder says (``quantization_config.codec_providers`` or a record's ``info``), the package that provides
    it. ``verify``: see :func:`verify_shards`.
    """
    from .plugins import get_plugins

    get_plugins()  # plugins register their codecs into the format's registry
    try:
        folder = open_folder(path)
    except UnknownCodecError as exc:
        raise PluginError(missing_codec_message(Path(path), exc)) from None
    except OSError as exc:  # e.g. a shard name (from the index) longer than the OS allows
        where = shorten(exc.filename) if exc.filename else shorten(path)
        raise LoadError(f"cannot open {where}: {exc.strerror or exc}") from None
    try:
        method = folder.quantization_config.get("quant_method")
        if folder.path.is_dir() and method != QUANT_METHOD:
            raise LoadError(f"{path} is not a qformat model folder (config.json quantization_config.quant_method is "
                            f"{method!r}); load a plain model with transformers directly")
        verify_shards(folder, verify)
    except OSError as exc:
        folder.close()
        raise LoadError(f"cannot read {shorten(exc.filename or path)}: {exc.strerror or exc}") from None
    except BaseException:
        folder.close()
        raise
    return folder


def _walk_nodes(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if "codec" in node:
            yield node
        for value in node.values():
            yield from _walk_nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_nodes(item)


def _record_headers(root: Path) -> Iterator[tuple[str, dict]]:
    """(name, record) from every shard header, unvalidated: used only to explain a failed open."""
    if root.is_file():
        shards = [root]
    elif (root / INDEX_NAME).is_file():
        weight_map = json.loads((root / INDEX_NAME).read_text()).get("weight_map", {})
        shards = [root / s for s in sorted(set(weight_map.values()))]
    else:
        shards = [root / SINGLE_NAME]
    for shard in shards:
        try:
            meta = json.loads(SafetensorsFile(shard).metadata.get(QFORMAT_METADATA_KEY) or "{}")
        except (FormatError, ValueError, OSError):
            continue
        for name, record in (meta.get("records") or {}).items():
            if isinstance(record, dict):
                yield name, record


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# What a message may repeat from a model's files: text shaped like a codec name or a package requirement (a name
# and plain version bounds). Anything else (spaces, ';', '|', URLs, options) is withheld, and even a valid name is
# shown as the model's claim, never as a command to run: a model must not be able to make us advertise a command.
_CODEC_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}(\.[a-z][a-z0-9_]{0,63})?")
_VERSION_BOUND = r"(===?|~=|!=|>=|<=|>|<)[0-9][0-9A-Za-z.*+!-]{0,30}"
_PACKAGE_REQUIREMENT = re.compile(rf"[A-Za-z0-9]([A-Za-z0-9._-]{{0,98}}[A-Za-z0-9])?({_VERSION_BOUND}(,{_VERSION_BOUND})*)?")


def missing_codec_message(root: Path, exc: UnknownCodecError) -> str:
    """Which codecs the folder needs that no plugin provides, by which weights, and the provider package the folder
    names (only if it is a well-formed package requirement, and only as the folder's claim)."""
    known = REGISTRY.names()
    needed: dict[str, list[str]] = {}
    packages: dict[str, Any] = {}
    config_path = root / "config.json" if root.is_dir() else root.parent / "config.json"
    try:
        qconfig = json.loads(config_path.read_text()).get("quantization_config") or {}
        # codec_providers is the spec's field (container.md); "requires" is what early folders wrote
        providers = {**_as_dict(qconfig.get("requires")), **_as_dict(qconfig.get("codec_providers"))}
    except (OSError, ValueError, AttributeError):
        providers = {}
    for name, record in _record_headers(root):
        info = record.get("info") if isinstance(record.get("info"), dict) else {}
        for node in _walk_nodes(record.get("weight")):
            codec, version = node.get("codec"), node.get("version")
            if not isinstance(codec, str) or (codec in known and version in known[codec][0]):
                continue
            shown = repr(codec) if _CODEC_NAME.fullmatch(codec) else "with a malformed name"
            if codec in known:
                shown += f" version {version}" if type(version) is int else " (malformed version)"
            needed.setdefault(shown, []).append(name)
            package = providers.get(codec) or info.get("package") or info.get("plugin") or info.get("requires")
            if package is not None:
                packages.setdefault(shown, package)
    if not needed:
        return str(exc)
    parts = []
    for label, names in needed.items():
        what = (f"codec {label} (used by {len(names)} weight{'s' if len(names) > 1 else ''}, e.g. "
                f"{shorten(repr(names[0]), 80)})")
        package = packages.get(label)
        if isinstance(package, str) and _PACKAGE_REQUIREMENT.fullmatch(package):
            parts.append(f"{what}: the model names {package!r} as the package providing it (check that it is the "
                         "qformat plugin you expect before installing it)")
        elif package is not None:
            parts.append(f"{what}: the model's provider entry is not a plain package name, so it is not shown; "
                         "install the qformat plugin that provides this codec")
        else:
            parts.append(f"{what}: install the qformat plugin that provides it (the model does not name a package)")
    installed = ", ".join(sorted(known))
    from .plugins import get_plugins

    broken = sorted(f"{i.package} ({i.error})" for i in get_plugins().info.values() if i.error)
    hint = (f" Installed but broken plugins (one may be the provider; see `qformat plugins`): {'; '.join(broken)}."
            if broken else "")
    return (f"{shorten(root)} needs codecs that no installed plugin provides: " + "; ".join(parts)
            + f". Installed codecs: {installed}.{hint}")


# ---------------------------------------------------------------------------------------------------------------
# checksums
#
# config.json's quantization_config.files records {shard: {sha256, size}} at write time. Every load checks them
# (verify="auto"): a shard is hashed once, and the success is remembered by file identity (resolved path, device,
# inode, size, mtime_ns, ctime_ns, expected sha256) in a small JSON cache, so loading the same files again costs a
# stat per shard. Any write to a file changes its ctime (which no user call can set back), so a changed file is
# hashed again. verify=True hashes regardless of the cache; verify=False skips the check (unsafe: a corrupted shard
# then loads and computes garbage).

_SHA256 = re.compile(r"[0-9a-f]{64}")
VERIFY_CACHE_ENTRIES = 1024  # entries of files that still exist; the oldest are dropped beyond this
_warned_unverified: set[str] = set()


def verify_cache_path() -> Path:
    """``$QFORMAT_CACHE/verified.json``, by default ``~/.cache/qformat/verified.json``."""
    base = os.environ.get("QFORMAT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "qformat") / "verified.json"


def _read_verify_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or corrupt: start afresh
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _write_verify_cache(path: Path, entries: dict[str, dict]) -> None:
    """Atomically (a temporary file renamed over the cache); a cache that cannot be written only costs a rehash."""
    entries = {k: v for k, v in entries.items() if os.path.exists(k)}  # forget deleted folders
    if len(entries) > VERIFY_CACHE_ENTRIES:
        newest = sorted(entries, key=lambda k: entries[k].get("at", 0))[-VERIFY_CACHE_ENTRIES:]
        entries = {k: entries[k] for k in newest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": 1, "entries": entries}, handle)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _identity(path: Path, expected: str) -> tuple[str, list]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, expected]


def _recorded_checksums(folder: ModelFolder) -> tuple[Path, dict[str, Any] | None]:
    """(config.json path, {shard: expected entry}) for the shards this load reads; None where nothing is recorded."""
    if folder.path.is_dir():
        config_path = folder.root / "config.json"
        files = folder.quantization_config.get("files")
        if files is None:
            return config_path, None
        if not isinstance(files, dict) or set(files) != set(folder.shards):
            raise FormatError("checksum_mismatch", "quantization_config.files must list exactly the shards "
                              f"{sorted(folder.shards)[:4]}", file=str(config_path), field="quantization_config.files")
        return config_path, files
    # a single shard: its folder's config.json may record it
    config_path = folder.root / "config.json"
    try:
        config = json.loads(config_path.read_text())
        files = config["quantization_config"]["files"]
        entry = files[folder.shards[0]]
    except (OSError, ValueError, KeyError, TypeError):
        return config_path, None
    return config_path, {folder.shards[0]: entry}


def verify_shards(folder: ModelFolder, verify: VerifyMode = "auto") -> int:
    """Check the folder's shards against the sha256 and size config.json recorded when they were written.

    ``verify="auto"``: hash each shard unless the cache says these exact files were verified already;
    ``True``: hash every shard (and fail if the folder records no checksums); ``False``: check nothing (unsafe).
    A folder without recorded checksums (written by an old version, or a single file without its folder) loads with
    a warning under "auto". Returns the number of shards hashed. A mismatch raises ``FormatError("checksum_mismatch")``
    naming the shard.
    """
    if verify not in (True, False, "auto"):
        raise ValueError(f"verify must be True, False or 'auto', not {verify!r}")
    if verify is False:
        return 0
    config_path, files = _recorded_checksums(folder)
    if files is None:
        if verify is True:
            raise LoadError(f"{shorten(folder.path)}: config.json records no shard checksums "
                            "(quantization_config.files), so verify=True cannot be honoured; pass verify='auto' to "
                            "load it unverified")
        key = str(folder.path.resolve())
        if key not in _warned_unverified:
            _warned_unverified.add(key)
            warnings.warn(f"{shorten(folder.path)}: config.json records no shard checksums "
                          "(quantization_config.files); the shards are loaded unverified", UserWarning, stacklevel=3)
        return 0
    cache_path = verify_cache_path()
    cache = _read_verify_cache(cache_path) if verify == "auto" else {}
    verified: dict[str, dict] = {}
    for shard, expected in sorted(files.items()):
        target = folder.root / shard
        if not isinstance(expected, dict) or not _SHA256.fullmatch(str(expected.get("sha256"))):
            raise FormatError("bad_config", "each files entry must be an object with a sha256 (64 hex digits) and "
                              "a size", file=str(config_path), field=f"quantization_config.files.{shard}")
        size = target.stat().st_size
        if size != expected.get("size"):
            raise FormatError("checksum_mismatch", f"size is {size}, config.json records {shorten(repr(expected.get('size')), 40)}: "
                              "the shard is truncated or was changed after it was written", file=str(target))
        key, identity = _identity(target, expected["sha256"])
        if verify == "auto" and cache.get(key, {}).get("id") == identity:
            continue
        actual = sha256_file(target)
        if actual != expected["sha256"]:
            raise FormatError("checksum_mismatch", f"sha256 is {actual}, config.json records {expected['sha256']}: "
                              "the shard was changed after it was written (a corrupted download or copy, or an "
                              "edit); download or convert it again", file=str(target))
        verified[key] = {"id": identity, "at": time.time()}
    if verified:
        _write_verify_cache(cache_path, {**_read_verify_cache(cache_path), **verified})  # re-read: other processes
    return len(verified)


# ---------------------------------------------------------------------------------------------------------------
# building


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


def prepare_weight(qt: QuantizedTensor, device: str, kernel: str | None = None) -> tuple[PreparedWeight, str | None]:
    """A kernel's prepared weight for ``qt``: the dispatcher's choice, or the named kernel (``"torch"`` included)."""
    from qformat_kernels import dispatch

    if kernel is None:
        prepared = dispatch.prepare_weight(qt, device)
    else:
        kernels = dispatch.available_kernels()
        chosen = kernels.get(kernel)
        if chosen is None:
            raise PluginError(f"unknown kernel {kernel!r}; available kernels: {', '.join(kernels)}")
        if not dispatch.runs_on(chosen, device):
            raise PluginError(f"kernel {kernel!r} runs on {chosen.device}, not on {device}")
        if not chosen.supports(qt.record):
            raise PluginError(f"kernel {kernel!r} does not support {qt.name!r} (codec signature "
                              f"{signature(qt.record['weight'])}); leave the kernel unset to let the dispatcher choose")
        prepared = chosen.prepare(qt, device)
        if getattr(prepared, "kernel", None) is None:
            prepared.kernel = chosen
    return prepared, getattr(getattr(prepared, "kernel", None), "name", kernel)


def attach_prepared(model: nn.Module, folder: ModelFolder, swapped: Mapping[str, str], device: str,
                    kernel: str | None = None) -> None:
    """Prepare every QLinear's weight from the folder's mapped packed tensors."""
    for module_name, record_name in swapped.items():
        module = model.get_submodule(module_name)
        prepared, kernel_name = prepare_weight(folder.quantized(record_name), device, kernel)
        module.attach(prepared, kernel_name)
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
def _skeleton(source: str | os.PathLike, revision: str | None, dtype: torch.dtype | str | None,
              verify: VerifyMode) -> Iterator[tuple[Path, ModelFolder, torch.dtype, PreTrainedModel]]:
    """(folder path, the open folder, the resolved dtype, the model skeleton); the folder is closed afterwards
    (prepared weights and bound tensors keep the mappings they still use alive)."""
    path = resolve_source(source, revision)
    folder = open_model_folder(path, verify)
    try:
        config = _read_config(path)
        resolved = _resolve_dtype(dtype, config)
        yield path, folder, resolved, build_skeleton(config, resolved)
    finally:
        folder.close()


def load(source: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
         kernel: str | None = None, dtype: torch.dtype | str | None = None, fuse: bool = True,
         verify: VerifyMode = "auto") -> PreTrainedModel:
    """A transformers model whose quantized linears are :class:`QLinear` layers holding packed weights.

    ``source``: a qformat model folder or a Hub id (downloaded with :func:`qformat.hub.download_model`).
    ``kernel``: force one installed kernel (by name) instead of the dispatcher's choice.
    ``dtype``: dtype of the unquantized parts and activations; None is float32, "auto" the config's dtype.
    ``fuse``: stack sibling layers that read the same input (q/k/v, gate/up) where the kernel allows
    (:func:`qformat.nn.fuse_shared_inputs`; ``QFORMAT_FUSE=0`` also turns it off).
    ``verify``: check the shards against the checksums config.json records: "auto" (default) hashes files not
    verified before (remembered by file identity), True hashes every time, False skips the check (unsafe);
    see :func:`verify_shards`.
    """
    with _skeleton(source, revision, dtype, verify) as (path, folder, dtype, model):
        swapped = swap_in_qlinears(model, folder.records)
        check_complete(model, folder, path)
        unused = bind_plain_tensors(model, folder, dtype)
        device = _device_name(device)
        attach_prepared(model, folder, swapped, device, kernel)
        if fuse:
            fuse_shared_inputs(model)
        release_record_pages(folder, list(swapped.values()))
        _attach_metadata(model, path, folder)
        return finish(model, path, device, unused)


def load_dequantized(source: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
                     dtype: torch.dtype | str | None = None, verify: VerifyMode = "auto") -> PreTrainedModel:
    """The reference path: a plain transformers model whose quantized weights are the format's fp32 decode.

    Used to check kernels against the reference decoder and as a benchmark baseline; it holds full-size weights.
    ``verify`` as for :func:`load`.
    """
    with _skeleton(source, revision, dtype, verify) as (path, folder, dtype, model):
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


def load_any(source: str | os.PathLike, device: str | torch.device = "cpu", *, revision: str | None = None,
             kernel: str | None = None, dtype: torch.dtype | str | None = None,
             reference: bool = False, verify: VerifyMode = "auto") -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) for a qformat folder or Hub id (kernels, or ``reference`` decode), a plain transformers
    folder or Hub id, or a ``.gguf`` file (through transformers' ``gguf_file``). ``verify`` applies to qformat
    folders (see :func:`load`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dtype = "auto" if dtype == "auto" else _resolve_dtype(dtype, None)
    text = os.fspath(source)
    if text.endswith(".gguf"):
        path = Path(text).expanduser()
        if not _exists(path) or not path.is_file():
            raise LoadError(f"no such GGUF file: {shorten(path)}")
        kwargs = {"gguf_file": path.name}
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=hf_dtype, **kwargs)
        return model.to(device).eval(), AutoTokenizer.from_pretrained(path.parent, **kwargs)
    path = resolve_source(source, revision)
    root = path if path.is_dir() else path.parent
    if is_qformat_folder(path):
        model = (load_dequantized(path, device, dtype=dtype, verify=verify) if reference
                 else load(path, device, kernel=kernel, dtype=dtype, verify=verify))
    else:
        model = AutoModelForCausalLM.from_pretrained(root, dtype=hf_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(root)
