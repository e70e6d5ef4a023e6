"""Block transforms: the plugin contract, block layouts and folds per architecture, the harness, and the pipeline with a
test-only transform (random positive scales folded into every norm and previous linear, plus one unfoldable
ColumnScale on down_proj), independent of AWQ."""

from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decoded_logits, folder_bytes
from tiny_model import make_tiny_llama

import qformat
from qformat.block_layout import ARCHITECTURES, block_layout, fold_into_norm
from qformat.cli import main
from qformat.conversion.pipeline import Converter, ConvertOptions, convert
from qformat.conversion.transform_chain import parse_spec
from qformat.errors import ConversionError, ParameterError, PluginError
from qformat.format import open_folder
from qformat.hub import resolve_model_source
from qformat.plugin import (
    BlockResult,
    ColumnScale,
    Method,
    SkipBlock,
    Transform,
    TransformConfig,
    hookimpl,
    param,
    scale_columns,
)
from qformat.plugins import NameClash, build_plugins, get_method, get_transform, use_plugins
from qformat.testing import TINY_ARCHITECTURES, PluginCheckError, check_transform, tiny_block
from qformat.text import DEFAULT_CALIBRATION
from qformat.transforms import apply_chain, wrap_record

ROOT = Path(__file__).resolve().parents[1]
CALIB = {"calib_samples": 4, "calib_seqlen": 32}


# ------------------------------------------------------------------------------------------------ test transforms


@dataclass(frozen=True)
class ScaleConfig(TransformConfig):
    transform = "testscale"
    spread: float = param(0.5, "log-normal spread of the random scales", min=0.0, max=2.0)
    bits: int = param(4, "taken from the method when not given (never used)", min=3, max=8)


class RandomScales(Transform):
    """Random positive scales folded into every pair of the layout, and an unfoldable ColumnScale on down_proj."""

    config = ScaleConfig
    description = "test-only: random function-preserving scales"

    def apply(self, block, config):
        for pair in block.layout:
            width = block.block.get_submodule(pair.linears[0]).weight.shape[1]
            s = torch.exp(config.spread * torch.randn(width))
            pair.fold(block.block, s)
            for name in pair.linears:
                scale_columns(block.block.get_submodule(name), s)
        result = BlockResult(info={"pairs": len(block.layout)})
        if "mlp.down_proj" in block.linears:
            width = block.block.get_submodule("mlp.down_proj").weight.shape[1]
            result.input_transforms["mlp.down_proj"] = ColumnScale(torch.exp(config.spread * torch.randn(width)))
        return result


@dataclass(frozen=True)
class MistralOnlyConfig(TransformConfig):
    transform = "mistralonly"


class MistralOnly(RandomScales):
    config = MistralOnlyConfig
    architectures = frozenset({"mistral"})

    def apply(self, block, config):
        return super().apply(block, ScaleConfig())


def _plugin_module(*transforms: Transform, methods=()) -> types.ModuleType:
    module = types.ModuleType("test_transform_plugin")
    module.qformat_register_transforms = hookimpl(lambda register: [register(t) for t in transforms])
    if methods:
        module.qformat_register_methods = hookimpl(lambda register: [register(m) for m in methods])
    return module


def _scaled_rtn(name: str = "scaledrtn", transform: str = "testscale") -> Method:
    rtn = get_method("rtn")

    @dataclass(frozen=True)
    class ScaledRTNConfig(type(rtn.validate_params({}))):
        method = name

    class ScaledRTN(Method):
        config = ScaledRTNConfig
        transforms = (transform,)

        def quantize(self, layer, config):
            return rtn.quantize(layer, rtn.validate_params(config.to_params()))

    return ScaledRTN()


@pytest.fixture(scope="module")
def plugin_set():
    plugins = build_plugins(extra=[("testscale", _plugin_module(RandomScales(), MistralOnly(),
                                                                 methods=[_scaled_rtn(),
                                                                          _scaled_rtn("mistralrtn", "mistralonly")]))])
    with use_plugins(plugins):
        yield plugins


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=3, heads=4, kv_heads=4)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def options(source: Path, out: Path, method: str = "rtn", **kw) -> ConvertOptions:
    return ConvertOptions(str(source), out, method, quiet=True, resolve_hub=resolve_model_source,
                          calib=source.parent / "calib.txt", **{**CALIB, **kw})


