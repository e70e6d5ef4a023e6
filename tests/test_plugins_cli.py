"""`qformat plugins`: the built-in methods arrive through entry points, like a third-party plugin's, with their
parameters; a broken plugin is reported, not fatal."""

from __future__ import annotations

import json
import types
from importlib import metadata

import pytest

from qformat import plugins
from qformat.cli import main
from qformat.plugin import Method, Param, hookimpl


def test_builtin_methods_are_entry_points_of_the_qformat_distribution() -> None:
    points = {ep.name: ep for ep in metadata.entry_points(group="qformat")}
    for name in ("rtn", "gptq", "spqr"):
        assert points[name].value == f"qformat_plugins.{name}"
        assert points[name].dist.name == "qformat"


def test_plugins_lists_methods_and_parameters(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "method spqr (calibration: hessian)" in out and "method rtn (calibration: none)" in out
    assert "- outlier_threshold (float, default 0.2" in out
    assert "- bits (int, default 4 in [2, 8])" in out


def test_plugins_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    listing = {p["entry_point"]: p for p in json.loads(capsys.readouterr().out)}
    spqr = listing["spqr"]
    assert spqr["package"] == "qformat" and spqr["module"] == "qformat_plugins.spqr" and spqr["error"] is None
    (method,) = spqr["methods"]
    params = {p["name"]: p for p in method["params"]}
    assert method["calibration"] == ["hessian"]
    assert params["bits"]["type"] == "int" and params["bits"]["default"] == 3 and params["bits"]["max"] == 8
    assert params["outlier_threshold"]["min"] == 0.0


class Broken:
    @staticmethod
    @hookimpl
    def qformat_register_methods(register):
        raise RuntimeError("boom")


class Demo(Method):
    name = "demo"
    description = "a demonstration method"
    params = (Param("levels", int, 3, "number of levels", min=2, max=5),)


def test_broken_plugin_is_reported_and_others_still_work(capsys: pytest.CaptureFixture) -> None:
    demo = types.ModuleType("demo_plugin")
    demo.qformat_register_methods = hookimpl(lambda register: register(Demo()))
    with pytest.warns(RuntimeWarning, match=r"\(entry point 'broken'\) is broken: RuntimeError: boom"):
        built = plugins.build_plugins(extra=[("broken", Broken), ("demo", demo)])
    with plugins.use_plugins(built):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken  ((in-process) -" in out and "failed to load: RuntimeError: boom" in out
    assert "method demo (calibration: none)" in out and "- levels (int, default 3 in [2, 5])" in out
    assert "method gptq" in out


def test_a_class_registered_instead_of_an_instance_is_listed_as_broken(capsys: pytest.CaptureFixture) -> None:
    module = types.ModuleType("class_plugin")
    module.qformat_register_methods = hookimpl(lambda register: register(Demo))
    with pytest.warns(RuntimeWarning, match="register an instance"):
        built = plugins.build_plugins(extra=[("classy", module)])
    with plugins.use_plugins(built):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "failed to load: registered the class Demo: register an instance: register(Demo())" in out
    assert "method demo" not in out and "method rtn" in out
