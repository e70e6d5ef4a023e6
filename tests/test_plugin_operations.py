"""Plugin operations: allow-list, hook tracing, name clashes between packages."""

from __future__ import annotations

import types

import pytest

from qformat.errors import PluginError
from qformat.hookspecs import hookimpl
from qformat.methods import Method
from qformat.plugins import build_plugins


def _plugin_registering(method_name: str) -> types.ModuleType:
    module = types.ModuleType(f"fake_{method_name}_plugin")
    cls = type("Fake", (Method,), {"name": method_name})

    @hookimpl
    def qformat_register_methods(register):
        register(cls)

    module.qformat_register_methods = qformat_register_methods
    return module


def test_allow_list_loads_only_named_entry_points(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn,spqr")
    plugins = build_plugins()
    assert set(plugins.methods) == {"rtn", "spqr"}
    assert set(plugins.info) == {"rtn", "spqr"}
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    assert build_plugins().methods == {}


def test_trace_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn")
    monkeypatch.setenv("QFORMAT_TRACE_PLUGINS", "1")
    plugins = build_plugins()
    plugins.manager.hook.qformat_register_methods(register=lambda cls: None)
    err = capsys.readouterr().err
    assert "[qformat plugins] call qformat_register_methods on ['rtn']" in err and "done" in err


def test_two_plugins_claiming_one_method_name_the_two_packages(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "gptq")
    with pytest.raises(PluginError) as error:
        build_plugins(extra=[("acme", _plugin_registering("gptq"))])
    message = str(error.value)
    assert "method 'gptq' is claimed by two plugins" in message
    assert "qformat 0.1.0 (entry point 'gptq')" in message and "(in-process)" in message


def test_non_method_registration_is_refused(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    module = types.ModuleType("bad_plugin")

    @hookimpl
    def qformat_register_methods(register):
        register(object)

    module.qformat_register_methods = qformat_register_methods
    with pytest.raises(PluginError, match="not a named Method class"):
        build_plugins(extra=[("bad", module)])
