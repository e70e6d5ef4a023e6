"""Open a qformat folder for running: validated records, plugin codecs, checksums, and what to say when a codec is
missing (never text from the file as a command to run)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, LoadError, PluginError, UnknownCodecError, shorten
from ..format import ModelFolder, iter_nodes, open_folder
from ..format.container import INDEX_NAME, QUANT_METHOD, SINGLE_NAME
from ..format.safetensors_io import QFORMAT_METADATA_KEY, SafetensorsFile
from .checksums import VerifyMode, verify_shards

if TYPE_CHECKING:
    pass

def local_path(source: str | os.PathLike) -> Path:
    """``source`` as a local path that exists; Hub ids are resolved a layer up (:func:`qformat.load`, the CLI)."""
    path = Path(os.fspath(source)).expanduser()
    if not _exists(path):
        raise LoadError(f"no such model folder or file: {shorten(path)}")
    return path


def _exists(path: Path) -> bool:
    """``path.exists()``, but a path the OS refuses to look up (e.g. a name over its length limit) is a LoadError."""
    try:
        return path.exists()
    except OSError as exc:
        raise LoadError(f"cannot use the path {shorten(path)}: {exc.strerror or exc}") from None


def open_model_folder(path: str | os.PathLike, verify: VerifyMode = "auto") -> ModelFolder:
    """Open and validate a qformat folder with the installed plugin set's codecs, and check its shard checksums.

    A record needing a codec that no installed plugin provides raises :class:`PluginError` naming the codec and,
    where the folder says (``quantization_config.codec_providers`` or a record's ``info``), the package that provides
    it. ``verify``: see :func:`verify_shards`.
    """
    from ..plugins import get_plugins

    try:
        folder = open_folder(path, registry=get_plugins().codecs)  # the core codecs and the installed plugins'
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
    from ..plugins import get_plugins

    known = get_plugins().codecs.names()
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
        for node in iter_nodes(record.get("weight")):
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
    broken = sorted(f"{i.package} ({i.error})" for i in get_plugins().info.values() if i.error)
    hint = (f" Installed but broken plugins (one may be the provider; see `qformat plugins`): {'; '.join(broken)}."
            if broken else "")
    return (f"{shorten(root)} needs codecs that no installed plugin provides: " + "; ".join(parts)
            + f". Installed codecs: {installed}.{hint}")