# ------------------------------------------------------------------------------------------------ contract


def test_config_is_typed_versioned_and_names_the_transform() -> None:
    config = ScaleConfig(spread="0.25")
    assert config.spread == 0.25 and config.to_dict() == {"transform": "testscale", "version": 1,
                                                           "params": {"spread": 0.25, "bits": 4}}
    assert ScaleConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ParameterError, match=r"transform 'testscale' parameter 'spread': 3.0 is above the maximum"):
        ScaleConfig(spread=3.0)
    with pytest.raises(ParameterError, match=r"transform 'testscale' has no parameter 'alpha'; it takes: spread, bits"):
        RandomScales().validate_params({"alpha": 1})
    with pytest.raises(ParameterError, match="these are parameters of transform 'awq', not 'testscale'"):
        ScaleConfig.from_dict({"transform": "awq", "params": {}})
    with pytest.raises(TypeError, match="is transform 'other' but its ScaleConfig configures 'testscale'"):
        type("Other", (Transform,), {"name": "other", "config": ScaleConfig})


def test_registration_lists_clashes_and_unknown_names(plugin_set, capsys: pytest.CaptureFixture) -> None:
    assert get_transform("testscale").name == "testscale" and plugin_set.info["testscale"].transforms == [
        "testscale", "mistralonly"]
    with pytest.raises(PluginError, match=r"unknown transform 'nope'; installed transforms: .*testscale"):
        get_transform("nope")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "transform testscale (architectures: gemma, gemma2, llama, mistral, phi3, qwen2, qwen3)" in out
    assert "- spread (float, default 0.5 in [0.0, 2.0])" in out
    with pytest.raises(NameClash, match="transform 'testscale' is claimed by two plugins"):
        build_plugins(extra=[("a", _plugin_module(RandomScales())), ("b", _plugin_module(RandomScales()))])
    with pytest.warns(RuntimeWarning, match=r"registered the class RandomScales: register an instance"):
        broken = types.ModuleType("broken")
        broken.qformat_register_transforms = hookimpl(lambda register: register(RandomScales))
        build_plugins(extra=[("broken", broken)])


def test_spec_strings_parse() -> None:
    assert parse_spec("awq:bits=3, group-size=64") == ("awq", {"bits": "3", "group_size": "64"})
    assert parse_spec("hadamard") == ("hadamard", {})
    for bad in ("", ":bits=3", "awq:bits", "awq:bits=3,bits=4"):
        with pytest.raises(ParameterError):
            parse_spec(bad)


