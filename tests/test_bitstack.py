"""bitstack and partial loads (spec/partial.md): one converted file, loaded at several sizes.

Reference: the BitStack repository (Wang et al. 2024) is not a package; its decomposition is checked here against
its definition: each block is ``sign(R) ⊙ (u v)`` with ``u v`` the rank-k truncated SVD of ``|R|`` (so ``u v`` equals
numpy's own rank-k SVD product up to the fp16 rounding of u and v), the residual shrinks block by block, and the
recorded gains are the drops of the layer's output error ``tr(ΔW H ΔWᵀ)``. A file loads with fewer blocks through
``qformat.load(max_memory=...)`` / ``keep_terms``, reading only the kept blocks' bytes, and its outputs match the
reference decode with ``keep_terms``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hessian_weighted_error, layer_input
from qformat_plugins.bitstack import BitStack
from tiny_model import make_tiny_llama

import qformat
from qformat.conversion.pipeline import ConvertOptions, convert
from qformat.errors import LoadError, ParameterError
from qformat.format import open_folder, partial
from qformat.runtime.partial_load import parse_size
from qformat.testing import check_method, sample_layers
from qformat.text import DEFAULT_CALIBRATION

LAYERS = sample_layers(2)


def test_check_method_harness() -> None:
    report = check_method(BitStack(), {"blocks": 3, "rank": 8}, layers=LAYERS, max_relative_error=0.3)  # measured 0.21
    assert report.method == "bitstack"


def test_blocks_are_sign_times_rank_k_svd_and_gains_are_error_drops() -> None:
    sample = LAYERS[0]
    w = torch.as_tensor(sample.weight).float()
    result = BitStack().run(layer_input(sample), {"blocks": 3, "rank": 4, "act_scale": False})
    qt = result.qt
    terms = qt.record["weight"]["input"]["terms"]
    residual = w.double().numpy()
    h = sample.hessian().astype(np.float64)
    before = float(np.sum((w.double().numpy() @ h) * w.double().numpy()))
    for i, term in enumerate(terms):
        u = qt.tensors[term["u"]["tensor"]].astype(np.float64)
        v = qt.tensors[term["v"]["tensor"]].astype(np.float64)
        left, sv, right = np.linalg.svd(np.abs(residual), full_matrices=False)
        best = (left[:, :4] * sv[:4]) @ right[:4]  # rank-4 SVD of |R|
        assert np.abs(u @ v - best).max() < 2e-3 * np.abs(best).max()  # only fp16 rounding of u and v
        sign = np.where(residual >= 0, 1.0, -1.0)
        residual = residual - sign * (u @ v)
        after = float(np.sum((residual @ h) * residual))
        assert result.info["stack_gains"][i] == pytest.approx(before - after, rel=1e-4)
        before = after
    gains = result.info["stack_gains"]
    assert gains == sorted(gains, reverse=True) and gains[-1] > 0


def test_activation_scaling_lowers_output_error() -> None:
    for sample in LAYERS:
        plain = BitStack().run(layer_input(sample), {"blocks": 4, "act_scale": False})
        scaled = BitStack().run(layer_input(sample), {"blocks": 4})
        assert hessian_weighted_error(sample, scaled.dequantized) < 0.5 * hessian_weighted_error(sample, plain.dequantized)
        node = scaled.qt.record["weight"]
        assert node["codec"] == "scale" and node["group_shape"] == [sample.weight.shape[0], 1]


def test_truncated_record_reads_only_its_terms() -> None:
    qt = BitStack().run(layer_input(LAYERS[0]), {"blocks": 4}).qt
    full = qt.decode()
    sizes = partial.term_bytes(qt.record, qt.tensor_info)
    for k in (1, 2, 4):
        cut = qt.keep_terms(k)
        assert cut.record["storage_bytes"] == sum(sizes[:k]) == sum(a.nbytes for a in cut.tensors.values())
        assert np.array_equal(cut.decode(), qt.decode(keep_terms=k))
    assert np.array_equal(qt.keep_terms(4).decode(), full)
    errors = [float(np.square(qt.decode(keep_terms=k) - LAYERS[0].weight).sum()) for k in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True)
    with pytest.raises(Exception, match="keep_terms"):
        qt.decode(keep_terms=0)


def test_stack_order_is_level_by_level_by_gain_per_byte() -> None:
    records = {
        "a": {"weight": {"codec": "sum", "terms": [{}, {}, {}]}, "info": {"stack_gains": [9, 1, 5]}},
        "b": {"weight": {"codec": "scale", "input": {"codec": "sum", "terms": [{}, {}]}},
              "info": {"stack_gains": [9, 3]}},
        "c": {"weight": {"codec": "affine"}},
    }
    order = partial.stack_order(records, lambda name, i: 10)
    assert order == [("b", 1), ("a", 1), ("a", 2)]  # level 1 by gain (3 > 1), then level 2
    keep, total = partial.plan_terms(records, lambda name, i: 10, 100, 125)
    assert keep == {"a": 2, "b": 2} and total == 120
    with pytest.raises(ValueError, match="smallest load"):
        partial.plan_terms(records, lambda name, i: 10, 100, 99)


def test_parse_size() -> None:
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size(4096) == 4096
    for bad in ("-1MB", "60 parsecs", 0, "MB"):
        with pytest.raises(LoadError):
            parse_size(bad)


def test_bad_parameters() -> None:
    with pytest.raises(ParameterError, match="blocks"):
        BitStack().validate_params({"blocks": 0})
    with pytest.raises(ParameterError, match="rank"):
        BitStack().check_shapes(BitStack().validate_params({"rank": 100}), {"x.weight": (64, 32)})


@pytest.fixture(scope="module")
def bitstack_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2)
    calib = src.parent / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    out = tmp_path_factory.mktemp("out") / "bitstack"
    convert(ConvertOptions(str(src), out, "bitstack", {"blocks": 4, "rank": 4}, calib=calib, calib_samples=8,
                           calib_seqlen=64, quiet=True))
    return out


def test_one_file_loads_at_several_sizes(bitstack_folder: Path) -> None:
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 11, 64]])
    full = qformat.load(bitstack_folder)
    assert full.qformat_partial is None
    with torch.no_grad():
        reference = full(ids).logits
    plan = qformat.load(bitstack_folder, keep_terms=1).qformat_partial
    smallest, everything = plan.smallest_bytes, plan.full_bytes
    assert plan.loaded_bytes == smallest < everything
    errors, loaded = [], []
    for fraction in (0.0, 0.5, 1.0):
        budget = int(smallest + fraction * (everything - smallest))
        model = qformat.load(bitstack_folder, max_memory=budget)
        plan = model.qformat_partial
        assert plan.loaded_bytes <= budget and plan.budget == budget
        loaded.append(plan.loaded_bytes)
        with torch.no_grad():
            errors.append(float((model(ids).logits - reference).abs().max()))
    assert loaded[0] == smallest and loaded[-1] == everything and loaded == sorted(loaded)
    assert errors[-1] < 1e-4 and errors[0] > errors[-1]
    with pytest.raises(LoadError, match="smallest load"):
        qformat.load(bitstack_folder, max_memory=smallest - 1)


def test_partial_load_matches_the_reference_decode(bitstack_folder: Path) -> None:
    model = qformat.load(bitstack_folder, keep_terms=2)
    folder = open_folder(bitstack_folder)
    name = "model.layers.0.mlp.down_proj.weight"
    expected = folder.decode(name, keep_terms=2)
    layer = model.get_submodule(name.rsplit(".", 1)[0])
    x = torch.randn(3, expected.shape[1])
    with torch.no_grad():
        got = layer(x)
    want = x @ torch.from_numpy(expected).T
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bcq_loads_with_fewer_planes(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "src", layers=1)
    out = tmp_path / "bcq"
    convert(ConvertOptions(str(src), out, "bcq", {"bits": 4, "group_size": 32}, quiet=True))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        full = qformat.load(out)(ids).logits
        sizes, errors = [], []
        for planes in (1, 2, 3, 4):
            model = qformat.load(out, keep_terms=planes)
            sizes.append(model.qformat_partial.loaded_bytes)
            errors.append(float((model(ids).logits - full).abs().max()))
    assert sizes == sorted(sizes) and errors[-1] == 0.0 and errors == sorted(errors, reverse=True)


def test_cli_eval_and_generate_at_a_budget(bitstack_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
                                           ) -> None:
    from qformat.cli import main

    text = tmp_path / "eval.txt"
    text.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:4000])
    smallest = qformat.load(bitstack_folder, keep_terms=1).qformat_partial.smallest_bytes
    assert main(["eval", str(bitstack_folder), "--text", str(text), "--seqlen", "64", "--limit", "2",
                 "--max-memory", str(smallest), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["partial_load"]["loaded_bytes"] == smallest and "partial load" in err
    assert main(["generate", str(bitstack_folder), "hello", "--max-new-tokens", "3", "--keep-terms", "2"]) == 0
    assert "partial load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(bitstack_folder), "--text", str(text), "--keep-terms", "0"])


def test_from_pretrained_with_a_loading_override(bitstack_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from qformat.runtime.hf_integration import QformatConfig

    ids = torch.tensor([[3, 17, 42, 99]])
    model = AutoModelForCausalLM.from_pretrained(bitstack_folder, quantization_config=QformatConfig(keep_terms=1))
    assert model.qformat_partial.loaded_bytes == model.qformat_partial.smallest_bytes
    with torch.no_grad():
        expected = qformat.load(bitstack_folder, keep_terms=1)(ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    assert AutoModelForCausalLM.from_pretrained(bitstack_folder).qformat_partial is None
