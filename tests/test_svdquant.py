"""SVDQuant: the `smooth` block transform (SmoothQuant-style scales, folded or a ColumnScale) and the `svdquant` method
(low-rank branch + rtn's 4-bit groups of 64, alternated while the output error falls; stored sum(affine, lowrank)).

Reference: mit-han-lab/deepcompressor `calib/lowrank.py`, `calib/smooth.py`, `examples/diffusion/configs/svdquant/`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_plugins._smooth_transform import grid, smooth_scale
from qformat_plugins.svdquant import SmoothTransform, SVDQuant, svdquant_iterate
from tiny_model import make_tiny_llama

from qformat.cli import main
from qformat.errors import ParameterError
from qformat.format import open_folder
from qformat.format.record import bits_per_weight, total_bits_per_weight
from qformat.methods import LayerInput
from qformat.plugins import get_method, get_plugins, get_transform
from qformat.testing import check_method, check_transform, sample_layers, tiny_block
from qformat.text import DEFAULT_CALIBRATION
from qformat.transforms import BlockInput, apply_chain

# -- the smooth transform ------------------------------------------------------------------------------------------


def test_smooth_scale_formula_and_grid() -> None:
    x_max = torch.tensor([1.0, 4.0, 0.0, 9.0])
    w_max = torch.tensor([1.0, 1.0, 2.0, 0.0])
    s = smooth_scale(x_max, w_max, 0.5, 0.5)
    raw = torch.tensor([1.0, 2.0, 1.0, 1.0])  # sqrt(x)/sqrt(w); a zero (x=0) and an inf (w=0) channel get 1
    assert torch.allclose(s, raw / math.sqrt(2.0 * 1.0))
    assert torch.equal(smooth_scale(x_max, w_max, 0.0, 0.0), torch.ones(4))
    assert grid(0.3, 0) == [(0.3, pytest.approx(0.7))]
    candidates = grid(0.5, 4)  # deepcompressor's beta = -2 grid: (0, 0), (a, 0), (a, 1 - a)
    assert candidates[0] == (0.0, 0.0) and len(candidates) == 7
    assert (0.25, 0.0) in candidates and (0.25, 0.75) in candidates


@pytest.mark.parametrize(("params", "architectures"), [({}, ("llama", "mistral", "phi3", "gemma2")),
                                                       ({"n_grid": 4, "group_size": 16}, ("mistral", "phi3")),
                                                       ({"fold": False}, ("llama", "gemma2"))])
def test_smooth_is_function_preserving(params: dict, architectures: tuple) -> None:
    """The harness: outputs unchanged (hooks and decoded wrapped records), deterministic, unknown architecture skipped."""
    report = check_transform(SmoothTransform(), params, architectures=list(architectures))
    assert set(report.max_error) == set(architectures)
    for arch in architectures:
        tiny = tiny_block(arch)
        gqa = tiny.config.num_key_value_heads < tiny.config.num_attention_heads
        if params.get("fold", True):
            assert report.input_transforms[arch] == (1 if gqa and arch != "phi3" else 0), arch  # o_proj under GQA
            assert report.changed_modules[arch] > 0  # norms and rows took 1/s
        else:
            assert report.changed_modules[arch] == 0  # nothing folded: every linear has its ColumnScale
            assert report.input_transforms[arch] == len(tiny.block_input().linears)
    assert report.skipped


def test_smooth_on_tiny_llama_folds_into_the_norm() -> None:
    """The llama block of the other transform tests: input_layernorm's weight becomes w / s with s the SmoothQuant
    span of q/k/v's inputs and weights, and the block's outputs are unchanged within fp32 tolerance."""
    tiny = tiny_block("llama", seed=3)
    reference = tiny.forward()
    block = tiny.block_input()
    norm_before = tiny.block.input_layernorm.weight.detach().clone()
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    w_max = torch.stack([tiny.block.get_submodule(n).weight.detach().abs().amax(0) for n in linears]).amax(0)
    x_max = block.capture(["self_attn.q_proj"])["self_attn.q_proj"].abs().amax(0)
    transform = get_transform("smooth")
    done = apply_chain([(transform, transform.validate_params({"alpha": 0.5}))], block)
    assert not done.skipped
    s = smooth_scale(x_max, w_max, 0.5, 0.5)
    assert torch.allclose(tiny.block.input_layernorm.weight.detach(), norm_before / s, rtol=1e-6)
    assert float(s.max() / s.min()) > 2  # the tiny block's outlier channels are smoothed
    for got, want in zip(tiny.forward(), reference, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_smooth_grid_never_scores_worse_than_no_scaling() -> None:
    tiny = tiny_block("mistral", seed=1)
    transform = get_transform("smooth")
    done = apply_chain([(transform, transform.validate_params({"n_grid": 10, "group_size": 16, "bits": 3}))],
                       tiny.block_input())
    units = done.info["smooth"]["units"]
    assert len(units) == 4 and all(u["error"] <= u["error_unscaled"] for u in units)
    assert any(u["error"] < u["error_unscaled"] and u["alpha"] > 0 for u in units), units
    assert [u["folded_into"] for u in units].count(None) == 1  # o_proj under GQA: a ColumnScale


def test_smooth_skips_a_block_it_does_not_understand_with_a_warning() -> None:
    """A BERT layer handed over as a llama block: the layout does not match, the block is skipped and left alone."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                vocab_size=128)).eval()
    layer = bert.encoder.layer[0]
    hidden = torch.randn(2, 16, 64)
    block = BlockInput(0, "encoder.layer.0.", "llama", layer, ["attention.self.query"],
                       lambda keep: [layer(hidden)[0]] if keep else [], bert.config)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    transform = SmoothTransform()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = apply_chain([(transform, transform.validate_params({}))], block)
    assert done.skipped and not done.input_transforms
    assert any("smooth" in str(w.message) and "encoder.layer.0" in str(w.message) for w in caught)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


