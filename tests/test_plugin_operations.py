"""Plugin operations: allow-list, hook tracing, name clashes between packages, broken plugins, instance-only
registration, and the plugin set owning its codec registry (nothing global is mutated)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qformat.errors import PluginError
from qformat.format import CORE_CODECS, Codec, RecordBuilder
from qformat.kernel_api import Kernel
from qformat.methods import Method
from qformat.plugin import hookimpl
from qformat.plugins import build_plugins, get_method, get_plugins, installed_entry_points, reset_plugins, use_plugins


def _module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def _plugin_registering(method_name: str) -> types.ModuleType:
    cls = type("Fake", (Method,), {"name": method_name})
    return _module(f"fake_{method_name}_plugin", qformat_register_methods=lambda register: register(cls()))


def test_allow_list_loads_only_named_entry_points(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn,spqr")
    plugins = build_plugins()
    assert set(plugins.methods) == {"rtn", "spqr"}
    assert set(plugins.info) == {"rtn", "spqr"}
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    assert build_plugins().methods == {}


def test_trace_prints_each_hook_call_with_its_plugin(monkeypatch, capsys):
    """Hooks are called through pluggy, one plugin at a time, so the monitor sees (and prints) every call."""
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn,numba_kernels")
    monkeypatch.setenv("QFORMAT_TRACE_PLUGINS", "1")
    build_plugins()
    err = capsys.readouterr().err
    assert "[qformat plugins] call qformat_register_methods on qformat 0.1.0 (entry point 'rtn')" in err
    assert "[qformat plugins] done qformat_register_methods on qformat 0.1.0 (entry point 'rtn'): ok, registered " \
           "['rtn']" in err
    assert "call qformat_register_kernels on qformat 0.1.0 (entry point 'numba_kernels')" in err
    monkeypatch.delenv("QFORMAT_TRACE_PLUGINS")
    build_plugins()
    assert capsys.readouterr().err == ""


def test_trace_reports_a_failing_hook_and_its_package(monkeypatch, capsys):
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    monkeypatch.setenv("QFORMAT_TRACE_PLUGINS", "1")

    def explode(register):
        raise OSError("codebook file missing")

    with pytest.warns(RuntimeWarning):
        build_plugins(extra=[("boom", _module("boom_mod", qformat_register_codecs=explode))])
    err = capsys.readouterr().err
    assert "call qformat_register_codecs on (in-process) - (entry point 'boom')" in err
    assert "done qformat_register_codecs on (in-process) - (entry point 'boom'): error OSError: codebook" in err


def test_trace_from_the_command_line():
    """`QFORMAT_TRACE_PLUGINS=1 qformat plugins` traces every hook call on stderr, naming each plugin."""
    env = {**os.environ, "QFORMAT_TRACE_PLUGINS": "1", "QFORMAT_PLUGINS": "rtn,gptq,numba_kernels"}
    script = Path(sys.executable).with_name("qformat")  # the console script of this environment
    command = [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from qformat.cli import "
                                                      "main; sys.exit(main())"]
    result = subprocess.run([*command, "plugins"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    calls = [line for line in result.stderr.splitlines() if line.startswith("[qformat plugins] call ")]
    assert "[qformat plugins] call qformat_register_methods on qformat 0.1.0 (entry point 'gptq')" in calls
    assert "[qformat plugins] call qformat_register_methods on qformat 0.1.0 (entry point 'rtn')" in calls
    assert "[qformat plugins] call qformat_register_kernels on qformat 0.1.0 (entry point 'numba_kernels')" in calls
    assert len(calls) == 3  # one per plugin and hook it implements
    assert "method rtn" in result.stdout


def test_two_plugins_claiming_one_method_name_the_two_packages(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "gptq")
    with pytest.raises(PluginError) as error:
        build_plugins(extra=[("acme", _plugin_registering("gptq"))])
    message = str(error.value)
    assert "method 'gptq' is claimed by two plugins" in message
    assert "qformat 0.1.0 (entry point 'gptq')" in message and "(in-process)" in message


class Widget(Method):
    name = "widget"


class WidgetKernel(Kernel):
    name = "widget-kernel"
    device = "cpu"


class WidgetCodec(Codec):
    name = "acme.widget"


@pytest.mark.parametrize(("hook", "registered", "message"), [
    ("qformat_register_methods", Widget, r"registered the class Widget: register an instance: register\(Widget\(\)\)"),
    ("qformat_register_kernels", WidgetKernel,
     r"registered the class WidgetKernel: register an instance: register\(WidgetKernel\(\)\)"),
    ("qformat_register_codecs", WidgetCodec,
     r"registered the class WidgetCodec: register an instance: register\(WidgetCodec\(\)\)"),
    ("qformat_register_methods", object(),
     r"registered <object object at \w+>, which is not a qformat\.methods\.Method: register an instance"),
])
def test_a_class_or_a_stranger_is_refused_and_the_others_load(monkeypatch, hook, registered, message):
    """One registration style: instances. Anything else breaks only the plugin that registered it."""
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn")
    bad = _module("bad_plugin", **{hook: lambda register: register(registered)})
    with pytest.warns(RuntimeWarning, match=r"\(entry point 'bad'\) is broken: " + message):
        plugins = build_plugins(extra=[("bad", bad)])
    assert "\n" not in plugins.info["bad"].error
    assert "rtn" in plugins.methods and plugins.info["rtn"].error is None
    assert "widget" not in plugins.methods and "widget-kernel" not in plugins.kernels
    assert "acme.widget" not in plugins.codecs


def test_get_method_returns_the_registered_instance(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    widget = Widget()
    with use_plugins(build_plugins(extra=[("w", _module("w", qformat_register_methods=lambda register: register(widget)))])):
        assert get_method("widget") is widget
        with pytest.raises(PluginError, match="unknown method 'rtn'; installed methods: widget"):
            get_method("rtn")


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
    def register_all(register):
        for codec in codecs:
            register(codec)

    return _module(module_name, qformat_register_codecs=register_all)


@pytest.fixture
def installed(monkeypatch):
    """Build a plugin set from fake entry points beside the real ``rtn`` (public API: ``entry_points=``)."""
    monkeypatch.delenv("QFORMAT_PLUGINS", raising=False)
    real = [ep for ep in installed_entry_points() if ep.name == "rtn"]

    def build(*fakes: _EntryPoint):
        return build_plugins(entry_points=[*real, *fakes])

    return build


@pytest.mark.parametrize("bad_name", ["widget", "Acme.Widget", 7])
def test_codec_with_an_invalid_name_reports_its_plugin_and_the_others_load(installed, bad_name):
    good = _EntryPoint("good", _plugin_registering_codecs("good_mod", _codec_named("good.widget")), "qformat-good")
    broken = _EntryPoint("acme", _plugin_registering_codecs("acme_mod", _codec_named(bad_name)), "qformat-acme", "2.1")
    with pytest.warns(RuntimeWarning) as caught:
        plugins = installed(broken, good)
    (warning,) = [str(w.message) for w in caught]
    assert "qformat-acme 2.1 (entry point 'acme')" in warning and repr(bad_name) in warning
    assert repr(bad_name) in plugins.info["acme"].error and plugins.info["acme"].codecs == []
    assert plugins.info["good"].error is None and plugins.info["good"].codecs == ["good.widget"]
    assert "rtn" in plugins.methods and plugins.info["rtn"].error is None
    names = plugins.codecs.names()
    assert "good.widget" in names and bad_name not in names


def test_codec_registration_that_raises_reports_its_plugin(installed):
    def register_then_fail(register):
        register(_codec_named("boom.first"))
        raise OSError("codebook file missing")

    boom = _EntryPoint("boom", _module("exploding_mod", qformat_register_codecs=register_then_fail), "qformat-boom")
    with pytest.warns(RuntimeWarning, match=r"qformat-boom 1\.0 \(entry point 'boom'\) is broken: OSError: codebook"):
        plugins = installed(boom)
    assert plugins.info["boom"].error == "OSError: codebook file missing"
    assert "rtn" in plugins.methods


def test_a_core_codec_name_cannot_be_taken_by_a_plugin(installed):
    with pytest.warns(RuntimeWarning, match="'affine'"):
        plugins = installed(_EntryPoint("acme", _plugin_registering_codecs("acme_mod", _codec_named("affine")),
                                        "qformat-acme"))
    assert "dot-less names are reserved" in plugins.info["acme"].error
    assert plugins.codecs.names()["affine"][1] == "qformat"


def test_two_plugins_claiming_one_codec_name_is_still_an_error(installed):
    with pytest.raises(PluginError, match=r"codec 'x.same' is claimed by two plugins: qformat-one .* qformat-two"):
        installed(_EntryPoint("one", _plugin_registering_codecs("one_mod", _codec_named("x.same")), "qformat-one"),
                  _EntryPoint("two", _plugin_registering_codecs("two_mod", _codec_named("x.same")), "qformat-two"))


def test_a_plugin_that_fails_to_import_is_reported_with_a_warning(installed):
    class Unloadable(_EntryPoint):
        def load(self):
            raise ImportError("no module named 'torch_extra'")

    with pytest.warns(RuntimeWarning, match="qformat-gone 1.0 .* ImportError"):
        plugins = installed(Unloadable("gone", types.ModuleType("gone_mod"), "qformat-gone"))
    assert plugins.info["gone"].error.startswith("ImportError") and "rtn" in plugins.methods


def test_the_plugin_set_owns_its_codecs_and_the_core_registry_is_read_only(installed):
    """No global codec table: each plugin set has its own registry (core + its plugins), frozen after discovery."""
    plugins = installed(_EntryPoint("good", _plugin_registering_codecs("good_mod", _codec_named("good.widget")),
                                    "qformat-good"))
    assert "good.widget" in plugins.codecs and plugins.codec_owner["good.widget"] == "good"
    assert plugins.codecs.owner("good.widget") == "qformat-good 1.0 (entry point 'good')"
    assert "good.widget" not in CORE_CODECS and "good.widget" not in installed().codecs
    for registry in (CORE_CODECS, plugins.codecs):
        with pytest.raises(PluginError, match="read-only"):
            registry.register(_codec_named("late.codec"), owner="late")
    extended = plugins.codecs.copy()
    extended.register(_codec_named("late.codec"), owner="late")
    assert "late.codec" in extended and "late.codec" not in plugins.codecs


def test_reset_plugins_really_resets(monkeypatch):
    """After reset_plugins() the next get_plugins() discovers a fresh set, codec registry included."""
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn")
    reset_plugins()
    try:
        first = get_plugins()
        assert get_plugins() is first and set(first.methods) == {"rtn"}
        monkeypatch.setenv("QFORMAT_PLUGINS", "gptq")
        reset_plugins()
        second = get_plugins()
        assert second is not first and set(second.methods) == {"gptq"}
        assert second.codecs is not first.codecs
    finally:
        monkeypatch.delenv("QFORMAT_PLUGINS")
        reset_plugins()


def test_use_plugins_installs_a_set_for_a_block(monkeypatch):
    before = get_plugins()  # the process-wide set, discovered with the environment every other test sees
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    built = build_plugins(extra=[("w", _module("w", qformat_register_methods=lambda register: register(Widget())))])
    with use_plugins(built):
        assert get_plugins() is built
    assert get_plugins() is before


def test_record_builder_node_builds_plugin_codecs_against_its_registry(installed):
    """RecordBuilder.node(codec, version, **fields) builds any node; finish validates it against the builder's
    registry: the plugin set's knows the codec, the core's does not."""
    import numpy as np

    from qformat.errors import UnknownCodecError

    class Negate(Codec):
        name = "tests.negate"
        required = frozenset({"input"})

        def infer(self, node, ctx):
            return ctx.infer(node["input"], "input")

        def decode(self, node, ctx):
            return -np.asarray(ctx.decode(node["input"], "input"), dtype=np.float32)

    plugins = installed(_EntryPoint("neg", _plugin_registering_codecs("neg_mod", Negate()), "qformat-neg"))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for registry, fails in ((plugins.codecs, False), (CORE_CODECS, True)):
        b = RecordBuilder("w", (2, 3), registry=registry)
        node = b.node("tests.negate", 1, input=b.tensor("x", x), unused=None)
        assert node == {"codec": "tests.negate", "version": 1, "input": {"codec": "tensor", "version": 1,
                                                                          "tensor": "w.x"}}
        if fails:
            with pytest.raises(UnknownCodecError, match="tests.negate"):
                b.finish(node)
        else:
            np.testing.assert_array_equal(b.finish(node).decode(registry), -x)
    with pytest.raises(TypeError, match="integer version"):
        RecordBuilder("w", (2, 3)).node("tests.negate", "1")


def test_a_hook_with_a_wrong_signature_breaks_only_its_plugin(monkeypatch):
    monkeypatch.setenv("QFORMAT_PLUGINS", "rtn")
    wrong = _module("wrong_mod", qformat_register_methods=lambda callback: None)
    with pytest.warns(RuntimeWarning, match=r"\(entry point 'wrong'\) is broken: PluginValidationError: .*callback"):
        plugins = build_plugins(extra=[("wrong", wrong)])
    assert "rtn" in plugins.methods
