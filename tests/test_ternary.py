"""ternary (BitNet b1.58 absmean) and qmoe (QMoE's per-row {min, 0, max} with GPTQ error feedback) on MiniLM layers.

References: BitNet against transformers' own ``integrations/bitnet.py`` ``WeightQuant.forward`` (its eager function,
``_torchdynamo_orig_callable``: the decorated one compiles with a C++ toolchain), bit for bit per tensor; per row is the
same formula row by row. QMoE (IST-DASLab/qmoe) is not a package and its scripts need CUDA, so its quantizer's formula
(``quant.py``: ``(x > max / 2) * max + (x < min / 2) * min``, levels from ``find_params``) is written out here from the
published code and checked against the method without error feedback (an identity Hessian with a huge damping), and
the error feedback is checked to lower the Hessian-weighted output error, as GPTQ's does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import hessian_weighted_error, layer_input
from qformat_plugins.qmoe import QMoE
from qformat_plugins.ternary import Ternary

from qformat.errors import ParameterError
from qformat.methods import LayerInput
from qformat.testing import check_method, sample_layers

LAYERS = sample_layers(2)  # MiniLM: query 384x384, intermediate 1536x384


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, except the sign of zero: the reference's round() keeps -0.0 for small negative weights, and a
    trit is +0 (the format's ternary has no -0; IEEE -0.0 == 0.0 in every product and sum that follows)."""
    a, b = np.ascontiguousarray(a, dtype=np.float32) + 0.0, np.ascontiguousarray(b, dtype=np.float32) + 0.0
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def transformers_weight_quant():
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    forward = bitnet.WeightQuant.forward
    return getattr(forward, "_torchdynamo_orig_callable", forward)


def test_check_method_harness() -> None:
    report = check_method(Ternary(), {}, layers=LAYERS, max_relative_error=0.6)
    assert report.bits_per_weight == pytest.approx(8 / 5 + 32 / (384 * 384), rel=0, abs=0.01)
    check_method(Ternary(), {"per_row": True}, layers=LAYERS[:1], max_relative_error=0.6)
    # QMoE's per-row levels lose most of a small dense layer's weight (measured relative error 1.07 and 1.21: the
    # error feedback trades weight error for output error, as GPTQ 2-bit per row does, 1.04 and 1.32)
    report = check_method(QMoE(), {}, layers=LAYERS, max_relative_error=1.3)
    assert report.bits_per_weight == pytest.approx(2 + 64 / 384)


@pytest.mark.parametrize("index", [0, 1])
def test_bitnet_is_transformers_weight_quant_bit_for_bit(index: int) -> None:
    sample = LAYERS[index]
    w = torch.as_tensor(sample.weight).float()
    expected = transformers_weight_quant()(None, w.clone())
    result = Ternary().run(layer_input(sample, hessian=False), {})
    assert bits_equal(result.qt.decode(), expected.numpy())
    assert bits_equal(result.dequantized.numpy(), expected.numpy())
    node = result.qt.record["weight"]
    assert node["codec"] == "scale" and node["input"]["codec"] == "ternary" and node["group_shape"] == list(w.shape)
    rows = Ternary().run(layer_input(sample, hessian=False), {"per_row": True})
    by_row = torch.cat([transformers_weight_quant()(None, w[r:r + 1].clone()) for r in range(w.shape[0])])
    assert bits_equal(rows.qt.decode(), by_row.numpy())


def qmoe_quantize(x: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor) -> torch.Tensor:
    """quant.py ``quantize`` for ``maxq < 0`` (ternary), with QMoE's names: scale = max, zero = min."""
    return (x > xmax / 2).float() * xmax + (x < xmin / 2).float() * xmin


def test_qmoe_without_feedback_is_the_published_rounding() -> None:
    sample = LAYERS[0]
    w = torch.as_tensor(sample.weight).float()
    cols = w.shape[1]
    layer = LayerInput(sample.name, w.clone(), "F32", torch.eye(cols))
    result = QMoE().run(layer, {"damp": 10.0})  # U = chol(H^-1) is diagonal: no column affects another
    zero = torch.zeros(w.shape[0])
    xmin = torch.minimum(w.min(1).values, zero).bfloat16().float()[:, None]
    xmax = torch.maximum(w.max(1).values, zero).bfloat16().float()[:, None]
    assert torch.equal(result.dequantized, qmoe_quantize(w, xmax, xmin))
    assert np.array_equal(result.qt.decode(), result.dequantized.numpy())
    node = result.qt.record["weight"]
    assert node["codec"] == "lut" and node["codes"]["bits"] == 2
    assert result.qt.tensors[node["table"]["tensor"]].shape == (w.shape[0], 1, 4)


def test_qmoe_error_feedback_lowers_output_error() -> None:
    for sample in LAYERS:
        w = torch.as_tensor(sample.weight).float()
        plain = QMoE().run(LayerInput(sample.name, w.clone(), "F32", torch.eye(w.shape[1])), {"damp": 10.0})
        fed = QMoE().run(layer_input(sample), {})
        assert np.array_equal(fed.qt.decode(), fed.dequantized.numpy())
        assert hessian_weighted_error(sample, fed.dequantized) < 0.8 * hessian_weighted_error(sample, plain.dequantized)
        ordered = QMoE().run(layer_input(sample), {"act_order": True})
        assert np.array_equal(ordered.qt.decode(), ordered.dequantized.numpy())


def test_zero_row_gets_unit_levels() -> None:
    w = torch.zeros(4, 16)
    w[1] = torch.linspace(-1, 1, 16)
    result = QMoE().run(LayerInput("x.weight", w, "F32", torch.eye(16)), {})
    table = result.qt.tensors[result.qt.record["weight"]["table"]["tensor"]].astype(np.float32)
    assert table[0, 0].tolist() == [-1.0, 0.0, 1.0, 0.0]  # QMoE: a row of zeros gets (-1, +1)
    assert np.all(result.dequantized[0].numpy() == 0)


def test_bad_parameters() -> None:
    with pytest.raises(ParameterError, match="damp"):
        QMoE().validate_params({"damp": -1})
    with pytest.raises(ParameterError, match="per_row"):
        Ternary().validate_params({"per_row": "maybe"})