# -- the method ------------------------------------------------------------------------------------------------------


def _outlier_layer(seed: int = 0, rows: int = 256, cols: int = 256, tokens: int = 2048
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few outlier input columns (x20) and correlated inputs with a few large channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, torch.randperm(cols, generator=g)[:6]] *= 20.0
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + mix)
    x[:, torch.randperm(cols, generator=g)[:4]] *= 8.0
    return w, x


def _layer(w: torch.Tensor, x: torch.Tensor | None, name: str = "model.layers.0.mlp.down_proj.weight") -> LayerInput:
    h = None if x is None else 2.0 / x.shape[0] * (x.T.double() @ x.double()).float()
    return LayerInput(name, w.clone(), "F32", h, None, 0 if x is None else x.shape[0])


def _out_mse(x: torch.Tensor, w: torch.Tensor, deq: torch.Tensor) -> float:
    return float((x @ (deq - w).T).square().mean())


def test_output_error_below_rtn_falls_then_stops_at_first_non_improvement() -> None:
    w, x = _outlier_layer()
    layer = _layer(w, x)
    rtn = get_method("rtn").run(_layer(w, x), {"bits": 4, "group_size": 64, "sym": True})
    result = SVDQuant().run(layer, {})
    info = result.info["svdquant"]
    history = info["output_error_history"]
    h = layer.hessian.double()

    def trace(deq: torch.Tensor) -> float:
        dw = (w - deq).double()
        return float(((dw @ h) * dw).sum())

    rtn_error, svd_error = trace(rtn.dequantized), trace(result.dequantized)
    print(f"outlier-column layer [256, 256]: tr(dW H dW^T) RTN w4 g64 sym {rtn_error:.4g}, svdquant rank 32 "
          f"{svd_error:.4g} after {info['iterations_run']} candidates; history {[round(e, 4) for e in history]}")
    assert svd_error < 0.5 * rtn_error
    assert _out_mse(x, w, result.dequantized) < _out_mse(x, w, rtn.dequantized)
    assert info["iterations_run"] == len(history) >= 3
    assert all(b < a for a, b in zip(history[:-2], history[1:-1], strict=True))  # falls ...
    assert history[-1] >= min(history[:-1])  # ... then the first non-improvement stops it
    assert info["output_error"] == min(history)  # the best is kept, not the last
    assert svd_error == pytest.approx(min(history), rel=1e-4)  # the decoded record is that candidate
    # The candidate loop itself: iterations caps it; more iterations never end worse.
    one, one_history = svdquant_iterate(w, layer.hessian, 4, 64, True, 32, 1, False, 16)
    assert len(one_history) == 1 and one_history[0] == history[0] and one.error >= info["output_error"]


