"""compressed-tensors checkpoints import bit-exactly (plugins/import_compressed_tensors.py).

Reference: the real compressed-tensors 0.20.1 (installed ``--no-deps``, see .ci/run). Every checkpoint is written by
the library itself, as llm-compressor saves one: a tiny bf16 Llama (hidden 128, 2 layers, vocab 128) gets the scheme
through ``apply_quantization_config``, its weight scales from ``compute_dynamic_scales_and_zp`` (``calculate_qparams``
on row minima/maxima for the channel strategy; NVFP4's global scale from ``generate_gparam``), then ``ModelCompressor.from_pretrained_model`` / ``compress_model`` / ``save_pretrained`` /
``update_config`` write the folder (config.json with the library's quantization_config, safetensors with
``weight_packed``/``weight_scale``/...). The reference dequantization of each module is the library's own compressor
``decompress`` (the format's class from ``BaseCompressor``'s registry) on the stored tensors, which returns the
weight in the scale's dtype (bf16). Our decode is fp32: it must equal, bit for bit, the library's same computation in
fp32 (``decompress`` with the scale converted to fp32; for NVFP4/MXFP4, whose ``decompress`` fixes bf16, the same
library pieces it calls, ``unpack_fp4_from_uint8``, ``decompress_mx_scale`` and ``dequantize``, with fp32 dtypes), and
rounded to bf16 it must equal ``decompress``'s own bf16 output.

The padded int32 packing of compressed-tensors before 0.18 (3-bit here) is not in 0.20.1: those checkpoints are the
0.20.1 ones with ``weight_packed``/``weight_zero_point`` repacked by ``pack_to_int32`` as published in 0.17.1
(``src/compressed_tensors/compressors/pack_quantized/helpers.py``, re-implemented below) and ``version: 0.17.1``;
they hold the same integers, so the real library's dequantization of the 0.20.1 checkpoint is their reference.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.quant_scheme import MXFP4A16, MXFP8A16, NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp, generate_gparam
from qformat_plugins.import_compressed_tensors import CompressedTensorsImporter
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qformat.errors import SourceError
from qformat.testing import check_import

CONFIG = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
PARTS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape",
         "weight_g_idx")


def args(**kw) -> QuantizationArgs:
    return QuantizationArgs(**kw)


def int_args(bits: int, strategy: str, symmetric: bool, group_size: int | None = None) -> QuantizationArgs:
    return args(num_bits=bits, type="int", strategy=strategy, symmetric=symmetric, group_size=group_size)


FP8_CHANNEL = args(num_bits=8, type="float", strategy="channel", symmetric=True)
FP8_TENSOR = args(num_bits=8, type="float", strategy="tensor", symmetric=True)
DYNAMIC_FP8 = args(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
DYNAMIC_INT8 = args(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)

# name -> config groups: {group: (targets, weight args, input activation args)}
SCHEMES = {
    "int4_g128_asym": {"group_0": (["Linear"], int_args(4, "group", False, 128), None)},
    "int8_channel_sym": {"group_0": (["Linear"], int_args(8, "channel", True), None)},
    "int3_g64_asym": {"group_0": (["Linear"], int_args(3, "group", False, 64), None)},
    "int5_channel_asym": {"group_0": (["Linear"], int_args(5, "channel", False), None)},
    "nvfp4": {"group_0": (["Linear"], NVFP4A16["weights"], None)},
    "mxfp4": {"group_0": (["Linear"], MXFP4A16["weights"], None)},
    "mxfp8": {"group_0": (["Linear"], MXFP8A16["weights"], None)},
    "fp8_channel": {"group_0": (["Linear"], FP8_CHANNEL, DYNAMIC_FP8)},  # FP8_DYNAMIC: float-quantized
    "fp8_tensor": {"group_0": (["Linear"], FP8_TENSOR, None)},  # weight-only FP8: naive-quantized
    "int8_w8a8": {"group_0": (["Linear"], int_args(8, "channel", True), DYNAMIC_INT8)},  # int-quantized
    "mixed": {"attention": (["re:.*self_attn.*"], int_args(4, "group", False, 64), None),
              "mlp": (["re:.*mlp.*"], FP8_CHANNEL, DYNAMIC_FP8)},
}
FORMATS = {"int4_g128_asym": "pack-quantized", "int8_channel_sym": "pack-quantized", "int3_g64_asym": "pack-quantized",
           "int5_channel_asym": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized",
           "mxfp8": "mxfp8-quantized", "fp8_channel": "float-quantized", "fp8_tensor": "naive-quantized",
           "int8_w8a8": "int-quantized", "mixed": "mixed-precision"}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16).eval()


def ct_checkpoint(folder: Path, scheme: str, seed: int = 0) -> tuple[Path, dict[str, QuantizationScheme]]:
    """A checkpoint as llm-compressor writes it; returns the folder and each quantized module's scheme."""
    model = tiny_llama(seed)
    groups = {name: QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)
              for name, (targets, weights, inputs) in SCHEMES[scheme].items()}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"]), show_progress=False)
    schemes = {}
    for name, module in model.named_modules():
        qscheme = getattr(module, "quantization_scheme", None)
        if qscheme is None or qscheme.weights is None:
            continue
        w = module.weight.data
        gscale = None
        if qscheme.weights.strategy == "tensor_group":
            gscale = generate_gparam(w.amin(), w.amax())
            module.weight_global_scale.data.copy_(gscale)
        if qscheme.weights.strategy == "channel":  # min/max per row, as llm-compressor's observer reduces them
            scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), qscheme.weights)
        else:
            scale, zero = compute_dynamic_scales_and_zp(w, qscheme.weights, module, global_scale=gscale)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        module.quantization_status = QuantizationStatus.FROZEN
        schemes[name] = qscheme
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder, schemes


