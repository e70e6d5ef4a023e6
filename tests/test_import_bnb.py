"""bitsandbytes importer on real checkpoints: a tiny Llama quantized by transformers' BitsAndBytesConfig on CPU
(NF4 with double quantization, LLM.int8) and state dicts written by bitsandbytes' own serialization
(``quantize_4bit`` + ``QuantState.as_dict(packed=True)``, what ``Linear4bit`` saves) for FP4, plain absmax, other
block sizes and dtypes.

Reference: bitsandbytes 0.50.2 itself. Every record's decode is compared bit for bit (fp32, atol 0) with
bitsandbytes' portable ``dequantize_4bit`` (``backends/default/ops.py``: the nested absmax as
``functional.dequantize_4bit`` computes it, then ``_dequantize_4bit_compute``) in float32, and with
``int8_vectorwise_dequant`` (which returns fp32). For 4-bit the output in the quant state's dtype (BF16/F16) is
compared too: our fp32 decode cast to that dtype (round to nearest even, as the loader casts) equals the portable
path's BF16/F16 output bit for bit.

Why the portable path and not whatever ``functional.dequantize_4bit`` dispatches to: on a CPU with AVX-512 it runs
bitsandbytes' native kernel, which decodes blocks that end mid-row or span rows differently from the flattened blocks
its own ``quantize_4bit`` writes (and its CUDA kernels read): measured on a random 128 x 160 NF4 weight, blocks of 64,
mean |error| against the original weight 0.159 there vs 0.073 on the portable path. It also varies the sign of FP4's
zero with the shape. On a CPU without it (AVX2) the dispatch gave the flattened blocks, as the portable path does.
``test_native_kernel_agrees_where_blocks_tile_rows`` compares the dispatched kernel where the two agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_llama, write_hf_folder
from qformat_plugins.import_bnb import BnbImporter

from qformat.errors import SourceError
from qformat.testing import check_import

bnb = pytest.importorskip("bitsandbytes", reason="pip install --no-deps bitsandbytes==0.50.2 (CPU build)")
F = bnb.functional
BASE = "HuggingFaceTB/SmolLM2-135M"


def quantized_linear(name: str) -> bool:
    return ".layers." in name and name.endswith("_proj.weight")


def transformers_checkpoint(tmp_path: Path, **quantization) -> Path:
    """save_pretrained of a tiny bf16 Llama loaded with BitsAndBytesConfig(**quantization) on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    hf_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        **quantization), device_map="cpu", dtype=torch.bfloat16)
    out = tmp_path / "bnb"
    model.save_pretrained(out)
    (out / "README.md").write_text(f"---\nlicense: apache-2.0\nbase_model:\n- {BASE}\n---\n")
    return out