def test_real_layers_beat_rtn_and_weighted_svd() -> None:
    for sample in sample_layers(count=1, tokens=1024):  # MiniLM query [384, 384]
        w, x = torch.from_numpy(sample.weight.copy()), torch.from_numpy(sample.inputs.copy())
        rtn = get_method("rtn").run(_layer(w, x, sample.name), {"bits": 4, "group_size": 64, "sym": True})
        errors = {"rtn": _out_mse(x, w, rtn.dequantized)}
        for label, params in (("svd", {"iterations": 4}), ("weighted", {"weighted_svd": True, "iterations": 4})):
            errors[label] = _out_mse(x, w, SVDQuant().run(_layer(w, x, sample.name), params).dequantized)
        print(f"{sample.name} {list(w.shape)} output MSE: RTN w4 g64 {errors['rtn']:.4g}, svdquant r32 (<= 4 iter.) "
              f"{errors['svd']:.4g}, weighted {errors['weighted']:.4g}")
        assert errors["weighted"] < errors["svd"] < errors["rtn"]


def test_rank_zero_is_plain_rtn_exactly() -> None:
    w, x = _outlier_layer(1, rows=64, cols=192)
    for sym in (True, False):
        rtn = get_method("rtn").run(_layer(w, x), {"bits": 4, "group_size": 64, "sym": sym})
        zero = SVDQuant().run(_layer(w, x), {"rank": 0, "sym": sym})
        assert zero.qt.record["weight"] == rtn.qt.record["weight"]  # the affine node alone
        assert set(zero.qt.tensors) == set(rtn.qt.tensors)
        assert all(np.array_equal(zero.qt.tensors[k], rtn.qt.tensors[k]) for k in rtn.qt.tensors)
        assert torch.equal(zero.dequantized, rtn.dequantized)
        assert zero.info["svdquant"]["iterations_run"] == 1


def test_record_is_sum_of_affine_and_lowrank_and_decodes_exactly() -> None:
    w, x = _outlier_layer(2, rows=96, cols=128)
    registry = get_plugins().codecs
    sizes = {}
    for params in ({}, {"sidecar_bits": 8}, {"rank": 4, "sym": False, "group_size": 32}):
        result = SVDQuant().run(_layer(w, x), params)
        node = result.qt.record["weight"]
        assert node["codec"] == "sum" and [t["codec"] for t in node["terms"]] == ["affine", "lowrank"]
        lowrank = node["terms"][1]
        rank = params.get("rank", 32)
        bits = params.get("sidecar_bits", 16)
        assert result.info["svdquant"]["rank"] == rank
        assert lowrank["a"]["codec"] == ("affine" if bits == 8 else "tensor")
        decoded = result.qt.decode(registry).reshape(w.shape)
        assert np.array_equal(decoded, result.dequantized.numpy())
        sizes[json.dumps(params)] = result.qt.bits_per_weight
        json.dumps(result.info)  # the info is JSON (it goes into the file)
    # bits from bytes include the sidecar: 4 + 16/64 for the codes and scales, 32 (96 + 128) 16 / (96 * 128) for it
    assert sizes["{}"] == pytest.approx(4 + 16 / 64 + 32 * (96 + 128) * 16 / (96 * 128))
    assert sizes['{"sidecar_bits": 8}'] < sizes["{}"]


