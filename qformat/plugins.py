"""Plugin discovery (pluggy + entry points in the group ``qformat``) and the plugin set it builds.

A :class:`Plugins` set owns everything the installed plugins registered: method and kernel instances, and
``codecs``, a codec registry holding the core codecs plus the plugins' (readers get it as ``registry=...``; the
format layer itself knows only the core codecs). Nothing global is mutated: :func:`reset_plugins` forgets the set and
the next :func:`get_plugins` discovers a fresh one.

Environment:
- ``QFORMAT_PLUGINS=a,b``: load only the entry points named a and b (an allow-list; empty string loads none).
- ``QFORMAT_TRACE_PLUGINS=1``: print every hook call (which plugin, its package and version) and its outcome to
  stderr. Hooks are called through pluggy one plugin at a time, so the trace shows each plugin's call.

A plugin that fails to import or to register (a hook that raises, a class registered instead of an instance, a codec
with an invalid name) is reported, with a RuntimeWarning and in ``qformat plugins``, and the other plugins still
load. Two plugins claiming one method, transform, kernel or codec name is an error: which meaning the user wants cannot be
guessed.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .exporters import Exporter
from .format import CORE_CODECS, Codec, CodecRegistry
from .importers import Importer
from .kernel_api import Kernel
from .methods import Method
from .transforms import Transform

ENTRY_POINT_GROUP = "qformat"
TRACE_PREFIX = "[qformat plugins]"


@dataclass
class PluginInfo:
    name: str  # entry point name
    module: str
    package: str  # distribution that declares the entry point
    version: str
    methods: list[str] = field(default_factory=list)
    codecs: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    transforms: list[str] = field(default_factory=list)
    importers: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Plugins:
    """The discovered plugin set: what each plugin registered, by name, and which plugin (entry point) owns it."""

    manager: pluggy.PluginManager | None
    info: dict[str, PluginInfo]
    methods: dict[str, Method]
    kernels: dict[str, Kernel]
    method_owner: dict[str, str]
    kernel_owner: dict[str, str]
    codec_owner: dict[str, str] = field(default_factory=dict)
    # The core codecs plus every plugin codec; frozen once discovery is done. Pass it to readers: registry=...
    codecs: CodecRegistry = field(default_factory=lambda: CORE_CODECS)
    transforms: dict[str, Transform] = field(default_factory=dict)
    transform_owner: dict[str, str] = field(default_factory=dict)
    importers: dict[str, Importer] = field(default_factory=dict)
    importer_owner: dict[str, str] = field(default_factory=dict)
    exporters: dict[str, Exporter] = field(default_factory=dict)
    exporter_owner: dict[str, str] = field(default_factory=dict)


def _allowed() -> set[str] | None:
    raw = os.environ.get("QFORMAT_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def installed_entry_points() -> list[metadata.EntryPoint]:
    """The entry points in the group ``qformat`` of the installed distributions, by name."""
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _owner_label(plugins: Plugins, plugin_name: str) -> str:
    info = plugins.info.get(plugin_name)
    return f"{info.package} {info.version} (entry point {plugin_name!r})" if info else plugin_name


def _trace(manager: pluggy.PluginManager, plugins: Plugins) -> None:
    """Print each hook call pluggy executes: the plugin (with package and version), then what it registered."""
    def who(impls: list) -> str:
        return ", ".join(_owner_label(plugins, i.plugin_name) for i in impls) or "no plugin"

    def before(hook_name: str, impls: list, kwargs: dict) -> None:
        print(f"{TRACE_PREFIX} call {hook_name} on {who(impls)}", file=sys.stderr)

    def after(outcome: Any, hook_name: str, impls: list, kwargs: dict) -> None:
        registered = getattr(kwargs.get("register"), "registered", [])
        result = (f"error {type(outcome.exception).__name__}: {outcome.exception}" if outcome.exception
                  else f"ok, registered {registered or 'nothing'}")
        print(f"{TRACE_PREFIX} done {hook_name} on {who(impls)}: {result}", file=sys.stderr)

    manager.add_hookcall_monitoring(before, after)


def build_plugins(extra: Iterable[tuple[str, Any]] | None = None,
                  entry_points: Iterable[Any] | None = None) -> Plugins:
    """Discover plugins and collect what they register into a new :class:`Plugins` set.

    ``entry_points``: the entry points to load (default :func:`installed_entry_points`; tests pass stand-ins with
    ``name``, ``value``, ``dist`` (``name``, ``version``) and ``load()``), filtered by ``QFORMAT_PLUGINS``.
    ``extra``: (name, module) pairs registered in-process besides them (tests, notebooks).
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager, {}, {}, {}, {}, {}, {}, CORE_CODECS.copy())
    if os.environ.get("QFORMAT_TRACE_PLUGINS", "") not in ("", "0"):
        _trace(manager, plugins)
    allowed = _allowed()
    infos = plugins.info
    for ep in installed_entry_points() if entry_points is None else entry_points:
        if allowed is not None and ep.name not in allowed:
            continue
        dist = ep.dist
        info = PluginInfo(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
        infos[ep.name] = info
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down; it is reported in `qformat plugins`
            _mark_broken(info, f"{type(exc).__name__}: {exc}")
            continue
        _add(manager, info, module)
    for name, module in extra or []:
        infos[name] = PluginInfo(name, getattr(module, "__name__", str(module)), "(in-process)", "-")
        _add(manager, infos[name], module)
    _collect(plugins)
    plugins.codecs.freeze()
    return plugins


def _add(manager: pluggy.PluginManager, info: PluginInfo, module: Any) -> None:
    try:
        hash(module)  # pluggy calls one plugin at a time by leaving the others out of a set
    except TypeError:
        _mark_broken(info, f"the entry point names an unhashable {type(module).__name__}; name a module")
        return
    if manager.is_registered(module):
        return
    try:
        manager.register(module, name=info.name)
    except Exception as exc:  # e.g. a hook implementation whose arguments the hook does not have
        _mark_broken(info, f"{type(exc).__name__}: {exc}".replace("\n", "; "))


class RegistrationRefused(PluginError):
    """A plugin registered something qformat cannot use: that plugin is reported broken, the others still load."""


class NameClash(PluginError):
    """Two plugins claim one method, transform, kernel or codec name: fatal, since which one the user wants cannot be guessed."""


def _refuse_non_instance(obj: Any, contract: type, kind: str) -> None:
    """Refuse (one line, raised into the plugin's hook) anything but a named instance of the contract class."""
    if isinstance(obj, contract) and isinstance(getattr(obj, "name", None), str) and obj.name:
        return
    if isinstance(obj, type):
        raise RegistrationRefused(f"registered the class {obj.__name__}: register an instance: "
                                  f"register({obj.__name__}())")
    if isinstance(obj, contract):
        raise RegistrationRefused(f"registered a {kind} without a name: set the class attribute `name`")
    raise RegistrationRefused(f"registered {obj!r}, which is not a {contract.__module__}.{contract.__name__}: "
                              f"register an instance: register(My{contract.__name__}())")


def _registrar(kind: str, contract: type) -> Callable[[Plugins, str], Callable[[Any], None]]:
    """The registrar factory of one plugin kind: ``register(obj)`` accepts a named instance of ``contract`` and files
    it under ``plugins.<kind>s`` / ``plugins.<kind>_owner`` (a name two plugins claim is a :class:`NameClash`)."""
    def make(plugins: Plugins, plugin_name: str) -> Callable[[Any], None]:
        table, owners = getattr(plugins, f"{kind}s"), getattr(plugins, f"{kind}_owner")

        def register(obj: Any) -> None:
            _refuse_non_instance(obj, contract, kind)
            _claim(plugins, kind, table, owners, obj.name, obj, plugin_name)
            register.registered.append(obj.name)

        register.registered = []
        return register

    return make


def _codec_registrar(plugins: Plugins, plugin_name: str) -> Callable[[Codec], None]:
    def register(codec: Codec) -> None:
        owner = _owner_label(plugins, plugin_name)
        if not isinstance(codec, Codec):
            _refuse_non_instance(codec, Codec, "codec")
        name = getattr(codec, "name", None)
        holder = plugins.codec_owner.get(name) if isinstance(name, str) else None
        if holder is not None and holder != plugin_name:
            raise _clash("codec", name, _owner_label(plugins, holder), owner)
        try:
            plugins.codecs.register(codec, owner=owner)
        except PluginError as exc:  # e.g. a dot-less name, reserved for the core; the message names plugin and codec
            raise RegistrationRefused(str(exc)) from exc
        except Exception as exc:
            raise RegistrationRefused(f"codec {name!r} could not be registered: {type(exc).__name__}: {exc}") from exc
        plugins.codec_owner[name] = plugin_name
        _info(plugins, plugin_name).codecs.append(name)
        register.registered.append(name)

    register.registered = []
    return register


# Hook order: methods, transforms, importers, exporters, then codecs, then kernels (a kernel may look at the codecs
# when it is built).
_HOOKS = (("qformat_register_methods", _registrar("method", Method)),
          ("qformat_register_transforms", _registrar("transform", Transform)),
          ("qformat_register_importers", _registrar("importer", Importer)),
          ("qformat_register_exporters", _registrar("exporter", Exporter)),
          ("qformat_register_codecs", _codec_registrar),
          ("qformat_register_kernels", _registrar("kernel", Kernel)))


def _collect(plugins: Plugins) -> None:
    manager = plugins.manager
    for hook_name, registrar in _HOOKS:
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            _call(plugins, hook_name, impl.plugin_name, registrar(plugins, impl.plugin_name))


def _call(plugins: Plugins, hook_name: str, plugin_name: str, register: Callable[[Any], None]) -> None:
    """Call one plugin's hook through pluggy (so tracing and hook monitoring see it), isolating its failures."""
    manager = plugins.manager
    this = manager.get_plugin(plugin_name)
    others = [p for _, p in manager.list_name_plugin() if p is not None and p is not this]
    try:
        manager.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
    except RegistrationRefused as exc:
        _mark_broken(_info(plugins, plugin_name), str(exc))
    except NameClash:
        raise
    except Exception as exc:
        _mark_broken(_info(plugins, plugin_name), f"{type(exc).__name__}: {exc}")


def _info(plugins: Plugins, plugin_name: str) -> PluginInfo:
    return plugins.info.setdefault(plugin_name, PluginInfo(plugin_name, "?", "?", "?"))


def _clash(kind: str, name: str, first: str, second: str) -> NameClash:
    """Two plugins giving one name two meanings: refuse to guess which one the user wants."""
    return NameClash(f"{kind} {name!r} is claimed by two plugins: {first} and {second}"
                       "; uninstall one or exclude it with QFORMAT_PLUGINS")


def _claim(plugins: Plugins, kind: str, table: dict[str, Any], owners: dict[str, str], name: str, entry: Any,
           plugin_name: str) -> None:
    """Record that ``plugin_name`` provides the ``kind`` (method, transform, importer, exporter or kernel) ``name``."""
    if name in table:
        raise _clash(kind, name, _owner_label(plugins, owners[name]), _owner_label(plugins, plugin_name))
    table[name] = entry
    owners[name] = plugin_name
    getattr(_info(plugins, plugin_name), f"{kind}s").append(name)


def _mark_broken(info: PluginInfo, error: str) -> None:
    """Record why a plugin is (partly) unusable, and say so now: a load that needs it would otherwise fail obscurely."""
    info.error = error if info.error is None else f"{info.error}; {error}"
    warnings.warn(f"qformat plugin {info.package} {info.version} (entry point {info.name!r}) is broken: {error}"
                  " (the other plugins are unaffected; see `qformat plugins`)", RuntimeWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------------------------
# the process-wide plugin set

_lock = threading.RLock()
_current: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, discovered on first use (again after :func:`reset_plugins`)."""
    global _current
    with _lock:
        if _current is None:
            _current = build_plugins()
        return _current


def reset_plugins() -> None:
    """Forget the plugin set (after changing QFORMAT_PLUGINS or installing a plugin): the next
    :func:`get_plugins` discovers a fresh one, with a fresh codec registry."""
    global _current
    with _lock:
        _current = None


@contextmanager
def use_plugins(plugins: Plugins) -> Iterator[Plugins]:
    """Make ``plugins`` the process-wide set inside the ``with`` block (tests: ``build_plugins(extra=...)``)."""
    global _current
    with _lock:
        previous, _current = _current, plugins
    try:
        yield plugins
    finally:
        with _lock:
            _current = previous


def get_method(name: str) -> Method:
    """The registered instance of method ``name`` (methods keep no state between layers, so one instance serves)."""
    plugins = get_plugins()
    method = plugins.methods.get(name)
    if method is None:
        known = ", ".join(sorted(plugins.methods)) or "none installed"
        raise PluginError(f"unknown method {name!r}; installed methods: {known}")
    return method


def get_transform(name: str) -> Transform:
    """The registered instance of block transform ``name`` (one instance serves every block)."""
    plugins = get_plugins()
    transform = plugins.transforms.get(name)
    if transform is None:
        known = ", ".join(sorted(plugins.transforms)) or "none installed"
        raise PluginError(f"unknown transform {name!r}; installed transforms: {known}")
    return transform


def get_importer(name: str) -> Importer:
    """The registered importer ``name``."""
    plugins = get_plugins()
    importer = plugins.importers.get(name)
    if importer is None:
        known = ", ".join(sorted(plugins.importers)) or "none installed"
        raise PluginError(f"unknown import format {name!r}; installed importers: {known}")
    return importer


def get_exporter(name: str) -> Exporter:
    """The registered exporter ``name``."""
    plugins = get_plugins()
    exporter = plugins.exporters.get(name)
    if exporter is None:
        known = ", ".join(sorted(plugins.exporters)) or "none installed"
        raise PluginError(f"unknown export format {name!r}; installed exporters: {known}")
    return exporter


def detect_importer(source: Path) -> Importer | None:
    """The importer that reads ``source`` (highest ``priority`` among those that detect it), or None."""
    found = [imp for imp in get_plugins().importers.values() if _detects(imp, source)]
    return max(found, key=lambda imp: imp.priority) if found else None


def _detects(importer: Importer, source: Path) -> bool:
    try:
        return bool(importer.detect(source))
    except Exception as exc:  # detection must never break another importer's source; say which one misbehaved
        warnings.warn(f"importer {importer.name!r} failed to inspect {source}: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=2)
        return False
