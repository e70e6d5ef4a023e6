"""Plugin discovery (pluggy + entry points in the group ``qformat``) and the registries it fills.

Environment:
- ``QFORMAT_PLUGINS=a,b``: load only the entry points named a and b (an allow-list; empty string loads none).
- ``QFORMAT_TRACE_PLUGINS=1``: print every hook call and its result to stderr.
"""

from __future__ import annotations

import os
import sys
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
            info.error = f"{type(exc).__name__}: {exc}"
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
            if cls.name in plugins.methods:
                raise PluginError(f"method {cls.name!r} is claimed by two plugins: "
                                  f"{_owner_label(plugins, plugins.method_owner[cls.name])} and {_owner_label(plugins, _p)}"
                                  "; uninstall one or exclude it with QFORMAT_PLUGINS")
            plugins.methods[cls.name] = cls
            plugins.method_owner[cls.name] = _p
            plugins.info.setdefault(_p, PluginInfo(_p, "?", "?", "?")).methods.append(cls.name)

        _call(plugins, impl, register_method)
    for impl in hook.qformat_register_codecs.get_hookimpls():
        def register_codec(codec: Codec, _p: str = impl.plugin_name) -> None:
            if not isinstance(codec, Codec):
                raise PluginError(f"{_owner_label(plugins, _p)} registered {codec!r}, which is not a Codec instance")
            CODECS.register(codec, owner=_owner_label(plugins, _p))
            plugins.info.setdefault(_p, PluginInfo(_p, "?", "?", "?")).codecs.append(codec.name)

        _call(plugins, impl, register_codec)
    for impl in hook.qformat_register_kernels.get_hookimpls():
        def register_kernel(kernel: Kernel, _p: str = impl.plugin_name) -> None:
            if not isinstance(kernel, Kernel):
                raise PluginError(f"{_owner_label(plugins, _p)} registered {kernel!r}, which is not a Kernel")
            if kernel.name in plugins.kernels:
                raise PluginError(f"kernel {kernel.name!r} is claimed by two plugins: "
                                  f"{_owner_label(plugins, plugins.kernel_owner[kernel.name])} and "
                                  f"{_owner_label(plugins, _p)}")
            plugins.kernels[kernel.name] = kernel
            plugins.kernel_owner[kernel.name] = _p
            plugins.info.setdefault(_p, PluginInfo(_p, "?", "?", "?")).kernels.append(kernel.name)

        _call(plugins, impl, register_kernel)


def _call(plugins: Plugins, impl: pluggy.HookImpl, register: Any) -> None:
    try:
        impl.function(register=register)
    except PluginError:
        raise
    except Exception as exc:
        info = plugins.info.get(impl.plugin_name)
        if info is not None:
            info.error = f"{type(exc).__name__}: {exc}"
        else:
            raise


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