def test_check_method_and_parameters() -> None:
    method = get_method("svdquant")
    assert isinstance(method, SVDQuant) and method.transforms == ("smooth",)
    assert method.calibration == frozenset({"hessian"})
    report = check_method(method, {"rank": 8, "iterations": 2}, layers=sample_layers(count=1, tokens=256), max_relative_error=0.2)
    assert report.bits_per_weight > 4.25
    with pytest.raises(ParameterError, match="'sidecar_bits'"):
        method.validate_params({"sidecar_bits": 4})
    with pytest.raises(ParameterError, match="'rank'"):
        method.validate_params({"rank": -1})
    with pytest.raises(ParameterError, match="'weighted_svd'"):
        method.run(_layer(torch.randn(8, 16), None), {"weighted_svd": True})
    # Without a Hessian the error measured is the weight error: still better than RTN on it.
    w, _ = _outlier_layer(3, rows=64, cols=128)
    plain = method.run(_layer(w, None), {"rank": 8}).dequantized
    rtn = get_method("rtn").run(_layer(w, None), {"bits": 4, "group_size": 64, "sym": True}).dequantized
    assert float((plain - w).square().sum()) < float((rtn - w).square().sum())


# -- end to end -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("svdquant") / "tiny", layers=2, kv_heads=2)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def test_convert_end_to_end(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import qformat

    out = tmp_path / "out"
    code = main(["convert", str(tiny), "--out", str(out), "--calib", str(tiny.parent / "calib.txt"),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--json", "--method", "svdquant",
                 "-p", "rank=8", "-p", "alpha=0.4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"] == "svdquant" and config["method_params"]["rank"] == 8
    chain = config["transforms"]
    assert [t["transform"] for t in chain] == ["smooth"]
    assert chain[0]["params"]["alpha"] == 0.4 and chain[0]["params"]["group_size"] == 64  # taken from the method
    folder = open_folder(out)
    records = folder.records
    blocks = [n for n in records if n.startswith("model.layers.")]
    assert len(blocks) == 14
    wrapped = 0
    for name in blocks:
        node = records[name]["weight"]
        if node["codec"] == "scale":  # o_proj under GQA: the smoothing ColumnScale around the record
            wrapped += 1
            assert "o_proj" in name
            node = node["input"]
        assert node["codec"] == "sum" and [t["codec"] for t in node["terms"]] == ["affine", "lowrank"], name
        assert records[name]["info"]["svdquant"]["iterations_run"] >= 1
    assert wrapped == 2
    down = records["model.layers.0.mlp.down_proj.weight"]
    rows, cols = down["shape"]
    # bits from bytes: 4-bit codes, an F16 scale per 64 columns (sym: no zeros) and the F16 rank-8 sidecar
    assert bits_per_weight(down) == pytest.approx(4 + 16 / 64 + 8 * (rows + cols) * 16 / (rows * cols))
    assert config["bits_per_weight"] == pytest.approx(total_bits_per_weight(records.values()), abs=1e-4)
    norm = np.array(folder.tensor("model.layers.0.input_layernorm.weight"))
    folder.close()
    from safetensors.numpy import load_file

    assert not np.array_equal(norm, load_file(str(tiny / "model.safetensors"))["model.layers.0.input_layernorm.weight"])
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    from qformat.runtime.loader import load_dequantized

    with torch.no_grad():
        want_logits = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()(ids).logits
        reference = load_dequantized(out).eval()(ids).logits
        loaded = qformat.load(out).eval()(ids).logits
    assert torch.allclose(loaded, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    rel = float((reference - want_logits).norm() / want_logits.norm())
    assert math.isfinite(rel) and rel < 0.2, rel