def serialized_checkpoint(tmp_path: Path, quant_type: str, double_quant: bool, blocksize: int, dtype: str,
                          storage: torch.dtype = torch.uint8, **overrides) -> Path:
    """Every decoder linear through quantize_4bit, saved as Linear4bit's state dict does."""
    from transformers import BitsAndBytesConfig

    model = hf_llama(dtype, **overrides)
    tensors = {}
    for name, w in model.state_dict().items():
        if quantized_linear(name):
            packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type=quant_type, quant_storage=storage)
            tensors[name] = packed
            tensors.update({f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()})
        else:
            tensors[name] = w
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=storage).to_dict()
    return write_hf_folder(tmp_path / "bnb", model, tensors, qconfig)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def portable_dequantize_4bit(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = torch.float32):
    """bitsandbytes' portable dequantize_4bit (the quant state's own dtype when ``dtype`` is None): the nested absmax
    as ``functional.dequantize_4bit`` computes it, then the default backend's ``_dequantize_4bit_compute``."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = F.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    code = _get_4bit_code(quant_state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(), code, quant_state.blocksize,
                                    quant_state.shape, dtype or quant_state.dtype)


def quant_state_of(state: dict[str, torch.Tensor], name: str):
    prefix = f"{name}."
    return F.QuantState.from_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                  device="cpu")


def dequantize_4bit(state: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None = torch.float32):
    """bitsandbytes' portable dequantize_4bit of module ``name`` (the quant state's own dtype when ``dtype`` is
    None)."""
    return portable_dequantize_4bit(state[name], quant_state_of(state, name), dtype)


def reference(state: dict[str, torch.Tensor]):
    def want(name: str) -> np.ndarray:
        prefix = name.rsplit(".", 1)[0]
        if f"{name}.absmax" in state:
            return dequantize_4bit(state, name).numpy()
        if f"{prefix}.SCB" in state:
            return F.int8_vectorwise_dequant(state[name], state[f"{prefix}.SCB"]).numpy()
        return state[name].float().numpy()
    return want


def check_native_dtype(path: Path, state: dict[str, torch.Tensor]) -> int:
    """Our decode cast to the quant state's dtype vs dequantize_4bit's own output in that dtype; returns how many
    records were compared."""
    compared = 0
    for name, value in BnbImporter().open(path).iter_tensors():
        if isinstance(value, np.ndarray):
            continue
        native = dequantize_4bit(state, name, None)
        ours = torch.from_numpy(value.decode()).to(native.dtype)
        assert native.dtype != torch.float32 and value.record["dtype"] in ("BF16", "F16")
        assert torch.equal(ours.view(torch.int16), native.view(torch.int16)), name
        compared += 1
    return compared


def test_transformers_nf4_double_quant_is_bit_exact(tmp_path: Path) -> None:
    path = transformers_checkpoint(tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    state = state_dict(path)
    report = check_import(BnbImporter(), path, reference(state))
    assert (report.records, report.exact, report.plain) == (14, 14, 7)
    assert check_native_dtype(path, state) == 14  # BF16, as the quant state says
    model = BnbImporter().open(path)
    assert model.source_format == "bitsandbytes nf4 blocksize 64 double-quant" and model.base_model == BASE
    assert "quantization_config" not in model.config and model.config["model_type"] == "llama"
    # down_proj rows hold 192 / 64 = 3 absmax blocks: 256-blocks of the absmax end mid-row (the nested-scale lut)
    records = {n: v for n, v in model.iter_tensors() if not isinstance(v, np.ndarray)}
    nested = records["model.layers.0.mlp.down_proj.weight"].record["weight"]["factor"]["terms"][0]
    assert nested["factor"]["codec"] == "lut"
    # 4 bits + fp8 absmax per 64 + fp32 per 256 blocks + tables: the source's own figure and ours agree closely
    assert 4.5 < report.bits_per_weight < 4.7 and abs(report.bits_per_weight - report.source_bits) < 0.02


def test_transformers_int8_is_bit_exact(tmp_path: Path) -> None:
    path = transformers_checkpoint(tmp_path, load_in_8bit=True)
    state = state_dict(path)
    assert not any("outlier" in k for k in state)  # LLM.int8 stores CB and SCB only: outliers are found at run time
    report = check_import(BnbImporter(), path, reference(state))  # int8_vectorwise_dequant returns fp32
    assert (report.records, report.exact) == (14, 14)
    assert 8.2 < report.bits_per_weight < 8.3 and abs(report.bits_per_weight - report.source_bits) < 0.01


@pytest.mark.parametrize(("quant_type", "double_quant", "blocksize", "dtype", "overrides"), [
    ("fp4", False, 64, "float16", {}),
    ("fp4", True, 128, "bfloat16", {"intermediate_size": 256}),
    ("nf4", False, 32, "float32", {}),
    ("nf4", True, 256, "bfloat16", {"intermediate_size": 256}),  # 128-wide rows: blocks of two whole rows
    ("nf4", True, 64, "bfloat16", {"storage": torch.bfloat16}),  # packed bytes held in a BF16 tensor (FSDP)
], ids=["fp4-f16", "fp4-dq-128", "nf4-f32-32", "nf4-dq-256-whole-rows", "nf4-dq-bf16-storage"])
def test_serialized_layouts_are_bit_exact(tmp_path: Path, quant_type: str, double_quant: bool, blocksize: int,
                                          dtype: str, overrides: dict) -> None:
    path = serialized_checkpoint(tmp_path, quant_type, double_quant, blocksize, dtype, **overrides)
    state = state_dict(path)
    report = check_import(BnbImporter(), path, reference(state))
    assert report.exact == 14
    if dtype != "float32":
        assert check_native_dtype(path, state) == 14
    if quant_type == "fp4":
        # code 8 (zero; bitsandbytes' CUDA kernel decodes it as -0.0, its quant_map lists +0.0) is exercised
        packed = state["model.layers.0.mlp.up_proj.weight"].reshape(-1)
        assert bool(((packed >> 4) == 8).any() or ((packed & 15) == 8).any())
    if blocksize == 256:
        record = dict(BnbImporter().open(path).iter_tensors())["model.layers.0.self_attn.q_proj.weight"]
        assert record.record["weight"]["group_shape"] == [2, 128]


def rewrite(path: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = state_dict(path)
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def blob(tensors: dict, name: str = "model.layers.0.mlp.up_proj.weight") -> str:
    return next(k for k in tensors if k.startswith(f"{name}.quant_state."))


def set_json(tensors: dict, text: str) -> None:
    tensors[blob(tensors)] = torch.tensor(list(text.encode()), dtype=torch.uint8)


def edit_state(**fields):
    def change(tensors: dict) -> None:
        state = json.loads(bytes(tensors[blob(tensors)].numpy()))
        set_json(tensors, json.dumps({**state, **fields}))
    return change


UP = "model.layers.0.mlp.up_proj.weight"
CORRUPTIONS = {
    "blob-not-json": (lambda t: set_json(t, '{"quant_type": "nf4", "blocksize": 6'), "quant_state", "blob"),
    "unknown-field": (edit_state(compress="zstd"), "compress", "blob"),
    "unknown-quant-type": (edit_state(quant_type="nf3"), "quant_type", "blob"),
    "shape-vs-bytes": (edit_state(shape=[192, 256]), "shape", "blob"),
    "absmax-length": (lambda t: t.update({f"{UP}.absmax": t[f"{UP}.absmax"][:-1]}), "shape", f"{UP}.absmax"),
    "quant-map": (lambda t: t.update({f"{UP}.quant_map": t[f"{UP}.quant_map"] * 2}), "quant_map", f"{UP}.quant_map"),
    "unknown-tensor": (lambda t: t.update({f"{UP}.extra": torch.zeros(2)}), "weight.extra", f"{UP}.extra"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_quant_state_names_file_tensor_and_field(tmp_path: Path, case: str) -> None:
    path = serialized_checkpoint(tmp_path, "nf4", True, 64, "bfloat16")
    change, field, tensor = CORRUPTIONS[case]
    rewrite(path, change)
    with pytest.raises(SourceError) as caught:
        BnbImporter().open(path)  # before any tensor is read
    tensor = blob(state_dict(path)) if tensor == "blob" else tensor
    assert (caught.value.field, caught.value.tensor) == (field, tensor), str(caught.value)
    assert caught.value.file == str(path / "model.safetensors")


def test_shapes_that_disagree_with_the_config(tmp_path: Path) -> None:
    path = serialized_checkpoint(tmp_path, "nf4", False, 64, "bfloat16")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(SourceError) as caught:
        BnbImporter().open(path)
    assert caught.value.field == "shape" and ".mlp." in caught.value.tensor and "config implies" in str(caught.value)


MID_ROW = [
    # (quant_type, double_quant, blocksize, dtype, intermediate_size, the down_proj tree's shape inside the reshape)
    ("nf4", False, 64, "bfloat16", 160, [320, 64]),  # rows of 160, blocks of 64
    ("nf4", True, 64, "bfloat16", 160, [320, 64]),
    ("fp4", True, 128, "float16", 200, [200, 128]),
    ("fp4", False, 256, "bfloat16", 96, [48, 256]),  # gate/up: blocks of two whole rows of 128, no reshape
    ("fp4", True, 256, "bfloat16", 99, [99, 128]),  # odd rows; 128 x 99 is not a multiple of 256: a partial block
    ("nf4", False, 256, "float16", 99, [99, 128]),
    ("nf4", True, 512, "float32", 224, [56, 512]),
]


@pytest.mark.parametrize(("quant_type", "double_quant", "blocksize", "dtype", "inter", "inner"), MID_ROW,
                         ids=[f"{q}-{'dq' if d else 'plain'}-{b}-rows{i}" for q, d, b, _, i, _ in MID_ROW])
def test_blocks_ending_mid_row_are_bit_exact(tmp_path: Path, quant_type: str, double_quant: bool, blocksize: int,
                                             dtype: str, inter: int, inner: list[int]) -> None:
    """bitsandbytes' blocks run along the flattened weight and here end mid-row in down_proj (rows of ``inter``):
    the scale(lut) tree runs over a shape whose rows hold whole blocks, inside a reshape to [out, in]."""
    path = serialized_checkpoint(tmp_path, quant_type, double_quant, blocksize, dtype, intermediate_size=inter)
    state = state_dict(path)
    report = check_import(BnbImporter(), path, reference(state))
    assert (report.records, report.exact) == (14, 14)
    if dtype != "float32":
        assert check_native_dtype(path, state) == 14
    records = {n: v.record for n, v in BnbImporter().open(path).iter_tensors() if not isinstance(v, np.ndarray)}
    down = records["model.layers.0.mlp.down_proj.weight"]["weight"]
    assert down["codec"] == "reshape" and down["shape"] == [128, inter]
    assert down["input"]["input"]["codes"]["shape"] == inner
    assert records["model.layers.0.self_attn.q_proj.weight"]["weight"]["codec"] == "scale"  # rows of 128: tiles
    if quant_type == "fp4" and inter % 2:  # odd rows with code 8 (zero) among the codes
        packed = state["model.layers.0.mlp.down_proj.weight"].reshape(-1)
        assert bool(((packed >> 4) == 8).any() or ((packed & 15) == 8).any())


ODD = [((37, 53), 64, False, "fp4"), ((37, 53), 64, True, "nf4"), ((30, 50), 64, True, "fp4"),
       ((36, 53), 32, False, "nf4"), ((129, 70), 256, True, "fp4")]


@pytest.mark.parametrize(("shape", "blocksize", "double_quant", "quant_type"), ODD,
                         ids=[f"{s[0]}x{s[1]}-{b}-{'dq' if d else 'plain'}-{q}" for s, b, d, q in ODD])
def test_block_layouts_of_odd_shapes_are_bit_exact(shape: tuple[int, int], blocksize: int, double_quant: bool,
                                                   quant_type: str) -> None:
    """Shapes no tiny Llama has (an odd number of weights: one packed row [1, n] reshaped; a last block cut short),
    built by the importer's record function from quantize_4bit's own state, against the portable dequantize_4bit."""
    from qformat_plugins._import_bnb_records import Nested, block_layout, fourbit_record

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, quant_state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                          quant_type=quant_type)
    absmax = quant_state.absmax.numpy()
    if double_quant:
        nested = quant_state.state2
        absmax = Nested(absmax, nested.code.numpy(), nested.absmax.numpy(), float(np.float32(quant_state.offset)),
                        nested.blocksize)
    qt = fourbit_record("m.weight", shape, "BF16", quant_type, blocksize, packed.numpy().reshape(-1), absmax, {})
    n = shape[0] * shape[1]
    layout = block_layout(*shape, blocksize)[0]
    assert qt.record["weight"]["codec"] == "reshape" and layout == ((1, n) if n % 2 else layout)
    quant_state.dtype = torch.float32
    want = portable_dequantize_4bit(packed, quant_state).numpy()
    assert np.array_equal(qt.decode().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_native_kernel_agrees_where_blocks_tile_rows(quant_type: str, double_quant: bool) -> None:
    """Where blocks tile the rows (the block size divides the row length), whatever ``functional.dequantize_4bit``
    dispatches to on this machine gives the portable path's values (the sign of zero aside), so the records match
    bitsandbytes as users run it there too."""
    w = torch.randn((96, 256), generator=torch.Generator().manual_seed(2))
    for blocksize in (64, 128, 256):
        packed, quant_state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                              quant_type=quant_type)
        native = F.dequantize_4bit(packed, quant_state)
        assert torch.equal(native, portable_dequantize_4bit(packed, quant_state)), blocksize  # == : -0.0 == +0.0


def test_int8_bad_scb_and_weight_format(tmp_path: Path) -> None:
    path = transformers_checkpoint(tmp_path, load_in_8bit=True)
    name = "model.layers.1.self_attn.o_proj"
    rewrite(path, lambda t: t.update({f"{name}.SCB": t[f"{name}.SCB"][:64]}))
    with pytest.raises(SourceError) as caught:
        BnbImporter().open(path)
    assert (caught.value.tensor, caught.value.field) == (f"{name}.SCB", "shape")
    rewrite(path, lambda t: t.update({f"{name}.SCB": torch.ones(128), f"{name}.weight_format": torch.tensor(1,
                                      dtype=torch.uint8)}))
    with pytest.raises(SourceError) as caught:
        BnbImporter().open(path)
    assert (caught.value.tensor, caught.value.field) == (f"{name}.weight_format", "weight_format")


def test_detects_only_bitsandbytes_folders(tmp_path: Path) -> None:
    path = serialized_checkpoint(tmp_path, "nf4", False, 64, "bfloat16")
    importer = BnbImporter()
    assert importer.detect(path)
    assert not importer.detect(path / "model.safetensors") and not importer.detect(tmp_path / "missing")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "hqq"}}))
    assert not importer.detect(path)
    hf_llama().save_pretrained(tmp_path / "plain")
    assert not importer.detect(tmp_path / "plain")


def test_import_end_to_end(tmp_path: Path) -> None:
    """`qformat convert --method import` (the pipeline): detected by itself, lineage from the card, every record of
    the written folder still bitsandbytes' dequantization, and the folder loads and runs."""
    import qformat
    from qformat.conversion.importing import import_checkpoint
    from qformat.format import open_folder

    path = transformers_checkpoint(tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    result = import_checkpoint(path, tmp_path / "out")
    assert (result.importer, result.records, result.plain) == ("bitsandbytes", 14, 7)
    folder = open_folder(tmp_path / "out")
    qconfig = folder.quantization_config
    assert qconfig["base_model"] == BASE and qconfig["source"]["format"].startswith("bitsandbytes nf4")
    assert abs(qconfig["source"]["bits_per_weight"] - result.source_bits) < 1e-3
    state = state_dict(path)
    for name in folder.records:
        got = folder.decode(name)
        assert np.array_equal(got.view(np.uint32), dequantize_4bit(state, name).numpy().view(np.uint32)), name
    model = qformat.load(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(1, 12)).logits
    assert logits.shape == (1, 12, 128) and torch.isfinite(logits).all()
