"""BitNet importer on checkpoints in transformers' packed ternary layout (``integrations/bitnet.py``: ``pack_weights``
into ``weight`` uint8 [out / 4, in], plus ``weight_scale``), written for a tiny Llama whose layer-0 linears are
ternary (layer 1 in modules_to_not_convert stays plain), with BitNetQuantConfig's quantization_config.

Reference: transformers itself, in fp32. ``unpack_weights`` (its eager function) gives the ternary values; the scale
is applied as the layer class does: ``BitLinear`` divides its output by ``input_scale * weight_scale``, so its weight
is ``t / weight_scale``; ``AutoBitLinear`` (offline) multiplies its output by ``weight_scale``, so ``t *
weight_scale``. Every record decodes bit for bit (fp32, atol 0) to that, and cast to BF16 to the same expression in
BF16; ``BitLinear.forward`` itself (run eagerly) agrees with the decoded weight on a real input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_llama, write_hf_folder
from qformat_plugins.import_bitnet import BitNetImporter

from qformat.errors import SourceError
from qformat.testing import check_import

Q = "model.layers.0.self_attn.q_proj"


def unpack_weights():
    from transformers.integrations.bitnet import unpack_weights as compiled

    return getattr(compiled, "_torchdynamo_orig_callable", compiled)  # the function itself, not torch.compile's


def bitnet_checkpoint(tmp_path: Path, linear_class: str = "bitlinear", seed: int = 0) -> Path:
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import pack_weights

    model = hf_llama()
    generator = torch.Generator().manual_seed(seed)
    tensors, keep = {}, []
    for name, w in model.state_dict().items():
        if ".layers.0." in name and name.endswith("_proj.weight"):
            tensors[name] = pack_weights(torch.randint(-1, 2, w.shape, generator=generator))
            scale = torch.rand(1, generator=generator) * 4 + 0.25
            tensors[f"{name[:-len('weight')]}weight_scale"] = scale.to(torch.bfloat16)
        else:
            tensors[name] = w
            if name.endswith("_proj.weight"):
                keep.append(name.rsplit(".", 1)[0])
    qconfig = BitNetQuantConfig(linear_class=linear_class, modules_to_not_convert=["lm_head", *keep]).to_dict()
    return write_hf_folder(tmp_path / "bitnet", model, tensors, qconfig)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def transformers_weight(state: dict, name: str, linear_class: str, dtype: torch.dtype) -> torch.Tensor:
    ternary = unpack_weights()(state[name], dtype=dtype)
    scale = state[f"{name[:-len('weight')]}weight_scale"].to(dtype)
    return ternary / scale if linear_class == "bitlinear" else ternary * scale


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_packed_ternary_is_bit_exact(tmp_path: Path, linear_class: str) -> None:
    path = bitnet_checkpoint(tmp_path, linear_class)
    state = state_dict(path)

    def reference(name: str) -> np.ndarray:
        if f"{name[:-len('weight')]}weight_scale" in state:
            return transformers_weight(state, name, linear_class, torch.float32).numpy()
        return state[name].float().numpy()

    report = check_import(BitNetImporter(), path, reference)
    assert (report.records, report.exact, report.plain) == (7, 7, 14)
    tensors = dict(BitNetImporter().open(path).iter_tensors())
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            continue
        ours = torch.from_numpy(value.decode()).to(torch.bfloat16)
        native = transformers_weight(state, name, linear_class, torch.bfloat16)
        assert torch.equal(ours.view(torch.int16), native.view(torch.int16)), name
        assert value.record["weight"]["input"]["codec"] == "ternary"
        assert value.record["info"]["weight_scale"] == state[f"{name[:-len('weight')]}weight_scale"].item()
    # 1.6 bits per ternary value (five per byte) plus a 32-bit factor, against the source's 2 bits plus 16
    assert report.bits_per_weight == pytest.approx(1.6, abs=0.03) and report.source_bits == pytest.approx(2.0, abs=0.01)


def test_bitlinear_forward_agrees_with_the_decoded_weight(tmp_path: Path) -> None:
    """The direction of the scale, checked on transformers' own layer: BitLinear divides by weight_scale."""
    from transformers.integrations.bitnet import BitLinear

    path = bitnet_checkpoint(tmp_path)
    state = state_dict(path)
    record = dict(BitNetImporter().open(path).iter_tensors())[f"{Q}.weight"]
    layer = BitLinear(128, 128, bias=False, dtype=torch.float32)
    layer.weight.copy_(state[f"{Q}.weight"])
    layer.weight_scale.copy_(state[f"{Q}.weight_scale"].float())
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        y = layer(x)
        x_q, x_scale = layer.activation_quant(x)
    want = (x_q.float() @ torch.from_numpy(record.decode()).T) / x_scale
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def rewrite(path: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = state_dict(path)
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("case", "field", "tensor"), [
    ("online", "quantization_mode", None),
    ("zero-scale", "weight_scale", f"{Q}.weight_scale"),
    ("rows-vs-config", "shape", f"{Q}.weight"),
    ("unknown", "weight_zero", f"{Q}.weight_zero"),
])
def test_bad_sources_name_file_tensor_and_field(tmp_path: Path, case: str, field: str, tensor: str | None) -> None:
    path = bitnet_checkpoint(tmp_path)
    if case == "online":  # full-precision weights quantized at run time: nothing quantized to import
        edit_config(path, quantization_mode="online", linear_class="autobitlinear")
    elif case == "zero-scale":
        rewrite(path, lambda t: t.update({f"{Q}.weight_scale": torch.zeros(1, dtype=torch.bfloat16)}))
    elif case == "rows-vs-config":
        rewrite(path, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:16]}))
    else:
        rewrite(path, lambda t: t.update({f"{Q}.weight_zero": torch.zeros(1)}))
    with pytest.raises(SourceError) as caught:
        BitNetImporter().open(path)
    assert (caught.value.field, caught.value.tensor) == (field, tensor), str(caught.value)
    assert caught.value.file.startswith(str(path))


def test_a_field_holding_3_is_no_ternary_value(tmp_path: Path) -> None:
    path = bitnet_checkpoint(tmp_path)
    rewrite(path, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"] | 3}))
    model = BitNetImporter().open(path)
    with pytest.raises(SourceError) as caught:
        dict(model.iter_tensors())
    assert (caught.value.tensor, caught.value.field) == (f"{Q}.weight", "weight")


def test_detects_bitnet_folders_only(tmp_path: Path) -> None:
    path = bitnet_checkpoint(tmp_path)
    assert BitNetImporter().detect(path)
    edit_config(path, quant_method="bitsandbytes")
    assert not BitNetImporter().detect(path)
