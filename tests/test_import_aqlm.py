"""AQLM importer on checkpoints of ``aqlm.QuantizedLinear`` modules (aqlm 1.1.7, installed with ``--no-deps``): a
tiny Llama whose layer-0 linears hold random codes, codebooks and scales in AQLM's own layout (the importer maps
what is stored, so no AQ search is needed), saved as transformers saves an AQLM model, with AqlmConfig's
quantization_config; layer 1 is listed in linear_weights_not_to_quantize and stays plain.

Reference: aqlm's own dequantization, ``aqlm.utils._dequantize_weight(unpack_int_data(codes, nbits), codebooks,
scales)`` (what its CPU fallback kernel ``dequantize_gemm`` runs), computed in fp32 (codebooks and scales cast to
fp32): every record decodes to it bit for bit. In FP16 aqlm rounds the codebook sum to FP16 before scaling; our
decode cast to FP16 is compared with aqlm's FP16 output too: identical with one codebook, and with several
different only where that intermediate rounding changed the sum, by at most one FP16 unit in the last place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_llama, write_hf_folder
from qformat_plugins.import_aqlm import AQLMImporter

from qformat.errors import SourceError
from qformat.testing import check_import

pytest.importorskip("aqlm", reason="pip install --no-deps aqlm==1.1.7")
from aqlm import QuantizedLinear  # noqa: E402
from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data  # noqa: E402


def aqlm_checkpoint(tmp_path: Path, books: int, nbits: int, in_group: int, seed: int = 0) -> Path:
    from transformers import AqlmConfig

    model = hf_llama("float16")
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        if ".layers.0." not in name:
            keep.append(f"{name}.weight")
            continue
        layer = QuantizedLinear(module.in_features, module.out_features, in_group, 1, books, nbits, bias=False,
                                dtype=torch.float16)
        layer.codebooks.data = (torch.randn(layer.codebooks.shape, generator=generator) * 0.1).half()
        layer.codes.data = pack_int_data(torch.randint(0, 1 << nbits, layer.codes.shape, generator=generator), nbits)
        layer.scales.data = (torch.rand(layer.scales.shape, generator=generator) + 0.5).half()
        model.set_submodule(name, layer)
    qconfig = AqlmConfig(in_group_size=in_group, num_codebooks=books, nbits_per_codebook=nbits,
                         linear_weights_not_to_quantize=["model.embed_tokens.weight", "lm_head.weight", *keep]).to_dict()
    return write_hf_folder(tmp_path / "aqlm", model, model.state_dict(), qconfig)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def aqlm_dequantize(state: dict, prefix: str, nbits: int, dtype: torch.dtype, scaled: bool = True) -> torch.Tensor:
    return _dequantize_weight(unpack_int_data(state[f"{prefix}.codes"], nbits), state[f"{prefix}.codebooks"].to(dtype),
                              state[f"{prefix}.scales"].to(dtype) if scaled else None)


LAYOUTS = [(1, 16, 8), (2, 8, 8), (1, 8, 4), (3, 6, 16), (1, 15, 8)]


@pytest.mark.parametrize(("books", "nbits", "in_group"), LAYOUTS, ids=[f"{m}x{b}-g{g}" for m, b, g in LAYOUTS])
def test_layouts_are_bit_exact(tmp_path: Path, books: int, nbits: int, in_group: int) -> None:
    path = aqlm_checkpoint(tmp_path, books, nbits, in_group)
    state = state_dict(path)

    def reference(name: str) -> np.ndarray:
        prefix = name.rsplit(".", 1)[0]
        if f"{prefix}.codes" in state:
            return aqlm_dequantize(state, prefix, nbits, torch.float32).numpy()
        return state[name].float().numpy()

    report = check_import(AQLMImporter(), path, reference)
    assert (report.records, report.exact, report.plain) == (7, 7, 14)
    tensors = dict(AQLMImporter().open(path).iter_tensors())
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == np.float16  # not quantized: as stored
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            continue
        prefix = name.rsplit(".", 1)[0]
        stored = state[f"{prefix}.codes"]
        if nbits in (8, 16):  # the packed codes are the stored bytes
            assert np.array_equal(value.tensors[f"{name}.codes"].view(np.uint8).reshape(-1),
                                  stored.numpy().view(np.uint8).reshape(-1)), name
        ours = torch.from_numpy(value.decode()).half()
        native = aqlm_dequantize(state, prefix, nbits, torch.float16)
        differ = ours.view(torch.int16) != native.view(torch.int16)
        if books == 1:
            assert not differ.any(), name
        else:
            total = aqlm_dequantize(state, prefix, nbits, torch.float32, scaled=False)
            rounded = total.half().float() != total
            assert not (differ & ~rounded).any(), name  # only where aqlm's FP16 sum was rounded
            assert int((ours.view(torch.int16).int() - native.view(torch.int16).int()).abs().max()) <= 1, name
    # per module: codes (rows padded to bytes), F16 codebooks, an F16 scale per row; the source stores each code
    # in a whole int8/int16
    shapes = [(128, 128), (64, 128), (64, 128), (128, 128), (192, 128), (192, 128), (128, 192)]
    tables = books * (1 << nbits) * in_group * 16
    weights = sum(r * c for r, c in shapes)
    ours = sum(r * -(-(c // in_group) * books * nbits // 8) * 8 + tables + r * 16 for r, c in shapes)
    stored = sum(r * (c // in_group) * books * (8 if nbits <= 8 else 16) + tables + r * 16 for r, c in shapes)
    assert (report.bits_per_weight, report.source_bits) == (pytest.approx(ours / weights), pytest.approx(stored / weights))


def edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


def rewrite(path: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = state_dict(path)
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


K = "model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize(("case", "field", "tensor"), [
    ("out-group", "out_group_size", None),
    ("nbits", "shape", "model.layers.0.mlp.down_proj.codebooks"),  # the first module read
    ("codes-vs-config", "shape", f"{K}.codes"),
    ("scales", "shape", f"{K}.scales"),
    ("unknown", "extra", f"{K}.extra"),
])
def test_bad_sources_name_file_tensor_and_field(tmp_path: Path, case: str, field: str, tensor: str | None) -> None:
    path = aqlm_checkpoint(tmp_path, 2, 8, 8)
    if case == "out-group":  # vectors spanning two rows: vq version 1 holds row vectors only
        edit_config(path, out_group_size=2)
    elif case == "nbits":
        edit_config(path, nbits_per_codebook=7)
    elif case == "codes-vs-config":
        rewrite(path, lambda t: t.update({f"{K}.codes": t[f"{K}.codes"][:32]}))
    elif case == "scales":
        rewrite(path, lambda t: t.update({f"{K}.scales": t[f"{K}.scales"][:1]}))
    else:
        rewrite(path, lambda t: t.update({f"{K}.extra": torch.zeros(1)}))
    with pytest.raises(SourceError) as caught:
        AQLMImporter().open(path)
    assert (caught.value.field, caught.value.tensor) == (field, tensor), str(caught.value)
    assert caught.value.file.startswith(str(path))


def test_detects_aqlm_folders_only(tmp_path: Path) -> None:
    path = aqlm_checkpoint(tmp_path, 1, 8, 4)
    assert AQLMImporter().detect(path)
    edit_config(path, quant_method="bitnet")
    assert not AQLMImporter().detect(path)
