"""GPTQ and AWQ checkpoints import bit-exactly (plugins/import_gptq.py).

References, all run on the CPU:

- **GPTQ v1** (``checkpoint_format: gptq``): the real AutoGPTQ 0.7.1 (``pip install --no-deps auto-gptq==0.7.1``; its
  CUDA extensions are not loaded, the module falls back to torch). ``QuantLinear.pack`` of
  ``auto_gptq/nn_modules/qlinear/qlinear_cuda.py`` writes each checkpoint's ``qweight``/``qzeros``/``scales``/``g_idx``
  (2, 3, 4 and 8 bits, its own 3-bit word layout, zero − 1, act-order ``g_idx``), and the same module's torch
  ``forward`` on an identity input is the reference dequantization: ``scales[g_idx] * (weight − zeros[g_idx])`` with
  ``zeros = unpacked + 1``. That runs in fp16 (the scales' dtype); the fp32 reference is the same forward with the
  module's scales converted to fp32 and an fp32 identity (the same formula evaluated in fp32). Our fp32 decode must
  equal the fp32 reference bit for bit, and rounded to fp16 it must equal the fp16 result (every ``(q − z) · s`` is
  exact in fp32, so the two roundings agree).
- **GPTQ v2** (``gptq_v2``): GPTQModel (7.7.0) does not install without its CUDA build and heavy dependencies, so its
  safetensors dequantizer is re-implemented here from the published code: ``gptqmodel/utils/model_dequant.py``
  ``_shift_gptq_qzeros`` (v1 -> v2 zeros: unpack, +1 per field, mask, repack) and ``convert_gptq_file``
  (``(unpack_rows(qweight) − unpack_cols(qzeros)[g_idx]) · scales[g_idx]`` in fp32, its 3-bit ``_unpack_rows_3bit``
  word layout included). v2 checkpoints are AutoGPTQ's v1 tensors with the zeros converted that way, so the real
  AutoGPTQ dequantization of the v1 tensors is a second reference for them.
- **AWQ** (GEMM): the real AutoAWQ 0.2.9 (``pip install --no-deps autoawq==0.2.9``; its package ``__init__`` needs
  ``datasets``, so the two modules used are loaded from the installed files without it): ``WQLinear_GEMM.from_linear``
  packs (AWQ_ORDER interleave), ``awq.utils.packing_utils.dequantize_gemm`` dequantizes (fp16; fp32 with fp32 scales).

Checkpoints: a tiny Llama (hidden 64, 2 layers, vocab 128) quantized with min-max groups (zeros kept >= 1 so that
AutoGPTQ's v1 packer, which ORs a -1 into the word, is not exercised by accident; a dedicated test sets a stored zero
to 2^b − 1 and checks the AutoGPTQ reading 2^b).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_plugins.import_gptq import AWQImporter, GPTQImporter
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from qformat.errors import SourceError
from qformat.testing import check_import

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, torch_dtype="float16")


# -- the reference libraries -------------------------------------------------------------------------------------

def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def autogptq() -> types.ModuleType:
    """AutoGPTQ's ``qlinear_cuda`` module (its package __init__ imports optimum and peft; this file needs neither)."""
    spec = importlib.util.find_spec("auto_gptq")
    assert spec is not None, "the reference needs: pip install --no-deps auto-gptq==0.7.1"
    root = Path(spec.origin).parent
    return _load_file("ref_autogptq_qlinear_cuda", root / "nn_modules" / "qlinear" / "qlinear_cuda.py")


def autoawq() -> types.ModuleType:
    """AutoAWQ's ``awq`` package without running its __init__ (which imports ``datasets``)."""
    if "awq" not in sys.modules or not hasattr(sys.modules["awq"], "__path__"):
        spec = importlib.util.find_spec("awq")
        assert spec is not None, "the reference needs: pip install --no-deps autoawq==0.2.9"
        package = types.ModuleType("awq")
        package.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["awq"] = package
    import awq.modules.linear.gemm as gemm  # noqa: F401  (WQLinear_GEMM.from_linear: the packer)
    import awq.utils.packing_utils as packing  # dequantize_gemm

    return types.SimpleNamespace(gemm=gemm, packing=packing)


# GPTQModel 7.7.0 gptqmodel/utils/model_dequant.py, re-implemented (unpack_cols/unpack_rows/_unpack_*_3bit,
# pack_cols/_pack_cols_3bit, _shift_gptq_qzeros, the formula of convert_gptq_file).

