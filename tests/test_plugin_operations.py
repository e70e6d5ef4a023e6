"""Plugin operations: allow-list, hook tracing, name clashes between packages, broken codec plugins."""

from __future__ import annotations

import types

import pytest

from qformat import plugins as plugins_module
from qformat.errors import PluginError
from qformat.format import REGISTRY as CODECS
from qformat.format import Codec
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


class _Dist:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version


class _EntryPoint:
    """Stands in for an installed distribution's entry point in the group ``qformat``."""

    def __init__(self, name: str, module: types.ModuleType, package: str, version: str = "1.0") -> None:
        self.name, self.value, self.dist, self._module = name, module.__name__, _Dist(package, version), module

    def load(self) -> types.ModuleType:
        return self._module


def _codec_named(name):
    return type("FakeCodec", (Codec,), {"name": name})()


def _plugin_registering_codecs(module_name: str, *codecs) -> types.ModuleType:
    module = types.ModuleType(module_name)

    @hookimpl
    def qformat_register_codecs(register):
        for codec in codecs:
            register(codec)

    module.qformat_register_codecs = qformat_register_codecs
    return module


@pytest.fixture
def installed(monkeypatch):
    """Install fake entry points beside the real ``rtn``; the global codec registry is restored afterwards."""
    monkeypatch.delenv("QFORMAT_PLUGINS", raising=False)
    monkeypatch.setattr(CODECS, "_codecs", dict(CODECS._codecs))
    monkeypatch.setattr(CODECS, "_owners", dict(CODECS._owners))
    real = [ep for ep in plugins_module._entry_points() if ep.name == "rtn"]

    def install(*fakes: _EntryPoint) -> None:
        monkeypatch.setattr(plugins_module, "_entry_points", lambda: sorted([*real, *fakes], key=lambda e: e.name))

    return install


@pytest.mark.parametrize("bad_name", ["widget", "Acme.Widget", 7])
def test_codec_with_an_invalid_name_reports_its_plugin_and_the_others_load(installed, bad_name):
    good = _EntryPoint("good", _plugin_registering_codecs("good_mod", _codec_named("good.widget")), "qformat-good")
    broken = _EntryPoint("acme", _plugin_registering_codecs("acme_mod", _codec_named(bad_name)), "qformat-acme", "2.1")
    installed(broken, good)
    with pytest.warns(RuntimeWarning) as caught:
        plugins = build_plugins()
    (warning,) = [str(w.message) for w in caught]
    assert "qformat-acme 2.1 (entry point 'acme')" in warning and repr(bad_name) in warning
    assert repr(bad_name) in plugins.info["acme"].error and plugins.info["acme"].codecs == []
    assert plugins.info["good"].error is None and plugins.info["good"].codecs == ["good.widget"]
    assert "rtn" in plugins.methods and plugins.info["rtn"].error is None
    names = CODECS.names()
    assert "good.widget" in names and bad_name not in names


def test_codec_registration_that_raises_reports_its_plugin(installed):
    module = types.ModuleType("exploding_mod")

    @hookimpl
    def qformat_register_codecs(register):
        register(_codec_named("boom.first"))
        raise OSError("codebook file missing")

    module.qformat_register_codecs = qformat_register_codecs
    installed(_EntryPoint("boom", module, "qformat-boom"))
    with pytest.warns(RuntimeWarning, match=r"qformat-boom 1\.0 \(entry point 'boom'\) is broken: OSError: codebook"):
        plugins = build_plugins()
    assert plugins.info["boom"].error == "OSError: codebook file missing"
    assert "rtn" in plugins.methods


def test_a_core_codec_name_cannot_be_taken_by_a_plugin(installed):
    installed(_EntryPoint("acme", _plugin_registering_codecs("acme_mod", _codec_named("affine")), "qformat-acme"))
    with pytest.warns(RuntimeWarning, match="'affine'"):
        plugins = build_plugins()
    assert "dot-less names are reserved" in plugins.info["acme"].error
    assert CODECS.names()["affine"][1] == "qformat"


def test_two_plugins_claiming_one_codec_name_is_still_an_error(installed):
    installed(_EntryPoint("one", _plugin_registering_codecs("one_mod", _codec_named("x.same")), "qformat-one"),
              _EntryPoint("two", _plugin_registering_codecs("two_mod", _codec_named("x.same")), "qformat-two"))
    with pytest.raises(PluginError, match=r"codec 'x.same' is claimed by two plugins: qformat-one .* qformat-two"):
        build_plugins()


def test_a_plugin_that_fails_to_import_is_reported_with_a_warning(installed):
    class Unloadable(_EntryPoint):
        def load(self):
            raise ImportError("no module named 'torch_extra'")

    installed(Unloadable("gone", types.ModuleType("gone_mod"), "qformat-gone"))
    with pytest.warns(RuntimeWarning, match="qformat-gone 1.0 .* ImportError"):
        plugins = build_plugins()
    assert plugins.info["gone"].error.startswith("ImportError") and "rtn" in plugins.methods