# ------------------------------------------------------------------------------------------------ layouts and folds


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_layout_and_folds_preserve_each_architecture(arch: str) -> None:
    tiny = tiny_block(arch)
    pairs = block_layout(arch, tiny.block)
    mha = tiny.config.num_key_value_heads == tiny.config.num_attention_heads
    assert [p.kind for p in pairs] == ["norm"] + (["linear"] if mha else []) + ["norm", "linear"]
    assert pairs[0].linears == (("self_attn.qkv_proj",) if arch == "phi3" else
                                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    assert pairs[-2].prev == ("pre_feedforward_layernorm" if arch == "gemma2" else
                                          "post_attention_layernorm")
    assert all(p.norm_offset == (1.0 if arch.startswith("gemma") else 0.0) for p in pairs if p.kind == "norm")
    reference = tiny.forward()
    generator = torch.Generator().manual_seed(1)
    for pair in pairs:
        width = tiny.block.get_submodule(pair.linears[0]).weight.shape[1]
        s = torch.exp(torch.randn(width, generator=generator))
        pair.fold(tiny.block, s)
        for name in pair.linears:
            scale_columns(tiny.block.get_submodule(name), s)
    after = tiny.forward()
    scale = max(float(y.abs().max()) for y in reference)
    assert max(float((a - b).abs().max()) for a, b in zip(reference, after, strict=True)) <= 1e-4 * scale + 1e-5


def test_phi3_folds_use_the_v_and_up_rows_of_the_fused_linears() -> None:
    pairs = {p.prev: p for p in block_layout("phi3", tiny_block("phi3").block)}
    assert pairs["self_attn.qkv_proj"].rows == (128, 192) and pairs["mlp.gate_up_proj"].rows == (128, 256)


def test_gemma_norm_fold_divides_one_plus_w() -> None:
    norm = tiny_block("gemma").block.input_layernorm
    x = torch.randn(3, 64)
    s = torch.rand(64) + 0.5
    before = norm(x)
    fold_into_norm(norm, s, offset=1.0)
    torch.testing.assert_close(norm(x), before / s, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_is_skipped_with_a_warning_and_left_alone() -> None:
    tiny = tiny_block("llama")
    state = {k: v.clone() for k, v in tiny.block.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"transform 'testscale' skips block 5 \(model.layers.5\): architecture "
                                            r"'falcon' is not one it understands"):
        done = apply_chain([(RandomScales(), ScaleConfig())], tiny.block_input(architecture="falcon",
                                                                               prefix="model.layers.5."))
    assert done.skipped and not done.input_transforms
    assert all(torch.equal(v, tiny.block.state_dict()[k]) for k, v in state.items())


def test_a_block_missing_a_module_is_skipped_and_restored() -> None:
    """A predicate accepting any architecture, then the layout finds a module missing: SkipBlock, nothing changed,
    even though the transform had already folded the first pair when it asked."""

    class Eager(RandomScales):
        architectures = staticmethod(lambda arch: True)

        def apply(self, block, config):
            fold_into_norm(block.block.input_layernorm, torch.full((64,), 2.0))  # changes something, then gives up
            raise SkipBlock("the layout has no up_proj")

    tiny = tiny_block("llama")
    state = {k: v.clone() for k, v in tiny.block.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"skips block 0 \(model.layers.0\): the layout has no up_proj"):
        apply_chain([(Eager(), ScaleConfig())], tiny.block_input())
    assert all(torch.equal(v, tiny.block.state_dict()[k]) for k, v in state.items())
    del tiny.block.mlp.up_proj
    with pytest.raises(SkipBlock, match=r"llama block model.layers.0.mlp.up_proj is missing"):
        block_layout("llama", tiny.block, "model.layers.0.")
    with pytest.raises(SkipBlock, match="no block layout for architecture 'falcon'"):
        block_layout("falcon", tiny.block)
    assert set(ARCHITECTURES) == set(TINY_ARCHITECTURES)


def test_column_scale_wraps_the_record_exactly() -> None:
    from qformat.format import RecordBuilder

    weight = torch.randn(8, 16)
    s = torch.rand(16) + 0.5
    t = ColumnScale(s)
    builder = RecordBuilder("m.weight", (8, 16))
    inner = builder.finish(builder.tensor("w", t.weight(weight).numpy()))
    wrapped = wrap_record(inner, [t])
    node = wrapped.record["weight"]
    assert node["codec"] == "scale" and node["group_shape"] == [8, 1]
    assert wrapped.tensors["m.weight.input_transform0.factor"].shape == (1, 16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(torch.from_numpy(wrapped.decode()), weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t.inputs(x) @ t.weight(weight).T, x @ weight.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(PluginError, match="finite positive"):
        ColumnScale(torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------------------------------------ harness


def test_harness_accepts_a_function_preserving_transform() -> None:
    report = check_transform(RandomScales(), {"spread": 0.5})
    assert set(report.max_error) == set(TINY_ARCHITECTURES)
    assert max(report.max_error.values()) < 1e-5 and max(report.file_error.values()) < 1e-5
    assert all(count == 1 for count in report.input_transforms.values())
    assert all(changed >= 5 for changed in report.changed_modules.values())  # norms, rows and columns folded
    assert report.skipped and "model.layers.7" in report.skipped[0]


class IgnoresGemmaOffset(RandomScales):
    def apply(self, block, config):
        for pair in block.layout:
            width = block.block.get_submodule(pair.linears[0]).weight.shape[1]
            s = torch.exp(config.spread * torch.randn(width))
            if pair.kind == "norm":
                fold_into_norm(block.block.get_submodule(pair.prev), s)  # w / s, but Gemma computes (1 + w)
            else:
                pair.fold(block.block, s)
            for name in pair.linears:
                scale_columns(block.block.get_submodule(name), s)


class Nondeterministic(RandomScales):
    def apply(self, block, config):
        torch.manual_seed(int.from_bytes(np.random.default_rng().bytes(4), "little"))
        return super().apply(block, config)


class AcceptsAnythingAndMisScales(RandomScales):
    architectures = staticmethod(lambda arch: True)

    def apply(self, block, config):
        if block.architecture not in ARCHITECTURES:
            block.block.input_layernorm.weight.mul_(2.0)  # as if it guessed a layout
            return BlockResult()
        return super().apply(block, config)


class ForgetsTheInputs(ColumnScale):
    def inputs(self, x):
        return x


class ForgetfulScales(RandomScales):
    def apply(self, block, config):
        result = super().apply(block, config)
        result.input_transforms = {n: ForgetsTheInputs(1.0 / t.factor) for n, t in result.input_transforms.items()}
        return result


@pytest.mark.parametrize(("transform", "architectures", "message"), [
    (IgnoresGemmaOffset(), ["llama", "gemma"], "on a tiny gemma block: outputs changed"),
    (Nondeterministic(), ["llama"], "two runs on identical blocks changed the modules differently"),
    (AcceptsAnythingAndMisScales(), ["llama"], "not skipped, and outputs changed .* \\(mis-scaled\\)"),
    (ForgetfulScales(), ["qwen2"], "not function-preserving"),
])
def test_harness_catches_broken_transforms(transform, architectures, message) -> None:
    with pytest.raises(PluginCheckError, match=message):
        check_transform(transform, architectures=architectures)


def test_the_worked_example_in_the_docs_is_function_preserving(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    (code,) = [c for c in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if "class Smooth(" in c]
    module = types.ModuleType("docs_smooth")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    report = check_transform(module.Smooth(), {"alpha": 0.5}, architectures=["llama", "phi3", "gemma2"])
    assert all(count == 1 for count in report.input_transforms.values())


# ------------------------------------------------------------------------------------------------ pipeline


def test_cli_composition_records_and_stays_close(plugin_set, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tiny), "--out", str(out), "--method", "rtn", "--bits", "8", "--group-size", "32",
                 "--transform", "testscale:spread=0.3", "--calib", str(tiny.parent / "calib.txt"),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--quiet"]) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    # bits comes from the method (--bits 8): the transform searches for what the method will do
    assert qconfig["transforms"] == [{"transform": "testscale", "version": 1, "params": {"spread": 0.3, "bits": 8}}]
    assert "--transform testscale:spread=0.3,bits=8" in qconfig["command"]
    card = (out / "README.md").read_text()
    assert "- testscale" in card and "Block transforms, applied to each decoder block" in card
    assert '| `testscale` | 1 | `{"bits": 8, "spread": 0.3}` |' in card
    qfolder = open_folder(out)
    assert qfolder.records["model.layers.0.mlp.down_proj.weight"]["weight"]["codec"] == "scale"
    assert qfolder.records["model.layers.0.mlp.up_proj.weight"]["weight"]["codec"] == "affine"
    folded = np.array(qfolder.decode("model.layers.0.input_layernorm.weight"))
    qfolder.close()
    from safetensors.numpy import load_file

    source_norm = load_file(str(tiny / "model.safetensors"))["model.layers.0.input_layernorm.weight"]
    assert not np.allclose(folded, source_norm)  # the folded norm is what was written
    a, b = decoded_logits(tiny, None), decoded_logits(tiny, out)
    assert float((a - b).norm() / a.norm()) < 0.02  # 8-bit: the transforms changed nothing but the rounding
    model = qformat.load(out)
    with torch.no_grad():
        loaded = model(torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))).logits
    torch.testing.assert_close(loaded, b, rtol=1e-3, atol=1e-3)


def test_python_composition_and_method_declared_transforms(plugin_set, tiny: Path, tmp_path: Path) -> None:
    config = get_method("rtn").validate_params({"bits": 3})
    result = qformat.convert(tiny, tmp_path / "a", config, transforms=[{"transform": "testscale", "params": {}}],
                             quiet=True, calib=tiny.parent / "calib.txt", **CALIB)
    assert result.quantization_config["transforms"][0]["params"] == {"spread": 0.5, "bits": 3}
    result = qformat.convert(tiny, tmp_path / "b", "rtn", transforms=ScaleConfig(spread=1.0), quiet=True,
                             calib=tiny.parent / "calib.txt", **CALIB)
    assert result.quantization_config["transforms"][0]["params"] == {"spread": 1.0, "bits": 4}
    # a method declaring transforms = ("testscale",) gets it first; given explicitly, it is not run twice
    result = qformat.convert(tiny, tmp_path / "c", "scaledrtn", quiet=True, calib=tiny.parent / "calib.txt", **CALIB)
    assert [t["transform"] for t in result.quantization_config["transforms"]] == ["testscale"]
    result = qformat.convert(tiny, tmp_path / "d", "scaledrtn", transforms=["testscale:spread=0.1"], quiet=True,
                             calib=tiny.parent / "calib.txt", **CALIB)
    assert result.quantization_config["transforms"][0]["params"]["spread"] == 0.1


def test_a_method_declared_transform_the_model_lacks_is_left_out_with_a_warning(plugin_set, tiny: Path,
                                                                              tmp_path: Path) -> None:
    """awq's method runs the awq transform by itself: on a decoder the transform does not know, the method still
    quantizes (warned, and the chain recorded empty); naming the transform explicitly there is refused."""
    with pytest.warns(RuntimeWarning, match="transform 'mistralonly' does not understand architecture 'llama'.*"
                                            "method 'mistralrtn' runs without it"):
        result = qformat.convert(tiny, tmp_path / "a", "mistralrtn", quiet=True, calib=tiny.parent / "calib.txt",
                                 **CALIB)
    assert "transforms" not in result.quantization_config
    with pytest.raises(ConversionError, match="transform 'mistralonly' does not understand"):
        qformat.convert(tiny, tmp_path / "b", "mistralrtn", transforms=["mistralonly"], quiet=True,
                        calib=tiny.parent / "calib.txt", **CALIB)


def test_resume_with_a_transform_is_byte_identical(plugin_set, tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kw = {"params": {"bits": 4, "group_size": 32}, "transforms": ["testscale"], "true_sequential": True}
    whole = tmp_path / "a" / "out"
    convert(options(tiny, whole, "gptq", **kw))
    resumed = tmp_path / "b" / "out"

    def kill(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(options(tiny, resumed, "gptq", **kw), on_block_done=kill)
    with pytest.raises(ConversionError, match=r"different options \(transforms\)"):
        convert(options(tiny, resumed, "gptq", **{**kw, "transforms": ["testscale:spread=0.4"]}))
    converter = Converter(options(tiny, resumed, "gptq", **kw))
    converter.prepare()
    assert converter.resuming
    assert converter.run().summary.resumed_blocks == 2
    assert folder_bytes(resumed) == folder_bytes(whole)


@pytest.mark.parametrize(("transforms", "error", "message"), [
    (["nope"], PluginError, "unknown transform 'nope'; installed transforms"),
    (["testscale:spread=9"], ParameterError, "transform 'testscale' parameter 'spread': 9.0 is above the maximum"),
    (["testscale:bits=1"], ParameterError, "parameter 'bits': 1 is below the minimum 3"),
    (["testscale", "testscale"], ParameterError, "transform 'testscale' is given twice"),
    (["mistralonly"], ConversionError, "transform 'mistralonly' does not understand architecture 'llama'"),
    (["hadamard:block=128"], ParameterError, "block 128 does not divide the 64 input features"),
])
def test_bad_transforms_fail_before_any_work(plugin_set, tiny: Path, earlier_out: Path, transforms, error,
                                             message) -> None:
    before = folder_bytes(earlier_out)
    with pytest.raises(error, match=message):
        convert(options(tiny, earlier_out, "rtn", transforms=transforms, overwrite=True))
    assert folder_bytes(earlier_out) == before and not earlier_out.with_name("out.partial").exists()


@pytest.fixture(scope="module")
def earlier_out(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An existing qformat output (--overwrite would replace it after a successful conversion)."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    convert(options(tiny, out, "rtn"))
    return out


def test_inherited_parameter_out_of_range_names_its_origin(plugin_set) -> None:
    from qformat.conversion.transform_chain import resolve_chain

    rtn = get_method("rtn")
    with pytest.raises(ParameterError, match=r"'bits': 2 is below the minimum 3 \(taken from method 'rtn''s bits; "
                                             r"give it explicitly: --transform testscale:key=value\)"):
        resolve_chain(["testscale"], rtn, rtn.validate_params({"bits": 2}))
    chain = resolve_chain(["testscale:bits=4"], rtn, rtn.validate_params({"bits": 2}))
    assert chain[0][1].bits == 4
