"""Typed, versioned method configs: range checks on construction, parsing from the command line's strings, JSON and
versioned round trips, the Python entry point qformat.convert(source, out, config), and resume with another config."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
from tiny_model import make_tiny_llama

import qformat
from qformat import plugins
from qformat.cli import main
from qformat.conversion.pipeline import ConvertOptions
from qformat.conversion.pipeline import convert as pipeline_convert
from qformat.errors import ConversionError, ParameterError
from qformat.hookspecs import hookimpl
from qformat.methods import Method, MethodConfig, Param, param
from qformat.plugins import get_method


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2)


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# -- construction and parsing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "name"), [
    (lambda: qformat.GPTQConfig(bits=9), "bits"),
    (lambda: qformat.RTNConfig(group_size=-2), "group_size"),
    (lambda: qformat.RTNConfig(sym="maybe"), "sym"),
    (lambda: qformat.SpQRConfig(outlier_threshold=math.nan), "outlier_threshold"),
    (lambda: qformat.SpQRConfig(qq_scale_bits=0), "qq_scale_bits"),
    (lambda: qformat.GPTQConfig(damp=11.0), "damp"),
    (lambda: qformat.GPTQConfig(block_size=2.5), "block_size"),
    (lambda: qformat.GPTQConfig(static_groups=True, group_size=-1), "static_groups"),  # a cross-field check
])
def test_direct_construction_is_range_checked(make, name: str) -> None:
    with pytest.raises(ParameterError, match=f"parameter '{name}'"):
        make()


def test_configs_are_frozen_typed_values() -> None:
    config = qformat.GPTQConfig(bits=3, damp=1)
    assert config.damp == 1.0 and type(config.damp) is float  # normalised: the record's JSON says 1.0, as before
    assert config == qformat.GPTQConfig(bits=3, damp=1.0) and hash(config) == hash(qformat.GPTQConfig(bits=3, damp=1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 4
    assert dataclasses.replace(config, bits=4).bits == 4
    with pytest.raises(ParameterError, match="'bits'"):
        dataclasses.replace(config, bits=1)
    assert qformat.RTNConfig.method == "rtn" and qformat.SpQRConfig().method == "spqr"
    assert [p.name for p in qformat.GPTQConfig.params()] == ["bits", "group_size", "sym", "planes", "damp",
                                                             "block_size", "act_order", "static_groups"]
    assert get_method("gptq").params == qformat.GPTQConfig.params()  # what the CLI and `qformat plugins` read


def test_from_params_parses_command_line_strings_and_names_bad_ones() -> None:
    config = qformat.SpQRConfig.from_params({"bits": "4", "act_order": "false", "outlier_threshold": "inf"})
    assert (config.bits, config.act_order, config.outlier_threshold) == (4, False, math.inf)
    with pytest.raises(ParameterError, match=r"parameter 'bits': 'three' is not a valid int"):
        qformat.SpQRConfig.from_params({"bits": "three"})
    with pytest.raises(ParameterError, match=r"method 'rtn' has no parameter 'groupsize'; it takes: bits, "
                                             r"group_size, sym"):
        qformat.RTNConfig.from_params({"groupsize": "64"})
    assert qformat.method_config("gptq", bits="3", act_order="yes") == qformat.GPTQConfig(bits=3, act_order=True)
    with pytest.raises(ParameterError, match="'percdamp'"):
        qformat.method_config("gptq", percdamp=0.1)


def test_to_params_is_strict_json_that_parses_back() -> None:
    for config in (qformat.RTNConfig(), qformat.GPTQConfig(act_order=True, damp=0.1),
                   qformat.SpQRConfig(outlier_threshold=math.inf)):
        params = config.to_params()
        assert list(params) == [p.name for p in config.params()]
        text = json.dumps(params, allow_nan=False)  # no Infinity token
        assert type(config).from_params(json.loads(text)) == config
    assert qformat.SpQRConfig(outlier_threshold=math.inf).to_params()["outlier_threshold"] == "inf"


# -- versions ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepsConfig(MethodConfig):
    """Version 2 renamed 'levels' (version 1) to 'steps', which counts one less."""

    method = "steps-demo"
    version = 2
    steps: int = param(2, "steps between levels", min=1, max=4)

    @classmethod
    def migrate(cls, params: dict, from_version: int) -> dict:
        if from_version == 1 and "levels" in params:
            params["steps"] = int(params.pop("levels")) - 1
        return params


def test_to_dict_from_dict_round_trip_and_migration() -> None:
    for config in (qformat.RTNConfig(bits=3), qformat.GPTQConfig(sym=True), qformat.SpQRConfig(outlier_threshold=0.5),
                   StepsConfig(steps=3)):
        data = config.to_dict()
        assert data == {"method": config.method, "version": config.version, "params": config.to_params()}
        assert type(config).from_dict(json.loads(json.dumps(data))) == config
    assert StepsConfig.from_dict({"method": "steps-demo", "version": 1, "params": {"levels": 4}}) == StepsConfig(3)
    assert qformat.RTNConfig.from_dict({"params": {"bits": 3}}) == qformat.RTNConfig(bits=3)  # unversioned: 1
    with pytest.raises(ParameterError, match=r"config version 3, newer than this plugin's StepsConfig \(version 2\)"):
        StepsConfig.from_dict({"method": "steps-demo", "version": 3, "params": {}})
    with pytest.raises(ParameterError, match="parameters of method 'gptq', not 'rtn'"):
        qformat.RTNConfig.from_dict(qformat.GPTQConfig().to_dict())
    with pytest.raises(ParameterError, match="not a positive integer"):
        qformat.RTNConfig.from_dict({"version": "1", "params": {}})
    with pytest.raises(ParameterError, match="has no parameter 'levels'"):  # migrate did not run: same version
        StepsConfig.from_dict({"version": 2, "params": {"levels": 4}})


# -- writing a method ------------------------------------------------------------------------------------------------

def test_a_method_declares_its_config() -> None:
    class Steps(Method):
        config = StepsConfig

    method = Steps()
    assert Steps.name == "steps-demo" and [p.name for p in method.params] == ["steps"]
    assert method.validate_params({"steps": "4"}) == StepsConfig(4)
    assert method.validate_params(StepsConfig(1)) == StepsConfig(1)
    with pytest.raises(ParameterError, match="takes a StepsConfig, not a RTNConfig"):
        method.validate_params(qformat.RTNConfig())


def test_malformed_configs_fail_when_the_method_is_defined() -> None:
    @dataclasses.dataclass(frozen=True)
    class Plain(MethodConfig):
        levels: int = 3  # not declared with param(): no help, no range

    class Undecorated(StepsConfig):
        extra: int = param(1, "silently not a field without @dataclass")

    @dataclasses.dataclass(frozen=True)
    class ListField(MethodConfig):
        sizes: list = param(None, "lists are not parameters")

    for config, message in ((Plain, "declare every field with"), (Undecorated, "is not a dataclass field"),
                            (ListField, "an int, float, bool or str")):
        with pytest.raises(TypeError, match=message):
            type("M", (Method,), {"config": config, "name": "m"})
    with pytest.raises(TypeError, match="is method 'other' but its StepsConfig configures 'steps-demo'"):
        type("M", (Method,), {"config": StepsConfig, "name": "other"})


def test_methods_declaring_a_params_tuple_still_work() -> None:
    class Levels(Method):
        name = "levels-demo"
        params = (Param("levels", int, 3, "number of levels", min=2, max=5),)

        def check_params(self, params: dict) -> None:
            if params["levels"] == 4:
                raise ParameterError("method 'levels-demo' parameter 'levels': 4 is unlucky")

    config = Levels().validate_params({"levels": "5"})
    assert isinstance(config, Levels.config) and config["levels"] == config.levels == 5  # item access, as the dict
    assert Levels.config.method == "levels-demo" and Levels.params == Levels.config.params()
    with pytest.raises(ParameterError, match="'levels': 6 is above the maximum 5"):
        Levels().validate_params({"levels": 6})
    with pytest.raises(ParameterError, match="unlucky"):
        Levels().validate_params({"levels": 4})


def test_config_classes_of_installed_methods_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qformat.GPTQConfig is get_method("gptq").config and qformat.SpQRConfig is get_method("spqr").config
    with pytest.raises(AttributeError, match=r"'GTPQConfig' \(the installed methods' configs: .*GPTQConfig"):
        _ = qformat.GTPQConfig
    with pytest.raises(AttributeError):
        _ = qformat.no_such_thing

    class Steps(Method):
        config = StepsConfig

    demo = types.ModuleType("steps_demo")
    demo.qformat_register_methods = hookimpl(lambda register: register(Steps()))
    built = plugins.build_plugins(extra=[("steps-demo", demo)])
    with plugins.use_plugins(built):
        assert qformat.StepsConfig is StepsConfig  # a third-party config is reached the same way


def test_plugins_listing_names_the_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "--json"]) == 0
    listing = {p["entry_point"]: p for p in json.loads(capsys.readouterr().out)}
    (gptq,) = listing["gptq"]["methods"]
    assert gptq["config"] == "GPTQConfig" and gptq["config_version"] == 1
    assert [p["name"] for p in gptq["params"]] == [p.name for p in qformat.GPTQConfig.params()]


# -- converting with a config ------------------------------------------------------------------------------------------

def test_convert_with_a_config_is_the_cli_run(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    by_cli = tmp_path / "cli"
    assert main(["convert", "--method", "rtn", str(tiny), "--out", str(by_cli), "--quiet", "--bits", "3",
                 "--group-size", "32"]) == 0
    capsys.readouterr()
    by_api = tmp_path / "api"
    result = qformat.convert(tiny, by_api, qformat.RTNConfig(bits=3, group_size=32))
    assert result.out == by_api and shards(by_api) and shards(by_api) == shards(by_cli)
    qc = json.loads((by_api / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "rtn" and qc["method_config_version"] == 1
    assert qc["method_params"] == {"bits": 3, "group_size": 32, "sym": False, "planes": False}
    cli_command = json.loads((by_cli / "config.json").read_text())["quantization_config"]["command"]
    assert qc["command"] == cli_command.replace("--out cli", "--out api") and "-p bits=3 -p group_size=32" in cli_command
    by_name = tmp_path / "name"
    qformat.convert(tiny, by_name, "rtn", params={"bits": "3", "group_size": 32})
    assert shards(by_name) == shards(by_cli)
    with pytest.raises(TypeError, match="not both"):
        qformat.convert(tiny, tmp_path / "x", qformat.RTNConfig(), params={"bits": 3})
    with pytest.raises(ParameterError, match="method 'gptq' takes a GPTQConfig, not a RTNConfig"):
        pipeline_convert(ConvertOptions(str(tiny), tmp_path / "x", "gptq", qformat.RTNConfig()))
    assert not (tmp_path / "x").exists()


class Killed(Exception):
    pass


def kill_after_first_block(index: int) -> None:
    if index == 0:
        raise Killed


def test_resume_refuses_a_changed_config(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(Killed):
        pipeline_convert(ConvertOptions(str(tiny), out, "rtn", qformat.RTNConfig(bits=3), quiet=True),
                         on_block_done=kill_after_first_block)
    state_path = out.with_name("out.partial") / "state.json"
    state = json.loads(state_path.read_text())
    assert state["method_params"] == {"bits": 3, "group_size": 128, "sym": False, "planes": False}
    assert state["method_config_version"] == 1
    with pytest.raises(ConversionError, match=r"different options \(method_params\)"):
        qformat.convert(tiny, out, qformat.RTNConfig(bits=4))
    monkeypatch.setattr(qformat.RTNConfig, "version", 2)
    # the default output layer is rtn too, so its recorded config version changed as well
    with pytest.raises(ConversionError, match=r"different options \(method_config_version, output_layer\)"):
        qformat.convert(tiny, out, qformat.RTNConfig(bits=3))
    monkeypatch.undo()
    # A partial conversion from before configs had versions (no method_config_version) is version 1: it resumes.
    del state["method_config_version"]
    state_path.write_text(json.dumps(state))
    result = qformat.convert(tiny, out, qformat.RTNConfig(bits=3))
    assert result.summary.resumed_blocks == 1
