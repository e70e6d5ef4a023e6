"""qformat.testing must accept a correct plugin and catch each kind of deliberately broken one."""

from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from qformat.format import write_file
from qformat.plugin import (
    CORE_CODECS,
    Codec,
    Kernel,
    Method,
    NodeInfo,
    Param,
    PreparedWeight,
    QuantizedTensor,
    RecordBuilder,
    hookimpl,
)
from qformat.plugins import build_plugins, use_plugins
from qformat.testing import PluginCheckError, check_codec_vectors, check_kernel, check_method, sample_layers


class GoodRTN(Method):
    """Per-row asymmetric round-to-nearest: the smallest honest method."""

    name = "good-rtn"
    params = (Param("bits", int, 4, "code width", min=2, max=8),)

    def quantize(self, layer, params):
        w = layer.weight.numpy()
        maxq = (1 << params["bits"]) - 1
        low, high = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
        scale = np.where(high > low, (high - low) / maxq, 1.0).astype(np.float32)
        zero = np.round(-low / scale)
        codes = np.clip(np.round(w / scale) + zero, 0, maxq).astype(np.int64)
        b = RecordBuilder(layer.name, w.shape)
        node = b.affine(b.packed("codes", codes, params["bits"]), scale=b.tensor("scale", scale),
                        zero=b.tensor("zero", zero.astype(np.float32)), bits=params["bits"],
                        group_shape=(1, w.shape[1]))
        return b.finish(node, info={"bits_per_weight": None})


class LyingBits(GoodRTN):
    name = "lying-bits"

    def quantize(self, layer, params):
        qt = super().quantize(layer, params)
        qt.record["info"] = {"bits_per_weight": 2.0}
        return qt


class Nondeterministic(GoodRTN):
    name = "nondeterministic"

    def quantize(self, layer, params):
        noisy = layer.weight + 1e-3 * torch.randn_like(layer.weight)
        return super().quantize(type(layer)(layer.name, noisy), params)


class WrongName(GoodRTN):
    name = "wrong-name"

    def quantize(self, layer, params):
        return super().quantize(type(layer)("other.weight", layer.weight), params)


class NoRangeCheck(GoodRTN):
    name = "no-range-check"

    def validate_params(self, values):
        return {"bits": int(values.get("bits", 4))} if "no_such_parameter_x" not in values else super(
        ).validate_params(values)


class Garbage(GoodRTN):
    name = "garbage"

    def quantize(self, layer, params):
        return super().quantize(type(layer)(layer.name, torch.flip(layer.weight, dims=[1])), params)


class HiddenBytes(GoodRTN):
    name = "hidden-bytes"

    def quantize(self, layer, params):
        qt = super().quantize(layer, params)
        return QuantizedTensor(qt.name, qt.record, {**qt.tensors, qt.name + ".secret": np.zeros(4096, np.uint8)})


class NotARecord(GoodRTN):
    name = "not-a-record"

    def quantize(self, layer, params):
        return {"weight": layer.weight}


@pytest.fixture(scope="module")
def layers():
    return sample_layers(1, tokens=128)


def test_good_method_passes(layers):
    report = check_method(GoodRTN(), {"bits": 4}, layers)
    assert 4 < report.bits_per_weight < 4.2
    assert 0 < report.relative_error < 0.2


@pytest.mark.parametrize(("broken", "message"), [
    (LyingBits, "claims 2.0 bits/weight"),
    (Nondeterministic, "different records or bytes"),
    (WrongName, "named 'other.weight'"),
    (NoRangeCheck, "outside"),
    (Garbage, "relative weight error"),
    (HiddenBytes, "bad_tensor_name|storage_bytes"),
    (NotARecord, "not a QuantizedTensor"),
])
def test_broken_methods_are_caught(layers, broken, message):
    with pytest.raises(PluginCheckError, match=message):
        check_method(broken(), {}, layers)


class DensePrepared(PreparedWeight):
    def __init__(self, weight, bias=0.0):
        self.weight = torch.from_numpy(weight)
        self.bias = bias

    def matmul(self, x):
        return x @ self.weight.T + self.bias

    def dequantize(self):
        return self.weight


class DecodeKernel(Kernel):
    name = "decode-then-matmul"
    device = "cpu"

    def __init__(self, bias=0.0):
        self.bias = bias

    def supports(self, record):
        return True

    def prepare(self, qt, device="cpu"):
        return DensePrepared(qt.decode().reshape(qt.record["shape"][0], -1), self.bias)


def test_kernel_check(layers):
    qt = GoodRTN().quantize(_layer_input(layers[0]), {"bits": 4})
    assert check_kernel(DecodeKernel(), [qt]).checked == 2
    with pytest.raises(PluginCheckError, match="error is"):
        check_kernel(DecodeKernel(bias=0.5), [qt])