def module_tensors(stored: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    return {p: stored[f"{module}.{p}"] for p in PARTS if f"{module}.{p}" in stored}


def library_dequant(fmt: str, state: dict[str, torch.Tensor], scheme: QuantizationScheme):
    """(fp32, native) [out, in]: the library's decompress, and its computation in fp32."""
    compressor = BaseCompressor.get_value_from_registry(fmt)
    native = compressor.decompress(dict(state), scheme)["weight"]
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        packed = state["weight_packed"]
        values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        scale = state["weight_scale"]
        scale = scale.to(torch.float32) if fmt.startswith("nvfp4") else decompress_mx_scale(scale).to(torch.float32)
        full = dequantize(x_q=values, scale=scale, args=scheme.weights, global_scale=state.get("weight_global_scale"),
                          dtype=torch.float32)
    else:
        scale = state["weight_scale"]
        scale = decompress_mx_scale(scale) if fmt == "mxfp8-quantized" else scale
        fp32 = {**state, "weight_scale": scale.to(torch.float32)}
        base = BaseCompressor.get_value_from_registry("naive-quantized") if fmt == "mxfp8-quantized" else compressor
        full = base.decompress(fp32, scheme)["weight"]
    assert full.dtype == torch.float32
    return full, native


def references(folder: Path, schemes: dict[str, QuantizationScheme]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    stored = load_file(str(folder / "model.safetensors"))
    refs = {}
    for module, scheme in schemes.items():
        fmt = scheme.format or config["format"]
        refs[f"{module}.weight"] = library_dequant(fmt, module_tensors(stored, module), scheme)
    return refs


def assert_exact(folder: Path, refs: dict):
    stored = load_file(str(folder / "model.safetensors"))

    def reference(name: str):
        return refs[name][0].numpy() if name in refs else stored[name].float().numpy()

    importer = CompressedTensorsImporter()
    report = check_import(importer, folder, reference)
    assert report.exact == report.records == len(refs)
    for name, value in importer.open(folder).iter_tensors():
        if name in refs:
            full, native = refs[name]
            decoded = torch.from_numpy(value.decode())
            assert torch.equal(decoded.view(torch.int32), full.view(torch.int32)), name
            assert torch.equal(decoded.to(native.dtype).view(torch.int16), native.view(torch.int16)), name
    return report


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_bit_exact_against_compressed_tensors(tmp_path: Path, scheme: str) -> None:
    folder, schemes = ct_checkpoint(tmp_path / "src", scheme)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == FORMATS[scheme] and qc["version"] == "0.20.1"
    assert CompressedTensorsImporter().detect(folder)
    refs = references(folder, schemes)
    assert len(refs) == 14
    report = assert_exact(folder, refs)
    imported = CompressedTensorsImporter().open(folder)
    assert imported.source_format.startswith("compressed-tensors 0.20.1 ")
    assert "quantization_config" not in imported.config and report.source_bits == imported.source_bits
    print(f"{scheme}: {imported.source_format}: source {imported.source_bits:.3f} bits/weight, imported "
          f"{report.bits_per_weight:.3f}")


# -- the int32 packing before 0.18 -----------------------------------------------------------------------------------

def pack_to_int32_0_17(value: torch.Tensor, num_bits: int, packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors 0.17.1 ``pack_to_int32``: ``32 // num_bits`` values per int32, high bits unused."""
    offset = 1 << (num_bits - 1)
    value = (value + offset).to(torch.uint8)
    pack_factor = 32 // num_bits
    if packed_dim == 0:
        value = value.transpose(0, 1)
    rows, cols = value.shape
    padded_cols = math.ceil(cols / pack_factor) * pack_factor
    if padded_cols > cols:
        value = torch.nn.functional.pad(value, (0, padded_cols - cols))
    reshaped = value.view(rows, padded_cols // pack_factor, pack_factor).to(torch.int32)
    bit_shifts = torch.arange(pack_factor, dtype=torch.int32) * num_bits
    packed = (reshaped << bit_shifts).sum(dim=2, dtype=torch.int32)
    return packed.transpose(0, 1) if packed_dim == 0 else packed


def as_0_17(source: Path, target: Path, bits: int) -> Path:
    """The same integers as a 0.17.1 writer packs them."""
    shutil.copytree(source, target)
    stored = load_file(str(source / "model.safetensors"))
    for name in [n for n in stored if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        shape = stored[f"{module}.weight_shape"]
        stored[name] = pack_to_int32_0_17(unpack_from_int32(stored[name], bits, shape), bits)
        if f"{module}.weight_zero_point" in stored:
            zp_shape = (int(shape[0]), stored[f"{module}.weight_scale"].shape[1])
            zp = unpack_from_int32(stored[f"{module}.weight_zero_point"], bits, zp_shape, packed_dim=0)
            stored[f"{module}.weight_zero_point"] = pack_to_int32_0_17(zp, bits, packed_dim=0).contiguous()
    save_file(stored, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["version"] = "0.17.1"
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(("scheme", "bits"), [("int3_g64_asym", 3), ("int5_channel_asym", 5), ("int4_g128_asym", 4)])
def test_the_packing_before_0_18_by_the_version_in_the_config(tmp_path: Path, scheme: str, bits: int) -> None:
    folder, schemes = ct_checkpoint(tmp_path / "new", scheme)
    refs = references(folder, schemes)
    old = as_0_17(folder, tmp_path / "old", bits)
    stored_old = load_file(str(old / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    changed = not torch.equal(stored_old[f"{name}.weight_packed"],
                              load_file(str(folder / "model.safetensors"))[f"{name}.weight_packed"])
    assert changed == (bits not in (1, 2, 4, 8))  # power-of-2 widths: the same bits in both packings
    assert_exact(old, refs)
    if changed:  # 0.20.1 reads every checkpoint densely, so it misreads this one
        misread, _ = library_dequant("pack-quantized", module_tensors(stored_old, name), schemes[name])
        assert not torch.equal(misread, refs[f"{name}.weight"][0])
        # with the version taken away, the word counts tell the padded layout apart (256 columns of 3 bits: 26 words, not 24)
        config = json.loads((old / "config.json").read_text())
        del config["quantization_config"]["version"]
        (old / "config.json").write_text(json.dumps(config))
        assert_exact(old, refs)


def test_a_version_that_contradicts_the_packing_names_the_tensor(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "int3_g64_asym")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["version"] = "0.17.0"
    (folder / "config.json").write_text(json.dumps(config))
    imported = CompressedTensorsImporter().open(folder)
    with pytest.raises(SourceError, match=r"has 24 int32 words per row where 256 3-bit codes in the padded packing of "
                                          r"compressed-tensors 0.17.0 need 26 .*tensor 'model.layers.0.mlp.down_proj."
                                          r"weight_packed', field 'shape'"):
        dict(imported.iter_tensors())


# -- what the importer says, and what it refuses --------------------------------------------------------------------

def set_qconfig(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_and_unsupported_formats_are_named(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "int8_channel_sym")
    set_qconfig(folder, lambda qc: qc.update(format="int4-magic"))
    with pytest.raises(SourceError, match=r"unknown compressed-tensors format 'int4-magic' \(known formats: dense, "
                                          r".*pack-quantized.*\).*field 'format'"):
        CompressedTensorsImporter().open(folder)
    set_qconfig(folder, lambda qc: qc.update(format="sparse-24-bitmask"))
    with pytest.raises(SourceError, match=r"format 'sparse-24-bitmask' is not supported by this importer \(supported: "
                                          r"dense, pack-quantized"):
        CompressedTensorsImporter().open(folder)


def test_a_group_size_that_disagrees_with_the_scales(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "int4_g128_asym")
    set_qconfig(folder, lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=64))
    imported = CompressedTensorsImporter().open(folder)
    with pytest.raises(SourceError, match=r"weight_scale is \[128, 2\] where the group strategy over a \[128, 256\] "
                                          r"weight implies \[128, 4\].*tensor 'model.layers.0.mlp.down_proj."
                                          r"weight_scale', field 'shape'"):
        dict(imported.iter_tensors())


def test_a_weight_shape_that_disagrees_with_the_model_config(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "nvfp4")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"a \[128, 256\] weight where config.json implies \[96, 256\].*field "
                                          r"'shape'"):
        CompressedTensorsImporter().open(folder)


def test_a_truncated_shard_names_the_file(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "fp8_channel")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(SourceError, match=r"\[truncated\].*file '.*model.safetensors'"):
        CompressedTensorsImporter().open(folder)


def test_unquantized_or_transformed_checkpoints_are_refused(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "int8_channel_sym")
    set_qconfig(folder, lambda qc: qc.update(quantization_status="frozen"))
    with pytest.raises(SourceError, match=r"quantization_status 'frozen'.*field 'quantization_status'"):
        CompressedTensorsImporter().open(folder)
    set_qconfig(folder, lambda qc: qc.update(quantization_status="compressed", transform_config={"hadamard": {}}))
    with pytest.raises(SourceError, match=r"transform_config"):
        CompressedTensorsImporter().open(folder)


def test_activation_parameters_are_left_out_and_counted(tmp_path: Path) -> None:
    folder, _ = ct_checkpoint(tmp_path / "src", "fp8_channel")
    stored = load_file(str(folder / "model.safetensors"))
    stored["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(1, dtype=torch.bfloat16)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    imported = CompressedTensorsImporter().open(folder)
    names = [name for name, _ in imported.iter_tensors()]
    assert not any(n.endswith("input_scale") for n in names)
    assert imported.details["activation_parameters_dropped"] == 1


# -- end to end ----------------------------------------------------------------------------------------------------

def test_import_checkpoint_runs_like_the_library_dequantized_model(tmp_path: Path) -> None:
    import qformat
    from qformat.conversion.importing import import_checkpoint

    card = "---\nbase_model: org/tiny-llama\n---\n"
    folder, schemes = ct_checkpoint(tmp_path / "src", "nvfp4")
    (folder / "README.md").write_text(card)
    refs = references(folder, schemes)
    result = import_checkpoint(folder, tmp_path / "out")
    assert result.importer == "compressed-tensors" and result.records == 14
    assert "base_model: org/tiny-llama" in (tmp_path / "out" / "README.md").read_text()
    dense = tiny_llama()
    with torch.no_grad():
        for name, (_, native) in refs.items():
            dense.get_submodule(name.removesuffix(".weight")).weight.copy_(native)
    loaded = qformat.load(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = loaded(ids).logits.float(), dense.float()(ids).logits
    assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item())
