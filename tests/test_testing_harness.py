"""qformat.testing must accept a correct plugin and catch each kind of deliberately broken one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qformat.format import QuantizedTensor, RecordBuilder
from qformat.kernel_api import Kernel, PreparedWeight
from qformat.methods import Method, Param
from qformat.testing import PluginCheckError, check_kernel, check_method, sample_layers


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
