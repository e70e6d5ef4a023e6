"""The compressed-tensors exporter (plugins/export_compressed_tensors.py): rtn/gptq-converted tiny Llamas export to
``pack-quantized`` folders that compressed-tensors' own decompression turns back into the reference decode bit for bit
(fp32; the library computes in the scale's dtype, written as fp32); trees it cannot express are listed, or re-quantized
with --allow-requant."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from qformat_plugins import _export_ct_records as ct
from qformat_plugins.export_compressed_tensors import CompressedTensorsExporter
from tiny_model import make_tiny_llama

from qformat.api import convert
from qformat.cli import main
from qformat.exporters import InexpressibleError, RequantizedWarning, same_bits
from qformat.format import bitpack, open_folder

CALIB = {"calib_samples": 4, "calib_seqlen": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Hidden 256, intermediate 512: groups of 128 are real groups in every linear."""
    return make_tiny_llama(tmp_path_factory.mktemp("ct-export") / "tiny", layers=2, hidden=256, intermediate=512)


def quantized(tiny: Path, out: Path, method: str, **params) -> Path:
    # output_layer="keep": one scheme throughout (the default 8-bit head is its own test)
    convert(tiny, out, method, params=params, quiet=True, output_layer="keep", **(CALIB if method == "gptq" else {}))
    return out


def decompressed(folder: Path) -> dict[str, np.ndarray]:
    """compressed-tensors' own dequantization of a checkpoint folder, in fp32."""
    import torch
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    dequantizer = CompressedTensorsDequantizer(str(folder), dtype=torch.float32)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, value in dequantizer.process(load_file(str(shard))).items():
            out[name] = value.float().numpy()
    return out


def assert_same_as_folder(values: dict[str, np.ndarray], folder_path: Path) -> int:
    folder = open_folder(folder_path)
    try:
        for name in folder.records:
            assert same_bits(values[name], folder.decode(name)), name
        for name in folder.plain_names:
            assert same_bits(values[name], np.asarray(folder.tensor(name), np.float32)), name
        return len(folder.records)
    finally:
        folder.close()


CASES = [
    ("rtn", {"bits": 4, "group_size": 32, "sym": False}, "pack-quantized int4 group 32 asym"),
    ("rtn", {"bits": 4, "group_size": 128, "sym": False}, "pack-quantized int4 group 128 asym"),
    ("rtn", {"bits": 4, "group_size": 128, "sym": True}, "pack-quantized int4 group 128 sym"),
    ("gptq", {"bits": 4, "group_size": 128, "sym": True}, "pack-quantized int4 group 128 sym"),
    ("gptq", {"bits": 4, "group_size": 32, "sym": False}, "pack-quantized int4 group 32 asym"),
    ("rtn", {"bits": 8, "group_size": -1, "sym": True}, "pack-quantized int8 channel sym"),
    ("rtn", {"bits": 8, "group_size": -1, "sym": False}, "pack-quantized int8 channel asym"),
    ("rtn", {"bits": 3, "group_size": 64, "sym": False}, "pack-quantized int3 group 64 asym"),
]


def test_the_default_8_bit_output_layer_is_a_second_group(tiny, tmp_path):
    """The converter's default output layer (8-bit, symmetric, per channel) exports as its own config group, exact."""
    folder = tmp_path / "q"
    convert(tiny, folder, "rtn", params={"bits": 4, "group_size": 32, "sym": True}, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizedWarning)
        report = CompressedTensorsExporter().export(folder, tmp_path / "ct")
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds["lm_head.weight"] == "pack-quantized int8 channel sym" and all(t.exact for t in report.tensors)
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["targets"] for g in groups.values() if g["weights"]["num_bits"] == 8] == [["lm_head"]]
    assert assert_same_as_folder(decompressed(tmp_path / "ct"), folder) == 15


