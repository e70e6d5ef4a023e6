"""Size budgets (qformat.conversion.budget) and low-rank sidecars (qformat.sidecar) through the pipeline."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import make_tiny_llama

import qformat
from qformat.conversion.budget import (
    LayerCosts,
    allocate,
    parse_candidate,
    parse_size,
    resolve_candidates,
    uniform_errors,
)
from qformat.conversion.calibration import DEFAULT_CALIBRATION
from qformat.errors import ConversionError, ParameterError
from qformat.format import QFile
from qformat.methods import LayerInput
from qformat.plugins import get_method
from qformat.sidecar import fit_lowrank, with_sidecar

CALIB = {"calib_samples": 8, "calib_seqlen": 64, "quiet": True}
CANDIDATES = ("rtn:bits=2,group_size=32", "rtn:bits=4,group_size=32", "rtn:bits=8,group_size=32",
              "gptq:bits=3,group_size=32")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2, hidden=64, intermediate=128)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def _options(source: Path) -> dict:
    return {**CALIB, "calib": source.parent / "calib.txt"}


# -- the knapsack -------------------------------------------------------------------------------------------------

def test_allocate_is_the_exact_optimum_on_small_instances() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        layers = [LayerCosts(f"l{i}", 100, [int(b) for b in rng.integers(10, 100, 3)],
                             [float(e) for e in rng.random(3)]) for i in range(4)]
        budget = int(rng.integers(60, 300))
        feasible = [(sum(layer.errors[c] for layer, c in zip(layers, combo, strict=True)), combo)
                    for combo in itertools.product(range(3), repeat=4)
                    if sum(layer.bytes[c] for layer, c in zip(layers, combo, strict=True)) <= budget]
        if not feasible:
            with pytest.raises(ParameterError, match="budget"):
                allocate(layers, budget)
            continue
        picked = allocate(layers, budget, resolution=budget)  # one-byte units: exact
        assert sum(layer.bytes[c] for layer, c in zip(layers, picked, strict=True)) <= budget
        assert math.isclose(sum(layer.errors[c] for layer, c in zip(layers, picked, strict=True)), min(feasible)[0],
                            rel_tol=1e-12), trial


def test_allocate_never_exceeds_the_budget_with_coarse_units() -> None:
    rng = np.random.default_rng(1)
    layers = [LayerCosts(f"l{i}", 1000, [int(b) for b in rng.integers(1000, 50_000, 6)],
                         [float(e) for e in rng.random(6)]) for i in range(50)]
    for budget in (600_000, 900_000, 1_500_000):
        picked = allocate(layers, budget, resolution=200)
        assert sum(layer.bytes[c] for layer, c in zip(layers, picked, strict=True)) <= budget
        # and it is at least as good as any uniform choice that fits
        for index in range(6):
            size, error = uniform_errors(layers, index)
            if size <= budget - 50 * (budget // 200):  # fits even after rounding every layer up one unit
                assert sum(layer.errors[c] for layer, c in zip(layers, picked, strict=True)) <= error + 1e-9


def test_allocate_names_a_layer_without_a_finite_estimate() -> None:
    layers = [LayerCosts("ok", 10, [5, 10], [1.0, 0.5]), LayerCosts("broken", 10, [5, 10], [math.nan, math.inf])]
    with pytest.raises(ParameterError, match="broken: no candidate has a finite estimate"):
        allocate(layers, 20)


def test_parse_size_and_candidates() -> None:
    assert parse_size("80MB") == 80_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(1234) == 1234
    for bad in ("80 parsecs", "-3MB", "0"):
        with pytest.raises(ParameterError, match="--target-size"):
            parse_size(bad)
    c = parse_candidate("gptq:bits=3,group_size=64,sidecar_rank=8,sidecar_bits=8")
    assert (c.method.name, c.config.bits, c.sidecar_rank, c.sidecar_bits) == ("gptq", 3, 8, 8)
    assert c.label == "gptq:bits=3,group_size=64,sidecar_rank=8,sidecar_bits=8"
    with pytest.raises(ParameterError, match="rewrites whole blocks"):
        parse_candidate("awq")  # its transform rewrites the block
    with pytest.raises(ParameterError, match="sidecar_bits is 8 or 16"):
        parse_candidate("rtn:sidecar_rank=4,sidecar_bits=12")
    with pytest.raises(ParameterError, match="bits"):
        parse_candidate("rtn:bits=99")
    with pytest.raises(ParameterError, match="given twice"):
        resolve_candidates(["rtn:bits=4", "rtn:bits=4,group_size=128"], None)
    narrowed = resolve_candidates([], "gptq")
    assert narrowed and {c.method.name for c in narrowed} == {"gptq"}
    assert {c.method.name for c in resolve_candidates([], None)} >= {"rtn", "gptq", "nf4", "hqq"}


# -- sidecars -----------------------------------------------------------------------------------------------------

def _anisotropic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 96, generator=gen) * 0.05
    x = torch.randn(1024, 96, generator=gen) * torch.linspace(0.05, 4.0, 96)
    return weight, x, 2.0 / x.shape[0] * x.T @ x


def test_fit_lowrank_plain_is_the_truncated_svd_and_weighted_minimises_output_error() -> None:
    weight, x, hessian = _anisotropic()
    error = torch.randn(48, 96) @ torch.diag(torch.linspace(1, 0.01, 96))
    a, b = fit_lowrank(error, 6)
    s = torch.linalg.svdvals(error.double())
    assert math.isclose(float((error - a @ b).norm()), float(s[6:].pow(2).sum().sqrt()), rel_tol=1e-4)
    aw, bw = fit_lowrank(error, 6, hessian)
    out = lambda d: float(((d @ x.T) ** 2).sum())  # noqa: E731
    assert out(error - aw @ bw) < 0.9 * out(error - a @ b)
    assert [t.shape for t in fit_lowrank(error, 0)] == [(48, 0), (0, 96)]


@pytest.mark.parametrize("bits", [16, 8])
def test_with_sidecar_decodes_to_base_plus_the_stored_product(bits: int) -> None:
    weight, x, hessian = _anisotropic(1)
    rtn = get_method("rtn")
    qt = rtn.quantize(LayerInput("w.weight", weight.clone()), rtn.validate_params({"bits": 2, "group_size": 32}))
    base = torch.from_numpy(qt.decode())
    side = with_sidecar(qt, weight, 8, bits=bits)
    assert side.record["weight"]["codec"] == "sum" and side.record["weight"]["terms"][0] == qt.record["weight"]
    assert side.record["info"]["sidecar"] == {"rank": 8, "bits": bits, "weighted": False}
    got = torch.from_numpy(side.decode())
    a, b = fit_lowrank(weight - base, 8)
    assert float((weight - got).norm()) < 0.9 * float((weight - base).norm())
    assert torch.allclose(got, base + a @ b, atol=2e-3 if bits == 16 else 2e-2)
    assert side.bits_per_weight > qt.bits_per_weight
    with pytest.raises(ParameterError, match="already has a sidecar"):
        with_sidecar(side, weight, 4)


# -- through the pipeline -----------------------------------------------------------------------------------------

def _block_records(folder: Path) -> dict[str, dict]:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    records = {}
    for shard in sorted(folder.glob("*.safetensors")):
        qf = QFile(shard)
        records.update({n: r for n, r in qf.records.items() if ".layers." in n})
        qf.close()
    return qc, records


def test_target_bits_mixes_candidates_within_the_budget_and_resumes_with_the_saved_plan(source: Path,
                                                                                         tmp_path: Path) -> None:
    opts = {**_options(source), "candidates": CANDIDATES, "output_layer": "keep"}
    out = tmp_path / "mixed"
    result = qformat.convert(source, out, target_bits=4.6, **opts)
    qc, records = _block_records(out)
    allocation = qc["allocation"]
    plan = json.loads((out / "allocation.json").read_text())
    assert plan["estimate"] == "loss" and all(e["gain"] > 0 for e in plan["layers"].values())
    assert qc["method"] == "mixed" and allocation["target"] == {"bits_per_weight": 4.6}
    stored = sum(r["storage_bytes"] for r in records.values())
    weights = sum(int(np.prod(r["shape"])) for r in records.values())
    assert 8 * stored / weights <= 4.6
    assert len(set(allocation["layers"].values())) > 1  # a real mix at this budget
    # each record is what its chosen candidate writes: gptq's and rtn's bits
    for name, record in records.items():
        choice = allocation["layers"][name.removesuffix(".weight")]
        bits = int(choice.split("bits=")[1].split(",")[0])
        assert record["weight"]["bits"] == bits, (name, choice)
    from qformat.cli.format_cmds import describe

    listed = {r["name"]: r.get("config") for r in describe(str(out))["records"]}
    assert all(listed[n] == allocation["layers"][n.removesuffix(".weight")] for n in records)  # qformat inspect
    card = (out / "README.md").read_text()
    assert "size budget of 4.6 bits per weight" in card and "quantization_config.allocation.layers" in card
    # killed after the first block: the rerun reads the saved plan (no second measurement) and ends identical
    out2 = tmp_path / "resumed"

    def die(index: int) -> None:
        if index == 0:
            raise KeyboardInterrupt

    from qformat.conversion.pipeline import Converter, ConvertOptions

    options = ConvertOptions(str(source), out2, "", target_bits=4.6, **opts)
    converter = Converter(options)
    converter.prepare()
    with pytest.raises(KeyboardInterrupt):
        converter.run(on_block_done=die)
    plan = json.loads((tmp_path / "resumed.partial" / "allocation.json").read_text())
    assert plan["layers"].keys() == {f"{n}.weight" for n in allocation["layers"]}
    converter = Converter(ConvertOptions(str(source), out2, "", target_bits=4.6, **opts))
    converter.prepare()
    assert converter.resuming
    converter._measure_and_plan = None  # a resumed run must not measure again
    converter.run()
    for shard in sorted(out.glob("*.safetensors")):
        assert shard.read_bytes() == (out2 / shard.name).read_bytes()
    assert result.quantization_config["allocation"]["layers"] == allocation["layers"]


def test_measurements_are_reused_for_another_target(source: Path, tmp_path: Path) -> None:
    opts = {**_options(source), "candidates": CANDIDATES, "output_layer": "keep"}
    first = tmp_path / "first"
    qformat.convert(source, first, target_bits=4.6, **opts)
    saved = json.loads((first / "allocation.json").read_text())
    from qformat.conversion.pipeline import Converter, ConvertOptions

    converter = Converter(ConvertOptions(str(source), tmp_path / "second", "", target_bits=3.2,
                                         measurements=first, **opts))
    converter.prepare()
    converter._measure = None  # reusing: nothing is measured again
    converter.run()
    plan = json.loads((tmp_path / "second" / "allocation.json").read_text())
    assert [e["errors"] for e in plan["layers"].values()] == [e["errors"] for e in saved["layers"].values()]
    assert plan["bits_per_weight"] <= 3.2 < saved["bits_per_weight"]
    # another estimate re-weighs the same measurements (no loss gains needed for "output")
    qformat.convert(source, tmp_path / "output", target_bits=3.2, measurements=first, budget_estimate="output", **opts)
    output_plan = json.loads((tmp_path / "output" / "allocation.json").read_text())
    assert output_plan["estimate"] == "output" and output_plan["layers"].keys() == plan["layers"].keys()
    with pytest.raises(ConversionError, match="different candidates"):
        qformat.convert(source, tmp_path / "third", target_bits=3.2, measurements=first / "allocation.json",
                        **{**opts, "candidates": CANDIDATES[:2]})


def test_target_size_counts_the_whole_output(source: Path, tmp_path: Path) -> None:
    opts = {**_options(source), "candidates": CANDIDATES}
    out = tmp_path / "sized"
    target = 210_000  # the embeddings, norms and 8-bit output layer take 166 kB of it
    qformat.convert(source, out, target_size=f"{target}", **opts)
    tensor_bytes = 0
    for shard in out.glob("*.safetensors"):
        header = int.from_bytes(shard.read_bytes()[:8], "little")
        tensor_bytes += shard.stat().st_size - 8 - header
    assert tensor_bytes <= target
    with pytest.raises(ConversionError, match="leaves nothing"):
        qformat.convert(source, tmp_path / "tiny-budget", target_size="20kB", **opts)


def test_budget_option_errors(source: Path, tmp_path: Path) -> None:
    opts = _options(source)
    with pytest.raises(ParameterError, match="not both"):
        qformat.convert(source, tmp_path / "a", target_bits=4, target_size="1MB", **opts)
    with pytest.raises(ParameterError, match="add --target-bits"):
        qformat.convert(source, tmp_path / "b", "rtn", candidates=["rtn:bits=2"], **opts)
    with pytest.raises(ParameterError, match="come from the candidates"):
        qformat.convert(source, tmp_path / "c", "rtn", params={"bits": 3}, target_bits=4, **opts)
    with pytest.raises(ParameterError, match="does not combine with --transform"):
        qformat.convert(source, tmp_path / "d", target_bits=4, transforms=["hadamard"], **opts)
    with pytest.raises(ParameterError, match="below the smallest candidate"):
        qformat.convert(source, tmp_path / "e", target_bits=1.0, candidates=["rtn:bits=4"], **opts)
    with pytest.raises(TypeError, match="size budget"):
        qformat.convert(source, tmp_path / "f")


def test_sidecar_rank_on_any_method(source: Path, tmp_path: Path) -> None:
    opts = _options(source)
    plain = qformat.convert(source, tmp_path / "plain", "rtn", params={"bits": 2, "group_size": 32}, **opts)
    side = qformat.convert(source, tmp_path / "side", "rtn", params={"bits": 2, "group_size": 32}, sidecar_rank=8,
                           sidecar_weighted=True, **opts)
    qc, records = _block_records(tmp_path / "side")
    assert qc["sidecar"] == {"rank": 8, "bits": 16, "weighted": True}
    assert all(r["weight"]["codec"] == "sum" and r["weight"]["terms"][-1]["codec"] == "lowrank"
               for r in records.values())
    assert "--sidecar-rank 8 --sidecar-weighted" in qc["command"]
    assert side.quantization_config["bits_by_layer_type"]["q_proj"] > plain.quantization_config[
        "bits_by_layer_type"]["q_proj"]
    # the sidecar brings the decoded model closer to the source
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(str(source)).eval()(ids).logits
        errs = [float((qformat.load_dequantized(tmp_path / n).eval()(ids).logits - ref).norm())
                for n in ("plain", "side")]
    assert errs[1] < errs[0]
    with pytest.raises(ParameterError, match="--sidecar-bits"):
        qformat.convert(source, tmp_path / "bad", "rtn", sidecar_rank=4, sidecar_bits=4, **opts)