def _gm_unpack_3bit_words(word0, word1, word2):
    out = []
    for idx in range(10):
        out.append((word0 >> (3 * idx)) & 0x7)
    out.append(((word0 >> 30) & 0x3) | (((word1 >> 0) << 2) & 0x4))
    for idx in range(10):
        out.append((word1 >> (1 + 3 * idx)) & 0x7)
    out.append(((word1 >> 31) & 0x1) | (((word2 >> 0) << 1) & 0x6))
    for idx in range(10):
        out.append((word2 >> (2 + 3 * idx)) & 0x7)
    return out


def gm_unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = packed.shape
    if bits == 3:
        words = packed.to(torch.int64).reshape(rows, cols // 3, 3)
        values = _gm_unpack_3bit_words(words[:, :, 0], words[:, :, 1], words[:, :, 2])
        return torch.stack(values, dim=2).reshape(rows, -1).to(torch.int32)
    pack_factor = 32 // bits
    packed_uint = packed.to(torch.int64) & ((1 << 32) - 1)
    result = torch.empty(rows, cols * pack_factor, dtype=torch.int32)
    for i in range(pack_factor):
        result[:, i::pack_factor] = ((packed_uint >> (i * bits)) & ((1 << bits) - 1)).to(torch.int32)
    return result


def gm_unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = packed.shape
    if bits == 3:
        words = packed.to(torch.int64).reshape(rows // 3, 3, cols)
        values = _gm_unpack_3bit_words(words[:, 0, :], words[:, 1, :], words[:, 2, :])
        return torch.stack(values, dim=1).reshape(-1, cols).to(torch.int32)
    pack_factor = 32 // bits
    packed_uint = packed.to(torch.int64) & ((1 << 32) - 1)
    result = torch.empty(rows * pack_factor, cols, dtype=torch.int32)
    for i in range(pack_factor):
        result[i::pack_factor, :] = ((packed_uint >> (i * bits)) & ((1 << bits) - 1)).to(torch.int32)
    return result


def gm_pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = values.shape
    v = values.to(torch.int64) & ((1 << bits) - 1)
    if bits == 3:
        v = v.reshape(rows, cols // 32, 32)
        word0 = torch.zeros(v.shape[:2], dtype=torch.int64)
        for idx in range(10):
            word0 |= v[:, :, idx] << (3 * idx)
        word0 |= v[:, :, 10] << 30
        word1 = (v[:, :, 10] >> 2) & 0x1
        for idx in range(10):
            word1 |= v[:, :, 11 + idx] << (1 + 3 * idx)
        word1 |= v[:, :, 21] << 31
        word2 = (v[:, :, 21] >> 1) & 0x3
        for idx in range(10):
            word2 |= v[:, :, 22 + idx] << (2 + 3 * idx)
        packed = torch.stack((word0, word1, word2), dim=2).reshape(rows, -1)
    else:
        pack_factor = 32 // bits
        packed = torch.zeros(rows, cols // pack_factor, dtype=torch.int64)
        for i in range(pack_factor):
            packed |= v[:, i::pack_factor] << (i * bits)
    return (packed & ((1 << 32) - 1)).to(torch.int64).to(torch.int32)


def gm_v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``_shift_gptq_qzeros(qzeros, bits, delta=1)``."""
    return gm_pack_cols((gm_unpack_cols(qzeros, bits) + 1) & ((1 << bits) - 1), bits)


def gm_dequant_v2(qweight, qzeros, scales, g_idx, bits) -> torch.Tensor:
    """``convert_gptq_file`` for a v2 checkpoint: fp32 [in, out]."""
    g = g_idx.to(torch.long)
    weight_int = gm_unpack_rows(qweight, bits)
    zeros = gm_unpack_cols(qzeros, bits)
    return (weight_int.to(torch.float32) - zeros.to(torch.float32)[g]) * scales.to(torch.float32)[g]


# -- synthetic checkpoints -----------------------------------------------------------------------------------------

def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides})).to(torch.float16).eval()


def linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def minmax_groups(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool):
    """Per (row, group) fp16-exact scales and integer zeros (kept in [1, maxq]) and the codes they give."""
    maxq = (1 << bits) - 1
    out, cols = w.shape
    order = torch.argsort(g_idx, stable=True)
    tiles = w[:, order].reshape(out, groups, cols // groups)  # every group has cols // groups columns here
    if sym:
        scales = (2 * tiles.abs().amax(2).clamp(min=1e-4) / maxq).half().float()
        zeros = torch.full((out, groups), float((maxq + 1) // 2))
    else:
        low, high = tiles.amin(2).clamp(max=-1e-4), tiles.amax(2).clamp(min=1e-4)
        scales = ((high - low) / maxq).half().float()
        zeros = torch.round(-low / scales).clamp(1, maxq)
    q = torch.clamp(torch.round(w / scales[:, g_idx.long()]) + zeros[:, g_idx.long()], 0, maxq)
    return scales, zeros, q


def write_folder(folder: Path, model, tensors: dict[str, torch.Tensor], quantized: list[str], qconfig: dict,
                 card: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not any(k == f"{m}.weight" for m in quantized)}
    save_file({**state, **tensors}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string())
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def gptq_checkpoint(folder: Path, bits: int, group: int, *, sym: bool, actorder: bool, fmt: str = "gptq",
                    seed: int = 0, card: str | None = None, dynamic: dict | None = None):
    """An AutoGPTQ-packed checkpoint (v1; v2 converts the zeros as GPTQModel does) and its references:
    name -> (fp32 [out, in], fp16 [out, in]) from AutoGPTQ's own dequantization of the v1 tensors. ``dynamic``:
    GPTQModel's per-module overrides, {pattern: {"bits": b}}, applied with re.match as it does."""
    ref = autogptq()
    model = tiny_llama(seed)
    names = linears(model)
    tensors, refs = {}, {}
    generator = torch.Generator().manual_seed(seed + 1)
    base_bits = bits
    for name in names:
        bits = next((o["bits"] for p, o in (dynamic or {}).items() if re.match(p.removeprefix("+:"), name)),
                    base_bits)
        linear = model.get_submodule(name)
        w = linear.weight.detach().float()
        out, cols = w.shape
        g = cols if group <= 0 else group
        groups = math.ceil(cols / g)
        perm = torch.randperm(cols, generator=generator) if actorder else torch.arange(cols)
        g_idx = torch.empty(cols, dtype=torch.int32)
        g_idx[perm] = (torch.arange(cols) // g).to(torch.int32)  # GPTQ: g_idx[perm[j]] = j // group
        scales, zeros, q = minmax_groups(w, g_idx, groups, bits, sym)
        dense = torch.nn.Linear(cols, out, bias=False).half()
        dense.weight.data = (scales[:, g_idx.long()] * (q - zeros[:, g_idx.long()])).half()
        qlinear = ref.QuantLinear(bits, g, cols, out, bias=False, weight_dtype=torch.float16)
        qlinear.pack(dense, scales, zeros, g_idx)
        qzeros = qlinear.qzeros if fmt == "gptq" else gm_v1_to_v2_qzeros(qlinear.qzeros, bits)
        tensors.update({f"{name}.qweight": qlinear.qweight, f"{name}.qzeros": qzeros,
                        f"{name}.scales": qlinear.scales, f"{name}.g_idx": qlinear.g_idx})
        refs[f"{name}.weight"] = autogptq_dequant(qlinear)
    qconfig = {"quant_method": "gptq", "bits": base_bits, "group_size": group, "desc_act": actorder, "sym": sym,
               "checkpoint_format": fmt, "damp_percent": 0.01, "static_groups": False, "true_sequential": True}
    if dynamic:
        qconfig["dynamic"] = dynamic
    return write_folder(folder, model, tensors, names, qconfig, card), refs, model


def autogptq_dequant(qlinear) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's torch forward on an identity: fp16 as it runs, and with fp32 scales (fp32 [out, in] each)."""
    with torch.no_grad():
        half = qlinear(torch.eye(qlinear.infeatures, dtype=torch.float16)).T.contiguous()
        scales = qlinear.scales
        qlinear.scales = scales.float()
        full = qlinear(torch.eye(qlinear.infeatures, dtype=torch.float32)).T.contiguous()
        qlinear.scales = scales
    return full, half


def awq_checkpoint(folder: Path, group: int, seed: int = 0):
    ref = autoawq()
    model = tiny_llama(seed, hidden_size=128, intermediate_size=256)  # groups of 128 need 128 input columns
    names = linears(model)
    tensors, refs = {}, {}
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        out, cols = w.shape
        g_idx = (torch.arange(cols) // group).to(torch.int32)
        scales, zeros, q = minmax_groups(w, g_idx, cols // group, 4, sym=False)
        dense = torch.nn.Linear(cols, out, bias=False).half()
        dense.weight.data = (scales[:, g_idx.long()] * (q - zeros[:, g_idx.long()])).half()
        awq = ref.gemm.WQLinear_GEMM.from_linear(dense, 4, group, scales=scales.T.contiguous(),
                                                 zeros=zeros.T.contiguous())
        tensors.update({f"{name}.qweight": awq.qweight, f"{name}.qzeros": awq.qzeros, f"{name}.scales": awq.scales})
        with torch.no_grad():
            half = ref.packing.dequantize_gemm(awq.qweight, awq.qzeros, awq.scales, 4, group)
            full = ref.packing.dequantize_gemm(awq.qweight, awq.qzeros, awq.scales.float(), 4, group)
        refs[f"{name}.weight"] = (full.T.contiguous(), half.T.contiguous())
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
               "modules_to_not_convert": None}
    return write_folder(folder, model, tensors, names, qconfig), refs, model


def reference_of(refs: dict, model):
    """check_import's reference: records against the fp32 reference, plain tensors against their stored values."""
    state = model.state_dict()

    def reference(name: str):
        if name in refs:
            return refs[name][0].numpy()
        return state[name].float().numpy()

    return reference


def assert_exact(importer, folder: Path, refs: dict, model) -> object:
    report = check_import(importer, folder, reference_of(refs, model))
    assert report.exact == len(refs) == report.records
    imported = importer.open(folder)
    for name, value in imported.iter_tensors():
        if name in refs:
            decoded = value.decode()
            full, half = refs[name]
            assert np.array_equal(decoded.view(np.uint32), full.numpy().view(np.uint32)), name
            assert np.array_equal(decoded.astype(np.float16).view(np.uint16), half.half().numpy().view(np.uint16))
    return report


# -- GPTQ ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bits", "sym", "actorder", "group"), [
    (2, False, True, 32), (3, False, True, 32), (3, True, False, 64), (4, True, True, 32), (4, False, False, 32),
    (8, False, True, 64), (8, True, False, -1), (2, True, False, 32)])
def test_gptq_v1_is_bit_exact_against_autogptq(tmp_path: Path, bits: int, sym: bool, actorder: bool,
                                                group: int) -> None:
    folder, refs, model = gptq_checkpoint(tmp_path / "src", bits, group, sym=sym, actorder=actorder)
    assert GPTQImporter().detect(folder) and not AWQImporter().detect(folder)
    report = assert_exact(GPTQImporter(), folder, refs, model)
    imported = GPTQImporter().open(folder)
    record = dict(imported.iter_tensors())["model.layers.0.mlp.down_proj.weight"].record["weight"]
    assert record["codec"] == ("permute" if actorder else "affine")
    affine = record["input"] if actorder else record
    assert affine["codes"]["bits"] == bits and affine["group_shape"] == [1, 128 if group <= 0 else group]
    assert (affine["zero"] == 2.0 ** (bits - 1)) if sym else affine["zero"]["bits"] == bits
    # bits per weight: the source's qweight + qzeros + scales + g_idx, and the records' bytes
    assert report.source_bits == pytest.approx(imported.source_bits)
    assert imported.source_format.startswith(f"gptq v1 {bits}-bit")


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_v2_is_bit_exact_against_gptqmodel_and_autogptq(tmp_path: Path, bits: int) -> None:
    folder, refs, model = gptq_checkpoint(tmp_path / "src", bits, 32, sym=False, actorder=True, fmt="gptq_v2")
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    for name, (full, _) in refs.items():
        module = name.removesuffix(".weight")
        gm = gm_dequant_v2(stored[f"{module}.qweight"], stored[f"{module}.qzeros"], stored[f"{module}.scales"],
                           stored[f"{module}.g_idx"], bits).T
        assert torch.equal(gm.view(torch.int32), full.view(torch.int32)), name  # the two references agree
    assert_exact(GPTQImporter(), folder, refs, model)
    assert GPTQImporter().open(folder).source_format.startswith(f"gptq v2 {bits}-bit")


def autogptq_module(stored: dict, module: str, bits: int, group: int):
    """AutoGPTQ's QuantLinear holding a checkpoint's tensors, as its loader fills the buffers."""
    qweight = stored[f"{module}.qweight"]
    cols, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    qlinear = autogptq().QuantLinear(bits, group, cols, out, bias=False, weight_dtype=torch.float16)
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        setattr(qlinear, part, stored[f"{module}.{part}"])
    return qlinear


def rewrite(folder: Path, change) -> dict:
    """Apply ``change`` to the checkpoint's tensors (a dict of torch tensors) and save them back."""
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    change(stored)
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return stored


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_v1_stored_zero_of_all_ones_reads_as_two_to_the_bits(tmp_path: Path, bits: int) -> None:
    """AutoGPTQ reads a v1 zero as (stored & mask) + 1, so a stored 2^b - 1 is the zero 2^b (GPTQModel's safetensors
    dequantizer would mask it to 0: AutoGPTQ, which writes v1, is followed). The record keeps it in b + 1 bits."""
    folder, refs, model = gptq_checkpoint(tmp_path / "src", bits, 32, sym=False, actorder=True)
    module = "model.layers.1.mlp.up_proj"

    def overflow(stored: dict) -> None:
        stored[f"{module}.qzeros"][0, 0] = -1  # every field of the first word all ones

    stored = rewrite(folder, overflow)
    refs[f"{module}.weight"] = autogptq_dequant(autogptq_module(stored, module, bits, 32))
    assert_exact(GPTQImporter(), folder, refs, model)
    record = dict(GPTQImporter().open(folder).iter_tensors())[f"{module}.weight"].record["weight"]["input"]
    assert record["zero"]["bits"] == bits + 1


def test_gptq_groups_that_sorting_does_not_make_contiguous_get_a_per_column_grid(tmp_path: Path) -> None:
    folder, refs, model = gptq_checkpoint(tmp_path / "src", 4, 32, sym=False, actorder=True)
    module = "model.layers.0.self_attn.o_proj"

    def uneven(stored: dict) -> None:  # group 0 gets one more column than group 1
        g_idx = stored[f"{module}.g_idx"]
        g_idx[int(torch.nonzero(g_idx == 1)[0])] = 0

    stored = rewrite(folder, uneven)
    refs[f"{module}.weight"] = autogptq_dequant(autogptq_module(stored, module, 4, 32))
    assert_exact(GPTQImporter(), folder, refs, model)
    record = dict(GPTQImporter().open(folder).iter_tensors())[f"{module}.weight"].record
    assert record["weight"]["codec"] == "affine" and record["weight"]["group_shape"] == [1, 1]
    assert "per-column" in record["info"]["g_idx"]


def test_gptqmodel_dynamic_bits_per_module(tmp_path: Path) -> None:
    dynamic = {r"+:.*\.mlp\.down_proj": {"bits": 8}, r"-:.*lm_head": {}}
    folder, refs, model = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False, dynamic=dynamic)
    assert_exact(GPTQImporter(), folder, refs, model)
    records = dict(GPTQImporter().open(folder).iter_tensors())
    assert records["model.layers.0.mlp.down_proj.weight"].record["weight"]["bits"] == 8
    assert records["model.layers.0.mlp.up_proj.weight"].record["weight"]["bits"] == 4


# -- AWQ -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [128, 64])
def test_awq_gemm_is_bit_exact_against_autoawq(tmp_path: Path, group: int) -> None:
    folder, refs, model = awq_checkpoint(tmp_path / "src", group)
    assert AWQImporter().detect(folder) and not GPTQImporter().detect(folder)
    report = assert_exact(AWQImporter(), folder, refs, model)
    imported = AWQImporter().open(folder)
    record = dict(imported.iter_tensors())["model.layers.0.mlp.down_proj.weight"].record["weight"]
    assert record["codec"] == "affine" and record["group_shape"] == [1, group] and record["zero"]["bits"] == 4
    assert imported.source_format == f"awq gemm 4-bit g{group}" and report.source_bits == imported.source_bits


def test_awq_gemv_is_refused_naming_the_version(tmp_path: Path) -> None:
    folder, _, _ = awq_checkpoint(tmp_path / "src", 64)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"AWQ version 'gemv' is not supported \(supported: gemm.*field 'version'"):
        AWQImporter().open(folder)


# -- what the importer says about the source ------------------------------------------------------------------------

def test_config_files_and_lineage(tmp_path: Path) -> None:
    card = "---\nlicense: apache-2.0\nbase_model:\n- org/tiny-llama\ntags:\n- gptq\n---\n# A GPTQ model\n"
    folder, refs, model = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False, card=card)
    imported = GPTQImporter().open(folder)
    assert "quantization_config" not in imported.config and imported.config["hidden_size"] == 64
    assert imported.base_model == "org/tiny-llama"
    assert set(imported.files) == {"generation_config.json"}
    plain = dict(imported.iter_tensors())
    assert plain["model.norm.weight"].dtype == np.float16 and "model.layers.0.mlp.up_proj.qweight" not in plain
    # 4-bit codes + fp16 scale and packed zero per 32 + int32 g_idx per column
    expected = 4 + 16 / 32 + 4 / 32 + 32 * sum(m.in_features for m in map(model.get_submodule, linears(model))) / \
        sum(m.weight.numel() for m in map(model.get_submodule, linears(model)))
    assert imported.source_bits == pytest.approx(expected)


# -- damaged or inconsistent sources --------------------------------------------------------------------------------

def set_qconfig(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bits_that_disagree_with_the_shapes(tmp_path: Path) -> None:
    folder, _, _ = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False)
    set_qconfig(folder, bits=8)
    with pytest.raises(SourceError, match=r"qweight \[16, 64\] holds 64 input columns of 8 bits but g_idx has \[128\].*quantization_config.bits.*file '.*model.safetensors', "
                                          r"tensor 'model.layers.0.mlp.down_proj.qweight', field 'shape'"):
        GPTQImporter().open(folder)


def test_shapes_that_disagree_with_the_model_config(tmp_path: Path) -> None:
    folder, _, _ = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 192
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"down_proj a \[64, 128\] weight where config.json implies \[64, 192\].*"
                                          r"tensor 'model.layers.0.mlp.down_proj.qweight', field 'shape'"):
        GPTQImporter().open(folder)


