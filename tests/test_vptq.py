"""vptq: vectors along output features (vq version 2, vector_shape [v, 1]), Hessian-weighted k-means, GPTQ-style
assignment with error feedback, optional residual codebook and per-column norm, on MiniLM's real layers with Hessians
of their inputs (``qformat.testing.sample_layers``).

Comparisons: on the Hessian-weighted output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` VPTQ v8 k256 beats RTN and GPTQ 2-bit
g64 at fewer bits per weight (from the stored bytes, codebook included), and a 256-entry residual codebook lowers it
further (at about their bits); the k-means is Lloyd's algorithm (centres are the weighted means of their clusters);
the GPTQ pass with a huge damping reduces to nearest-centroid rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hessian_weighted_error, layer_input
from qformat_plugins import _vptq_core as core
from qformat_plugins.gptq import GPTQ
from qformat_plugins.rtn import RTN
from qformat_plugins.vptq import VPTQ

from qformat.errors import ConversionError, ParameterError
from qformat.methods import LayerInput
from qformat.testing import check_method, sample_layers

LAYERS = sample_layers(2)  # MiniLM: query 384x384, intermediate 1536x384
QUICK = {"kmeans_iters": 8}


def test_check_method_harness() -> None:
    # The plain weight error is large on purpose, as GPTQ 2-bit's is on these layers (1.02 and 1.42, measured): the
    # Hessian weights MiniLM's 20x outlier input channels, and the output error is what the GPTQ pass minimises.
    report = check_method(VPTQ(), QUICK, layers=LAYERS[:1], max_relative_error=0.9)
    assert report.method == "vptq" and 1.1 < report.bits_per_weight < 1.3
    assert report.output_error < 0.4  # measured 0.33 (RTN 2-bit g64: 0.46 at 2.3 bits)
    report = check_method(VPTQ(), {**QUICK, "residual_codebook_size": 16, "norm": True}, layers=LAYERS[1:],
                          max_relative_error=1.1)
    assert 1.5 < report.bits_per_weight < 1.6
    assert report.output_error < 0.42  # measured 0.37 (RTN 2-bit g64: 0.43 at 2.3 bits)


@pytest.mark.parametrize("params", [{}, {"residual_codebook_size": 16}, {"norm": True, "vector_len": 4},
                                    {"vector_len": 12, "codebook_size": 100, "residual_codebook_size": 3,
                                     "norm": True, "block_size": 50}])
def test_record_is_vq_version_2_and_decodes_exactly(params: dict) -> None:
    sample = LAYERS[0]
    rows, cols = sample.weight.shape
    result = VPTQ().run(layer_input(sample), {**QUICK, **params})
    assert np.array_equal(result.qt.decode(), result.dequantized.numpy())  # bit for bit
    v = params.get("vector_len", 8)
    k = params.get("codebook_size", 256)
    node = result.qt.record["weight"]
    if params.get("norm"):
        assert node["codec"] == "scale" and node["group_shape"] == [rows, 1]
        assert result.qt.tensors[node["factor"]["tensor"]].shape == (1, cols)
        node = node["input"]
    parts = node["terms"] if params.get("residual_codebook_size") else [node]
    assert [p["codec"] for p in parts] == ["vq"] * len(parts) and (node["codec"] == "sum") == (len(parts) == 2)
    for part, entries in zip(parts, (k, params.get("residual_codebook_size"))[:len(parts)], strict=True):
        assert part["version"] == 2 and part["vector_shape"] == [v, 1]
        assert part["codes"]["shape"] == [rows // v, cols] and part["codes"]["bits"] == (entries - 1).bit_length()
        books = result.qt.tensors[part["codebooks"]["tensor"]]
        width = (entries - 1).bit_length()
        assert books.dtype == np.float16 and books.shape == (1, 1 << width, v)  # padded to the codes' bound
        assert not books[0, entries:].any()
    stored = sum(a.nbytes for a in result.qt.tensors.values()) * 8 / (rows * cols)
    assert result.info["bits_per_weight"] == pytest.approx(stored)


def test_beats_rtn_and_gptq_2bit_g64_at_fewer_bits_and_the_residual_codebook_helps() -> None:
    sample = LAYERS[0]
    runs = {"rtn": RTN().run(layer_input(sample), {"bits": 2, "group_size": 64}),
            "gptq": GPTQ().run(layer_input(sample), {"bits": 2, "group_size": 64}),
            "plain": VPTQ().run(layer_input(sample), {}),
            "residual": VPTQ().run(layer_input(sample), {"residual_codebook_size": 256})}
    bits = {name: r.qt.bits_per_weight for name, r in runs.items()}  # from the stored bytes, codebooks included
    loss = {name: hessian_weighted_error(sample, r.dequantized) for name, r in runs.items()}
    # measured: bits rtn/gptq 2.29, plain 1.22, residual 2.44; loss rtn 0.214, gptq 0.233, plain 0.105, residual 0.022
    assert bits["plain"] < bits["rtn"] == bits["gptq"] and bits["residual"] < 1.1 * bits["rtn"], bits
    assert loss["plain"] < 0.7 * min(loss["rtn"], loss["gptq"]), loss
    assert loss["residual"] < 0.35 * loss["plain"], loss


def test_kmeans_is_weighted_lloyd() -> None:
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(600, 4, generator=gen)
    weight = torch.rand(600, generator=gen) + 0.1
    result = core.weighted_kmeans(data, weight, 12, 200, seed=1)
    centres = result.centroids
    labels = core.nearest(data, centres)
    brute = torch.cdist(data.double(), centres.double()).argmin(1)
    assert (labels == brute).float().mean() > 0.99  # fp32 distance rounding aside
    for k in range(12):
        mask = labels == k
        if mask.any():
            mean = (data[mask] * weight[mask, None]).sum(0) / weight[mask].sum()
            assert torch.allclose(centres[k], mean, atol=1e-5)  # converged: centres are weighted means
    again = core.weighted_kmeans(data, weight, 12, 200, seed=1)
    assert torch.equal(again.centroids, centres)


def test_vectors_run_along_output_features() -> None:
    w = torch.arange(24.0).reshape(8, 3)
    vectors = core.column_vectors(w, 4)  # [C, R / v, v]
    assert vectors.shape == (3, 2, 4) and vectors[1, 1].tolist() == [13.0, 16.0, 19.0, 22.0]  # rows 4..7 of column 1


def test_huge_damping_is_nearest_centroid_rounding() -> None:
    """With H^-1 ≈ I / λ the feedback vanishes: every vector takes its nearest centroid of the original weight."""
    sample = LAYERS[0]
    w = torch.from_numpy(sample.weight.copy())
    h = torch.eye(w.shape[1])
    result = core.vptq(w, h, v=8, k=64, k_res=0, iters=5, block_size=128, damp=1.0, seed=0, layer="x")
    flat = core.column_vectors(w, 8)
    expect = torch.stack([core.nearest(flat[c], result.books) for c in range(w.shape[1])], 1)
    assert torch.equal(result.codes, expect)


def test_two_runs_are_byte_identical() -> None:
    params = {**QUICK, "residual_codebook_size": 16, "norm": True, "seed": 3}
    runs = [VPTQ().run(layer_input(LAYERS[0]), params) for _ in range(2)]
    a, b = (r.qt for r in runs)
    assert a.record == b.record and a.tensors.keys() == b.tensors.keys()
    assert all(a.tensors[k].tobytes() == b.tensors[k].tobytes() for k in a.tensors)
    other = VPTQ().run(layer_input(LAYERS[0]), {**params, "seed": 4}).qt
    assert any(a.tensors[k].tobytes() != other.tensors[k].tobytes() for k in a.tensors)  # the seed is used


def test_bad_inputs_are_refused_before_any_work() -> None:
    method = VPTQ()
    for bad in ({"vector_len": 5}, {"codebook_size": 1}, {"codebook_size": 65537}, {"residual_codebook_size": 1},
                {"kmeans_iters": 0}, {"damp": -0.1}, {"block_size": 0}):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            method.validate_params(bad)
    config = method.validate_params({"vector_len": 16})
    with pytest.raises(ParameterError, match=r"vector_len.*lm_head.weight has 36 output rows.*choose vector_len in "
                                             r"\[4, 6, 12\]"):
        method.check_shapes(config, {"lm_head.weight": (36, 64)})
    with pytest.raises(ParameterError, match=r"no vector_len in \[4, 6, 8, 12, 16\] divides it"):
        method.check_shapes(method.validate_params({}), {"x.weight": (10, 64)})
    with pytest.raises(ParameterError, match=r"codebook_size.*256 entries but x.weight has only 128 vectors"):
        method.check_shapes(method.validate_params({}), {"x.weight": (16, 64)})
    with pytest.raises(ParameterError, match=r"residual_codebook_size.*512 entries"):
        method.check_shapes(method.validate_params({"codebook_size": 4, "residual_codebook_size": 512}),
                            {"x.weight": (16, 64)})
    with pytest.raises(ParameterError, match="vector_len"):
        method.run(LayerInput("x.weight", torch.zeros(10, 64), "F32", torch.eye(64)), {})
    with pytest.raises(ConversionError, match="Hessian"):
        method.run(layer_input(LAYERS[0], hessian=False), {})


def test_vq_version_2_runs_on_the_numba_kernels_only() -> None:
    from qformat.lowering import plan
    from qformat.plugins import get_plugins

    qt = VPTQ().run(layer_input(LAYERS[0]), {**QUICK, "codebook_size": 16}).qt
    assert [t.vector_rows for t in plan(qt.record).terms] == [8]
    kernels = get_plugins().kernels
    assert kernels["numba"].supports(qt.record)
    assert "(version 2)" in kernels["triton"].why_unsupported(qt.record)  # the fused Triton kernels: row vectors only


def test_cli_converts_a_tiny_model_and_it_loads_and_runs(tmp_path: Path) -> None:
    from tiny_model import make_tiny_llama

    import qformat
    from qformat.cli import main
    from qformat.format import open_folder
    from qformat.text import DEFAULT_CALIBRATION

    src = make_tiny_llama(tmp_path / "tiny", layers=1)
    calib = tmp_path / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:20_000])
    outs = [tmp_path / "out", tmp_path / "again"]
    for out in outs:
        code = main(["convert", "--method", "vptq", str(src), "--out", str(out), "-p", "codebook_size=32", "-p",
                     "residual_codebook_size=4", "-p", "kmeans_iters=4", "--calib", str(calib), "--calib-samples",
                     "2", "--calib-seqlen", "32"])
        assert code == 0
    shards = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert shards and all((outs[0] / n).read_bytes() == (outs[1] / n).read_bytes() for n in shards)  # same bytes
    out = outs[0]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert json.dumps(config).count('"vptq"') >= 1
    folder = open_folder(out)
    names = [n for n in folder.record_shard if n.endswith("q_proj.weight")]
    node = folder.quantized(names[0]).record["weight"]
    assert node["codec"] == "sum" and node["terms"][0]["version"] == 2 and node["terms"][0]["vector_shape"] == [8, 1]

    model = qformat.load(out)  # vq version 2: the linears run on the Numba kernels (vq_column_kernel)
    reference = qformat.load_dequantized(out)  # a plain model whose weights are the format's fp32 decode
    ids = torch.tensor([[1, 17, 42, 99, 5, 300]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    linear = dict(model.named_modules())[names[0].removesuffix(".weight")]
    assert linear.kernel_name == "numba"
    weight = torch.from_numpy(folder.decode(names[0]))
    x = torch.randn(3, weight.shape[1])
    with torch.no_grad():
        assert torch.allclose(linear(x), x @ weight.T, rtol=1e-5, atol=1e-5)
    bad = main(["convert", "--method", "vptq", str(src), "--out", str(tmp_path / "bad"), "-p", "vector_len=12",
                "--calib", str(calib), "--calib-samples", "2", "--calib-seqlen", "32"])
    assert bad != 0 and not (tmp_path / "bad").exists()