@pytest.mark.parametrize(("method", "params", "kind"), CASES, ids=[f"{m}-{k.split(' ', 1)[1]}" for m, _, k in CASES])
def test_exports_and_decompresses_identically(tiny, tmp_path, method, params, kind):
    folder = quantized(tiny, tmp_path / "q", method, **params)
    out = tmp_path / "ct"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizedWarning)
        report = CompressedTensorsExporter().export(folder, out)
    records = [t for t in report.tensors if t.kind.startswith("pack-quantized")]
    assert len(records) == 14 and {t.kind for t in records} == {kind} and all(t.exact for t in report.tensors)
    assert assert_same_as_folder(decompressed(out), folder) == 14
    # the layout vLLM loads
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    import compressed_tensors

    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["version"] == compressed_tensors.__version__
    assert qc["ignore"] == ["lm_head"] and list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    bits, sym = params["bits"], params["sym"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (bits, "int", sym)
    assert weights["strategy"] == ("channel" if params["group_size"] < 0 else "group")
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    rows, cols = 256, 512
    groups = 1 if params["group_size"] < 0 else cols // params["group_size"]
    assert tensors[f"{name}.weight_packed"].dtype == np.int32
    assert tensors[f"{name}.weight_packed"].shape == (rows, math.ceil(cols * bits / 32))
    assert tensors[f"{name}.weight_scale"].dtype == np.float32
    assert tensors[f"{name}.weight_scale"].shape == (rows, groups)
    assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
    if sym:
        assert f"{name}.weight_zero_point" not in tensors
    else:
        assert tensors[f"{name}.weight_zero_point"].dtype == np.int32
        assert tensors[f"{name}.weight_zero_point"].shape == (math.ceil(rows * bits / 32), groups)
    assert (out / "tokenizer.json").is_file() and "lm_head.weight" in tensors


def test_transformers_loads_and_decompresses_the_export(tiny, tmp_path):
    """The model path: transformers' compressed-tensors quantizer loads the folder and ModelCompressor decompresses it
    on the first forward; every weight equals the reference decode (symmetric: transformers 5.25 with
    compressed-tensors 0.20.1 cannot load asymmetric pack-quantized checkpoints, whose packed zero points its
    meta-device compression leaves unpacked)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = quantized(tiny, tmp_path / "q", "gptq", bits=4, group_size=128, sym=True)
    CompressedTensorsExporter().export(folder, tmp_path / "ct")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    ours = open_folder(folder)
    try:
        for name in ours.records:
            assert same_bits(state[name], ours.decode(name)), name
    finally:
        ours.close()


def test_imports_back_to_the_same_records(tiny, tmp_path):
    """The compressed-tensors importer reads the export back to records that decode identically."""
    from qformat.conversion.importing import import_checkpoint
    from qformat.plugins import get_plugins

    if "compressed-tensors" not in get_plugins().importers:
        pytest.fail("the compressed-tensors importer is not installed")
    folder = quantized(tiny, tmp_path / "q", "rtn", bits=4, group_size=32, sym=False)
    CompressedTensorsExporter().export(folder, tmp_path / "ct")
    import_checkpoint(tmp_path / "ct", tmp_path / "back")
    a, b = open_folder(folder), open_folder(tmp_path / "back")
    try:
        assert set(a.records) == set(b.records)
        for name in a.records:
            assert same_bits(b.decode(name), a.decode(name)), name
    finally:
        a.close()
        b.close()


def test_trees_it_cannot_express_are_listed_then_requantized(tiny, tmp_path, capsys):
    """nf4's ``scale(lut(...))`` has no compressed-tensors int layout: every tensor is listed with its tree and nothing
    is written; --allow-requant uses compressed-tensors' W4A16 preset and warns with each relative error."""
    folder = quantized(tiny, tmp_path / "nf4", "nf4")
    out = tmp_path / "ct"
    with pytest.raises(InexpressibleError) as info:
        CompressedTensorsExporter().export(folder, out)
    assert len(info.value.tensors) == 14
    assert all("lut" in t.signature and "not an affine" in t.reason for t in info.value.tensors)
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["export", "--to", "compressed-tensors", str(folder), str(out)]) == 1
    assert "cannot be expressed exactly in compressed-tensors" in capsys.readouterr().err
    with pytest.warns(RequantizedWarning, match="relative error"):
        report = CompressedTensorsExporter().export(folder, out, allow_requant=True)
    assert len(report.requantized) == 14
    assert {t.kind for t in report.requantized} == {"pack-quantized int4 group 128 sym"}
    assert all(0 < t.relative_error < 0.2 for t in report.requantized)
    values = decompressed(out)
    assert values["model.layers.0.mlp.up_proj.weight"].shape == (512, 256)


def test_activation_order_is_listed(tiny, tmp_path):
    """gptq act_order with groups stores permute(affine(...)): compressed-tensors 0.20.1's decompress ignores
    weight_g_idx, so the permutation has no exact layout."""
    folder = quantized(tiny, tmp_path / "ao", "gptq", bits=4, group_size=32, act_order=True)
    with pytest.raises(InexpressibleError) as info:
        CompressedTensorsExporter().export(folder, tmp_path / "ct")
    assert all(t.signature.startswith("permute(") for t in info.value.tensors) and len(info.value.tensors) == 14


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_matches_the_library(bits, rng):
    """``pack_rows`` is compressed-tensors' ``pack_to_int32`` (the installed, dense layout), along both dims."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = rng.integers(0, 1 << bits, size=(37, 75)).astype(np.uint8)
    signed = torch.from_numpy(codes.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    assert np.array_equal(ct.pack_rows(codes, bits, "stream"), pack_to_int32(signed, bits).numpy())
    assert np.array_equal(ct.pack_rows(np.ascontiguousarray(codes.T), bits, "stream").T,
                          pack_to_int32(signed, bits, packed_dim=0).numpy())
    padded = ct.pack_rows(codes, bits, "padded")  # compressed-tensors before 0.18: 32 // bits codes per word
    per = 32 // bits
    words = padded.view(np.uint32)
    assert words.shape == (37, -(-75 // per))
    back = ((words[:, :, None] >> (np.arange(per, dtype=np.uint32) * bits)) & ((1 << bits) - 1)).reshape(37, -1)
    assert np.array_equal(back[:, :75], codes)
    assert np.array_equal(bitpack.pack_codes(codes, bits)[:, :1], ct.pack_rows(codes, bits, "stream").view(
        np.uint8)[:, :1])


def test_listed_by_qformat_plugins(capsys):
    assert main(["plugins"]) == 0
    assert "exporter compressed-tensors (qformat export --to compressed-tensors DIR OUT)" in capsys.readouterr().out


def test_the_check_catches_what_the_library_reads_differently(tiny, tmp_path, monkeypatch):
    """An fp16 weight_scale makes compressed-tensors compute (x - zp)·scale in fp16, rounding every product: the
    decompression check refuses the export and nothing is written."""
    from qformat.errors import SourceError

    folder = quantized(tiny, tmp_path / "q", "rtn", bits=4, group_size=32, sym=True)
    build = ct.build

    def fp16_scales(*args, **kwargs):
        module = build(*args, **kwargs)
        module.tensors["weight_scale"] = module.tensors["weight_scale"].astype(np.float16)
        return module

    monkeypatch.setattr(ct, "build", fp16_scales)
    with pytest.raises(SourceError, match="decompresses this module differently") as info:
        CompressedTensorsExporter().export(folder, tmp_path / "ct")
    assert info.value.tensor.endswith(".weight")
    assert not (tmp_path / "ct").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