def test_scales_of_the_wrong_shape_fail_when_read(tmp_path: Path) -> None:
    folder, _, _ = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False)
    name = "model.layers.1.self_attn.k_proj.scales"
    rewrite(folder, lambda stored: stored.update({name: stored[name][:1].contiguous()}))
    imported = GPTQImporter().open(folder)
    with pytest.raises(SourceError, match=rf"shape \[1, 32\] where the config implies \[2, 32\].*tensor '{name}', "
                                          r"field 'shape'"):
        dict(imported.iter_tensors())


def test_unknown_checkpoint_format_and_missing_zeros(tmp_path: Path) -> None:
    folder, _, _ = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False)
    set_qconfig(folder, checkpoint_format="marlin")
    with pytest.raises(SourceError, match=r"checkpoint_format 'marlin' is not supported \(supported: gptq, gptq_v2\)"):
        GPTQImporter().open(folder)
    set_qconfig(folder, checkpoint_format="gptq")
    name = "model.layers.0.mlp.up_proj.qzeros"
    rewrite(folder, lambda stored: stored.pop(name))
    with pytest.raises(SourceError, match=rf"has no qzeros tensor.*tensor '{name}', field 'qzeros'"):
        GPTQImporter().open(folder)


def test_a_truncated_shard_names_the_file(tmp_path: Path) -> None:
    folder, _, _ = gptq_checkpoint(tmp_path / "src", 4, 32, sym=True, actorder=False)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert GPTQImporter().detect(folder)  # detection reads config.json only
    with pytest.raises(SourceError, match=r"unreadable safetensors shard: \[truncated\].*file '.*model.safetensors'"):
        GPTQImporter().open(folder)


# -- end to end ----------------------------------------------------------------------------------------------------

def test_import_checkpoint_writes_a_folder_that_runs_like_the_reference(tmp_path: Path) -> None:
    import qformat
    from qformat.conversion.importing import import_checkpoint

    folder, refs, model = gptq_checkpoint(tmp_path / "src", 4, 32, sym=False, actorder=True)
    result = import_checkpoint(folder, tmp_path / "out")
    assert result.importer == "gptq" and result.records == len(refs)
    print(f"gptq v1 4-bit g32 act-order asym: source {result.source_bits:.3f} bits/weight, "
          f"imported {result.bits_per_weight:.3f}")
    dense = tiny_llama()
    with torch.no_grad():
        for name, (_, half) in refs.items():
            dense.get_submodule(name.removesuffix(".weight")).weight.copy_(half)
    loaded = qformat.load(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = loaded(ids).logits.float(), dense.float()(ids).logits
    assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item())