def _layer_input(sample):
    from qformat.methods import LayerInput

    return LayerInput(sample.name, torch.from_numpy(sample.weight))


# ---------------------------------------------------------------------------------------------------------------
# check_codec_vectors: a plugin codec's own vectors, checked with the codec under test or the installed one

class Negate(Codec):
    """tests.negate v1: w = -input (exact)."""

    name = "tests.negate"
    required = frozenset({"input"})

    def infer(self, node, ctx):
        inner = ctx.infer(node["input"], "input")
        if len(inner.shape) != 2:
            raise ctx.error("shape_mismatch", "input must be 2-D", "input")
        return NodeInfo(inner.shape, "float")

    def decode(self, node, ctx):
        return -np.asarray(ctx.decode(node["input"], "input"), dtype=np.float32)


class ForgetsToNegate(Negate):
    def decode(self, node, ctx):
        return np.asarray(ctx.decode(node["input"], "input"), dtype=np.float32)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def negate_vectors(tmp_path):
    """One valid and one invalid vector of tests.negate, in the layout of conformance/README.md."""
    registry = CORE_CODECS.extended([Negate()], owner="tests")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = RecordBuilder("w", (2, 3), registry=registry)
    valid = b.finish(b.node("tests.negate", 1, input=b.tensor("x", x)))
    write_file(tmp_path / "negate.safetensors", None, [valid])
    (tmp_path / "negate.expected.safetensors").write_bytes(save({"w": -x}))
    bad = QuantizedTensor("w", {**valid.record, "weight": {**valid.record["weight"], "version": 2}}, valid.tensors)
    write_file(tmp_path / "negate_v2.safetensors", None, [bad])
    vectors = [
        {"id": "negate", "kind": "valid", "description": "w = -x", "file": "negate.safetensors",
         "sha256": _sha(tmp_path / "negate.safetensors"), "expected": "negate.expected.safetensors",
         "expected_sha256": _sha(tmp_path / "negate.expected.safetensors"), "records": ["w"], "plain": [],
         "codecs": ["tensor", "tests.negate"], "exact": True, "options": {}},
        {"id": "negate_v2", "kind": "invalid", "description": "version 2 does not exist",
         "file": "negate_v2.safetensors", "sha256": _sha(tmp_path / "negate_v2.safetensors"),
         "error": {"code": "unsupported_codec_version", "stage": "open", "tensor": "w"}},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 1, "vectors": vectors}))
    return tmp_path


def test_codec_vectors_pass_with_the_codec_under_test(negate_vectors):
    report = check_codec_vectors(negate_vectors, [Negate()])
    assert report.passed == ["negate", "negate_v2"] and report.failed == []


def test_codec_vectors_of_an_installed_plugin_do_not_clash(negate_vectors, monkeypatch):
    """The bug: discovery had put the plugin's codec in a global table under its package's name, and the harness
    registered it again under another owner ("registered by both"). Now each check reads with its own registry."""
    monkeypatch.setenv("QFORMAT_PLUGINS", "")
    module = types.ModuleType("negate_plugin")
    module.qformat_register_codecs = hookimpl(lambda register: register(Negate()))
    with use_plugins(build_plugins(extra=[("negate", module)])) as plugins:
        assert "tests.negate" in plugins.codecs
        assert check_codec_vectors(negate_vectors, [Negate()]).failed == []  # the codec under test
        assert check_codec_vectors(negate_vectors).failed == []  # the installed plugin set's codec
        assert "tests.negate" not in CORE_CODECS


def test_codec_vectors_catch_a_wrong_decoder_and_an_unknown_codec(negate_vectors):
    with pytest.raises(PluginCheckError, match=r"negate: w: 5 values differ"):
        check_codec_vectors(negate_vectors, [ForgetsToNegate()])
    with pytest.raises(PluginCheckError, match=r"negate: .*unknown_codec"):
        check_codec_vectors(negate_vectors, registry=CORE_CODECS)


def test_check_method_reads_with_the_given_registry(layers):
    """A method whose records use a plugin codec is checked with a registry that holds it."""
    registry = CORE_CODECS.extended([Negate()], owner="tests")

    class Negated(GoodRTN):
        name = "negated"

        def quantize(self, layer, params):
            qt = GoodRTN.quantize(self, type(layer)(layer.name, -layer.weight), params)
            b = RecordBuilder(qt.name, qt.record["shape"], registry=registry)
            b.tensors.update(qt.tensors)
            return b.finish(b.node("tests.negate", 1, input=qt.record["weight"]), info={"bits_per_weight": None})

    assert check_method(Negated(), {"bits": 4}, layers, registry=registry).relative_error < 0.2
    with pytest.raises(PluginCheckError, match="unknown_codec"):
        check_method(Negated(), {"bits": 4}, layers, registry=CORE_CODECS)
