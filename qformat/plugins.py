"""Plugin discovery (pluggy + entry points in the group ``qformat``) and the registries it fills.

Environment:
- ``QFORMAT_PLUGINS=a,b``: load only the entry points named a and b (an allow-list; empty string loads none).
- ``QFORMAT_TRACE_PLUGINS=1``: print every hook call and its result to stderr.

A plugin that fails to import or to register (a hook that raises, a codec with an invalid name) is reported, with a
RuntimeWarning and in ``qformat plugins``, and the other plugins still load. Two plugins claiming one method, kernel or
codec name is an error: which meaning the user wants cannot be guessed.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .format import REGISTRY as CODECS
from .format import Codec
from .kernel_api import Kernel
from .methods import Method

ENTRY_POINT_GROUP = "qformat"


@dataclass
class PluginInfo:
    name: str  # entry point name
    module: str
    package: str  # distribution that declares the entry point
    version: str
    methods: list[str] = field(default_factory=list)
    codecs: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    info: dict[str, PluginInfo]
    methods: dict[str, type[Method]]
    kernels: dict[str, Kernel]
    method_owner: dict[str, str]
    kernel_owner: dict[str, str]


def _allowed() -> set[str] | None:
    raw = os.environ.get("QFORMAT_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _trace(manager: pluggy.PluginManager) -> None:
    def before(hook_name: str, impls: list, kwargs: dict) -> None:
        print(f"[qformat plugins] call {hook_name} on {[i.plugin_name for i in impls]}", file=sys.stderr)

    def after(outcome: Any, hook_name: str, impls: list, kwargs: dict) -> None:
        print(f"[qformat plugins] done {hook_name}: {outcome.exception or 'ok'}", file=sys.stderr)

    manager.add_hookcall_monitoring(before, after)


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_plugins(extra: list[tuple[str, Any]] | None = None) -> Plugins:
    """Load every allowed entry point (plus ``extra`` (name, module) pairs, for tests) and collect registrations."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    if os.environ.get("QFORMAT_TRACE_PLUGINS", "") not in ("", "0"):
        _trace(manager)
    allowed = _allowed()
    infos: dict[str, PluginInfo] = {}
    for ep in _entry_points():
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
        if manager.is_registered(module):
            continue
        manager.register(module, name=ep.name)
    for name, module in extra or []:
        infos[name] = PluginInfo(name, getattr(module, "__name__", str(module)), "(in-process)", "-")
        manager.register(module, name=name)

    plugins = Plugins(manager, infos, {}, {}, {}, {})
    _collect(plugins)
    return plugins


def _owner_label(plugins: Plugins, plugin_name: str) -> str:
    info = plugins.info.get(plugin_name)
    return f"{info.package} {info.version} (entry point {plugin_name!r})" if info else plugin_name


def _collect(plugins: Plugins) -> None:
    hook = plugins.manager.hook
    for impl in hook.qformat_register_methods.get_hookimpls():
        def register_method(cls: type[Method], _p: str = impl.plugin_name) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Method)) or not getattr(cls, "name", None):
                raise PluginError(f"{_owner_label(plugins, _p)} registered {cls!r}, which is not a named Method class")
            _claim(plugins, "method", plugins.methods, plugins.method_owner, cls.name, cls, _p)

        _call(plugins, impl, register_method)
    for impl in hook.qformat_register_codecs.get_hookimpls():
        def register_codec(codec: Codec, _p: str = impl.plugin_name) -> None:
            owner = _owner_label(plugins, _p)
            if not isinstance(codec, Codec):
                raise _RefusedCodec(f"registered {codec!r}, which is not a Codec instance")
            name = getattr(codec, "name", None)
            holder = CODECS.names().get(name, (None, owner))[1] if isinstance(name, str) else owner
            if holder not in (owner, "qformat"):  # a core name is refused below, as any dot-less name
                raise _clash("codec", name, holder, owner)
            try:
                CODECS.register(codec, owner=owner)
            except PluginError as exc:  # e.g. a dot-less name, reserved for the core; the message names plugin and codec
                raise _RefusedCodec(str(exc)) from exc
            except Exception as exc:
                raise _RefusedCodec(f"codec {name!r} could not be registered: {type(exc).__name__}: {exc}") from exc
            _info(plugins, _p).codecs.append(name)

        _call(plugins, impl, register_codec)
    for impl in hook.qformat_register_kernels.get_hookimpls():
        def register_kernel(kernel: Kernel, _p: str = impl.plugin_name) -> None:
            if not isinstance(kernel, Kernel):
                raise PluginError(f"{_owner_label(plugins, _p)} registered {kernel!r}, which is not a Kernel")
            _claim(plugins, "kernel", plugins.kernels, plugins.kernel_owner, kernel.name, kernel, _p)

        _call(plugins, impl, register_kernel)


def _info(plugins: Plugins, plugin_name: str) -> PluginInfo:
    return plugins.info.setdefault(plugin_name, PluginInfo(plugin_name, "?", "?", "?"))


def _clash(kind: str, name: str, first: str, second: str) -> PluginError:
    """Two plugins giving one name two meanings: refuse to guess which one the user wants."""
    return PluginError(f"{kind} {name!r} is claimed by two plugins: {first} and {second}"
                       "; uninstall one or exclude it with QFORMAT_PLUGINS")


def _claim(plugins: Plugins, kind: str, table: dict[str, Any], owners: dict[str, str], name: str, entry: Any,
           plugin_name: str) -> None:
    """Record that ``plugin_name`` provides the ``kind`` (method or kernel) ``name``."""
    if name in table:
        raise _clash(kind, name, _owner_label(plugins, owners[name]), _owner_label(plugins, plugin_name))
    table[name] = entry
    owners[name] = plugin_name
    getattr(_info(plugins, plugin_name), f"{kind}s").append(name)


class _RefusedCodec(Exception):
    """A plugin's codec cannot be registered: that plugin is reported broken, the others still load."""


def _mark_broken(info: PluginInfo, error: str) -> None:
    """Record why a plugin is (partly) unusable, and say so now: a load that needs it would otherwise fail obscurely."""
    info.error = error if info.error is None else f"{info.error}; {error}"
    warnings.warn(f"qformat plugin {info.package} {info.version} (entry point {info.name!r}) is broken: {error}"
                  " (the other plugins are unaffected; see `qformat plugins`)", RuntimeWarning, stacklevel=2)


def _call(plugins: Plugins, impl: pluggy.HookImpl, register: Any) -> None:
    try:
        impl.function(register=register)
    except PluginError:
        raise
    except Exception as exc:
        info = plugins.info.get(impl.plugin_name)
        if info is None:
            raise
        _mark_broken(info, str(exc) if isinstance(exc, _RefusedCodec) else f"{type(exc).__name__}: {exc}")


@lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide plugin set (loaded once)."""
    return build_plugins()


def reset_plugins() -> None:
    """Forget loaded plugins (tests; after changing QFORMAT_PLUGINS)."""
    get_plugins.cache_clear()


def get_method(name: str) -> Method:
    plugins = get_plugins()
    cls = plugins.methods.get(name)
    if cls is None:
        known = ", ".join(sorted(plugins.methods)) or "none installed"
        raise PluginError(f"unknown method {name!r}; installed methods: {known}")
    return cls()
