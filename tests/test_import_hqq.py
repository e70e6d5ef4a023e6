"""HQQ importer on real HQQ checkpoints: a tiny Llama whose layer-0 linears are ``hqq.core.quantize.HQQLinear``
(hqq 0.2.8.post1 on CPU, BF16 compute dtype), saved as transformers saves an HQQ model (``model.state_dict()``: each
module's ``W_q`` and encoded metadata) with HqqConfig's quantization_config; layer 1 stays unquantized.

Reference: hqq itself. Every record decodes bit for bit (fp32, atol 0) to ``HQQLinear.dequantize()`` of the same
state loaded with ``compute_dtype=torch.float32``. HQQ's native BF16 dequantization rounds ``W_q - zero`` to BF16
before multiplying by the scale, which the format's fp32 ``affine`` does not: our decode cast to BF16 is compared with
HQQ's BF16 output and must agree everywhere except where that first rounding changed ``W_q - zero``, and there by at
most one BF16 unit in the last place (a spec question for the lead, not an importer choice).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_llama, write_hf_folder
from qformat_plugins.import_hqq import HQQImporter

from qformat.errors import SourceError
from qformat.testing import check_import

pytest.importorskip("hqq", reason="DISABLE_CUDA=1 pip install --no-deps hqq==0.2.8.post1 termcolor einops")
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer  # noqa: E402


def hqq_checkpoint(tmp_path: Path, nbits: float, group: int | None, axis: int, view_as_float: bool = False,
                   **overrides) -> Path:
    from transformers import HqqConfig

    model = hf_llama(**overrides)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers.0." in name:
            config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=axis, view_as_float=view_as_float)
            model.set_submodule(name, HQQLinear(module, config, compute_dtype=torch.bfloat16, device="cpu"))
    qconfig = HqqConfig(nbits=int(np.ceil(nbits)), group_size=group or 64, axis=axis).to_dict()
    return write_hf_folder(tmp_path / "hqq", model, model.state_dict(), qconfig)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def hqq_dequantize(state: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> torch.Tensor:
    layer = HQQLinear(None, quant_config=None, compute_dtype=dtype, device="cpu", initialize=False)
    layer.load_state_dict({k[len(prefix) + 1:]: v.clone() for k, v in state.items() if k.startswith(prefix + ".")})
    return layer.dequantize()


def reference(state: dict[str, torch.Tensor]):
    def want(name: str) -> np.ndarray:
        prefix = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{prefix}.W_q" in state:
            return hqq_dequantize(state, prefix, torch.float32).numpy()
        return state[name].float().numpy()
    return want


def check_bf16(path: Path, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Our decode cast to BF16 vs HQQ's BF16 dequantize: (elements that differ, elements compared)."""
    differ = total = 0
    for name, value in HQQImporter().open(path).iter_tensors():
        if isinstance(value, np.ndarray):
            continue
        prefix = name.rsplit(".", 1)[0]
        ours = torch.from_numpy(value.decode()).to(torch.bfloat16)
        native = hqq_dequantize(state, prefix, torch.bfloat16)
        meta = {k: state[f"{prefix}.{k}"] for k in ("W_q", "zero", "packing")}
        packing = bytes(meta["packing"].numpy()).decode()
        w_q = meta["W_q"].view(torch.int32 if packing == "3bit_32" else torch.uint8)
        zero = meta["zero"].float()  # [Mr, 1] on axis 1, [1, Mc] on axis 0
        rows = zero.shape[0] if zero.shape[1] == 1 else ours.numel() // zero.shape[1]
        first = Quantizer.unpack[packing](w_q, dtype=torch.float32)[:rows] - zero
        rounded = (first.to(torch.bfloat16).float() != first).reshape(ours.shape)
        mismatch = ours.view(torch.int16) != native.view(torch.int16)
        assert not (mismatch & ~rounded).any(), name  # every difference comes from HQQ's BF16 rounding of q - zero
        ulps = (ours.view(torch.int16).int() - native.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, name
        differ += int(mismatch.sum())
        total += ours.numel()
    return differ, total


LAYOUTS = [(4, 64, 1), (3, 64, 1), (2, 32, 1), (1, 64, 1), (8, 128, 1), (5, 64, 1), (1.58, 64, 1), (4, 256, 1)]


@pytest.mark.parametrize(("nbits", "group", "axis"), LAYOUTS, ids=[f"{n}bit-g{g}-axis{a}" for n, g, a in LAYOUTS])
def test_layouts_are_bit_exact_in_fp32(tmp_path: Path, nbits: float, group: int, axis: int) -> None:
    path = hqq_checkpoint(tmp_path, nbits, group, axis, **({"intermediate_size": 256} if group > 64 else {}))
    state = state_dict(path)
    report = check_import(HQQImporter(), path, reference(state))
    assert (report.records, report.exact) == (7, 7)
    model = HQQImporter().open(path)
    tensors = dict(model.iter_tensors())
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype.name == "bfloat16"  # unquantized: passes through
    record = tensors["model.layers.0.self_attn.q_proj.weight"].record
    bits = int(np.ceil(nbits))
    # 128-wide rows: groups of 256 weights are two whole rows
    assert record["weight"]["group_shape"] == ([2, 128] if group == 256 else [1, group])
    assert record["weight"]["bits"] == bits and record["dtype"] == "BF16"
    # per group: bits-wide codes plus a BF16 scale and zero (5-bit codes were stored in a byte each by HQQ)
    assert report.bits_per_weight == pytest.approx(bits + 32 / group)
    stored = 8 if nbits in (5, 6) else {1.58: 2, 3: 32 / 10}.get(nbits, nbits)
    assert report.source_bits == pytest.approx(stored + 32 / group, abs=0.3)
    differ, total = check_bf16(path, state)
    assert differ < total / 50


def test_axis_0_per_column_and_float_view(tmp_path: Path) -> None:
    """axis 0 with one group per input column (group_size = out_features), and W_q stored viewed as BF16."""
    path = hqq_checkpoint(tmp_path, 4, None, 0, view_as_float=True, attention_bias=True)
    state = state_dict(path)
    assert state["model.layers.0.self_attn.q_proj.W_q"].dtype == torch.bfloat16
    report = check_import(HQQImporter(), path, reference(state))
    assert report.exact == 7
    tensors = dict(HQQImporter().open(path).iter_tensors())
    assert tensors["model.layers.0.mlp.down_proj.weight"].record["weight"]["group_shape"] == [128, 1]
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype.name == "bfloat16"  # HQQLinear's bias, as stored
    check_bf16(path, state)


AXIS_0 = [(4, 64), (3, 64), (2, 32), (4, 128)]


@pytest.mark.parametrize(("nbits", "group"), AXIS_0, ids=[f"{n}bit-g{g}" for n, g in AXIS_0])
def test_axis_0_groups_along_the_flattened_weight_are_bit_exact(tmp_path: Path, nbits: int, group: int) -> None:
    """HQQ's axis-0 groups smaller than a column take every (numel / g)-th weight: the affine runs over HQQ's group
    matrix M [g, numel / g] (one scale and zero per column) inside a reshape to [out, in]."""
    path = hqq_checkpoint(tmp_path, nbits, group, 0)
    state = state_dict(path)
    report = check_import(HQQImporter(), path, reference(state))
    assert (report.records, report.exact) == (7, 7)
    assert report.bits_per_weight == pytest.approx(nbits + 32 / group)
    records = {n: v.record for n, v in HQQImporter().open(path).iter_tensors() if not isinstance(v, np.ndarray)}
    for name, record in records.items():
        out, cols = record["shape"]
        weight = record["weight"]
        if out == group:  # k_proj/v_proj [64, 128] with groups of 64: one group per input column, no reshape
            assert weight["codec"] == "affine" and weight["group_shape"] == [out, 1], name
            continue
        assert weight["codec"] == "reshape" and weight["shape"] == [out, cols], name
        inner = weight["input"]
        assert inner["group_shape"] == [group, 1] and inner["codes"]["shape"] == [group, out * cols // group], name
    assert any(r["weight"]["codec"] == "reshape" for r in records.values())
    check_bf16(path, state)


def test_axis_1_groups_ending_mid_row_are_bit_exact(tmp_path: Path) -> None:
    """Groups of 128 on down_proj's rows of 192 end mid-row: one scale per row of M [numel / 128, 128], reshaped."""
    path = hqq_checkpoint(tmp_path, 4, 128, 1)
    state = state_dict(path)
    report = check_import(HQQImporter(), path, reference(state))
    assert (report.records, report.exact) == (7, 7)
    tensors = dict(HQQImporter().open(path).iter_tensors())
    down = tensors["model.layers.0.mlp.down_proj.weight"].record["weight"]
    assert down["codec"] == "reshape" and down["input"]["group_shape"] == [1, 128]
    assert down["input"]["codes"]["shape"] == [128 * 192 // 128, 128]
    assert tensors["model.layers.0.mlp.up_proj.weight"].record["weight"]["codec"] == "affine"  # rows of 128
    check_bf16(path, state)


def test_reshaped_records_load_and_run_through_the_reference_path(tmp_path: Path) -> None:
    """An imported axis-0 folder loads with qformat.load; the reshape records run on the torch reference path (the
    Numba/Triton lowering does not know reshape) and compute x @ W.T with HQQ's own weights."""
    import qformat
    from qformat.conversion.importing import import_checkpoint
    from qformat.runtime.nn import qlinear_modules

    path = hqq_checkpoint(tmp_path, 4, 64, 0)
    state = state_dict(path)
    import_checkpoint(path, tmp_path / "out")
    model = qformat.load(tmp_path / "out")
    layers = {n: m for n, m in qlinear_modules(model).items() if ".layers.0." in n}
    assert len(layers) == 7
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, layer in layers.items():
            reshaped = layer.record["weight"]["codec"] == "reshape"
            assert (layer.kernel_name == "torch") or not reshaped, name
            w = hqq_dequantize(state, name, torch.float32).to(torch.bfloat16).float()
            inputs = x if w.shape[1] == 128 else torch.randn(3, w.shape[1], dtype=torch.bfloat16)
            want = inputs.float() @ w.T
            torch.testing.assert_close(layer(inputs).float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
        logits = model(torch.arange(12).reshape(1, 12)).logits
    assert torch.isfinite(logits).all()


def rewrite(path: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = state_dict(path)
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def text(value: str) -> torch.Tensor:
    return torch.tensor(list(value.encode()), dtype=torch.uint8)


Q = "model.layers.0.self_attn.q_proj"
CORRUPTIONS = {
    # HQQ itself would eval() this string; the importer reads dtype names from a fixed list
    "compute-dtype-code": (lambda t: t.update({f"{Q}.compute_dtype": text("__import__('os').getcwd()")}),
                           "compute_dtype"),
    "quantized-zero": (lambda t: t.update({f"{Q}.quant_zero": torch.tensor(1, dtype=torch.uint8)}), "quant_zero"),
    "packing": (lambda t: t.update({f"{Q}.packing": text("2bit_u8")}), "packing"),
    "unknown-tensor": (lambda t: t.update({f"{Q}.meta_zero": torch.zeros(2)}), "meta_zero"),
    "w_q-shape": (lambda t: t.update({f"{Q}.W_q": t[f"{Q}.W_q"][:-1]}), "W_q"),
    "zero-shape": (lambda t: t.update({f"{Q}.zero": t[f"{Q}.zero"][:-1]}), "zero"),
    "nbits": (lambda t: t.update({f"{Q}.nbits": torch.tensor(7, dtype=torch.int32)}), "nbits"),
    "shape-vs-config": (lambda t: t.update({f"{Q}.shape": torch.tensor([128, 64])}), "shape"),
}


@pytest.fixture(scope="module")
def hqq_4bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hqq_checkpoint(tmp_path_factory.mktemp("hqq4"), 4, 64, 1)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_metadata_names_file_tensor_and_field(tmp_path: Path, hqq_4bit: Path, case: str) -> None:
    path = Path(shutil.copytree(hqq_4bit, tmp_path / "hqq"))
    change, field = CORRUPTIONS[case]
    rewrite(path, change)
    with pytest.raises(SourceError) as caught:
        HQQImporter().open(path)
    assert caught.value.field == field and caught.value.tensor.startswith(Q), str(caught.value)
    assert caught.value.file == str(path / "model.safetensors")


def test_detects_hqq_folders_only(tmp_path: Path, hqq_4bit: Path) -> None:
    path = Path(shutil.copytree(hqq_4bit, tmp_path / "hqq"))
    assert HQQImporter().detect(path) and not HQQImporter().detect(path / "config.json")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "aqlm"}}))
    assert not HQQImporter().detect(path)
