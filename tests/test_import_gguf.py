"""The GGUF importer (plugins/import_gguf.py): every record decodes bit for bit to gguf-py's ``dequantize`` of the
same tensor (after transformers' name mapping and row permutation), on random blocks of every supported type, on a
tiny Llama GGUF written here, and (slow) on the real SmolLM2-135M-Instruct Q4_1 GGUF; bad files raise SourceError
naming the file, the tensor and the field."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_fixtures import (
    HEADS,
    HIDDEN,
    LAYERS,
    gguf_blocks,
    random_blocks,
    same_bits,
    smollm2_gguf,
    write_tiny_gguf,
)
from qformat_plugins import _gguf_records as records
from qformat_plugins.import_gguf import GGUFImporter, gguf_file

from qformat.errors import SourceError
from qformat.format import bitpack

# -- one tensor per type ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", records.SUPPORTED)
@pytest.mark.parametrize("source", ["random", "quantized"])
def test_record_decodes_to_gguf_dequantize(type_name, source, rng):
    rows, cols = 12, 768
    raw = (random_blocks if source == "random" else gguf_blocks)(type_name, rows, cols, rng)
    block, size = GGML_QUANT_SIZES[T[type_name]]
    qt = records.build_record("model.layers.0.mlp.up_proj.weight", type_name, raw, (rows, cols), size)
    assert same_bits(qt.decode(), gguf.quants.dequantize(raw, T[type_name]))
    assert qt.record["info"]["gguf_type"] == type_name
    # bits per weight: as GGUF stores them, plus the IQ4_NL/IQ4_XS table (16 F16 per tensor); TQ1_0's trits pack
    # tighter (5 per byte, exact base 3: ceil(C / 5) bytes per row, plus the fp16 scale per 256)
    expected = {"IQ4_NL": size * 8 / block + 32 * 8 / (rows * cols), "IQ4_XS": size * 8 / block + 32 * 8 / (rows * cols),
                "TQ1_0": (rows * -(-cols // 5) + rows * cols // 256 * 2) * 8 / (rows * cols)}
    assert qt.bits_per_weight == pytest.approx(expected.get(type_name, size * 8 / block), abs=1e-9)


def test_offset_types_use_affine_version_2(rng):
    for type_name in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"):
        raw = random_blocks(type_name, 2, 256, rng)
        qt = records.build_record("w", type_name, raw, (2, 256), GGML_QUANT_SIZES[T[type_name]][1])
        assert qt.record["weight"]["codec"] == "affine" and qt.record["weight"]["version"] == 2
    for type_name in ("Q4_0", "Q8_0", "Q6_K"):
        raw = random_blocks(type_name, 2, 256, rng)
        qt = records.build_record("w", type_name, raw, (2, 256), GGML_QUANT_SIZES[T[type_name]][1])
        assert qt.record["weight"]["version"] == 1


def test_tq1_0_is_stored_as_ternary(rng):
    raw = gguf_blocks("TQ1_0", 3, 512, rng)
    qt = records.build_record("w", "TQ1_0", raw, (3, 512), GGML_QUANT_SIZES[T.TQ1_0][1])
    assert qt.record["weight"]["codec"] == "scale" and qt.record["weight"]["input"]["codec"] == "ternary"


# -- IQ4_XS ---------------------------------------------------------------------------------------------------------

IQ4_XS_SIZE = GGML_QUANT_SIZES[T.IQ4_XS][1]  # 136 bytes per 256 values


def iq4_xs_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random IQ4_XS bytes whose ``d`` covers the fp16 range: normal values of both signs, subnormals of both signs,
    signed zeros, the largest finite value; the first 8 super-blocks hold the 64 sub-block scales ``ls`` in order."""
    raw = rng.integers(0, 256, size=(rows, cols // 256, IQ4_XS_SIZE), dtype=np.uint8)
    d = (rng.standard_normal(raw.shape[:2]) * 0.05).astype(np.float16)
    special = np.array([0x0001, 0x8001, 0x03FF, 0x83FF, 0x0200, 0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0400],
                       dtype=np.uint16).view(np.float16)
    d.reshape(-1)[:special.size] = special[:d.size]
    flat = raw.reshape(-1, IQ4_XS_SIZE)
    for k in range(min(8, flat.shape[0])):
        ls = np.arange(8 * k, 8 * k + 8)
        flat[k, 2:4] = np.array([sum(int(v >> 4) << 2 * i for i, v in enumerate(ls))], "<u2").view(np.uint8)
        flat[k, 4:8] = (ls[0::2] & 0x0F) | ((ls[1::2] & 0x0F) << 4)
    raw[..., 0:2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def ggml_iq4_xs(raw: np.ndarray) -> np.ndarray:
    """ggml's ``dequantize_row_iq4_xs`` (ggml-quants.c), one value at a time: an oracle written from the C source,
    independent of gguf-py's vectorised reading and of the importer's."""
    kvalues = np.array(records.IQ4_NL_VALUES, dtype=np.float32)
    blocks = raw.reshape(-1, IQ4_XS_SIZE)
    out = np.empty((blocks.shape[0], 256), dtype=np.float32)
    for n, x in enumerate(blocks):
        d = np.float32(x[0:2].view(np.float16)[0])
        scales_h = int(x[2]) | int(x[3]) << 8
        qs = x[8:]
        for ib in range(8):
            ls = ((int(x[4 + ib // 2]) >> 4 * (ib % 2)) & 0xF) | (((scales_h >> 2 * ib) & 3) << 4)
            dl = np.float32(d * np.float32(ls - 32))
            for j in range(16):
                out[n, 32 * ib + j] = dl * kvalues[qs[16 * ib + j] & 0xF]
                out[n, 32 * ib + j + 16] = dl * kvalues[qs[16 * ib + j] >> 4]
    return out.reshape(raw.shape[0], -1)


def test_iq4_xs_decodes_bit_for_bit(rng):
    """Several rows of several super-blocks: the reference decode is gguf-py's dequantize and ggml's C loop, bit for
    bit (float32, no NaN), with every fp16 kind of ``d`` and all 64 sub-block scales and 16 codes reached."""
    rows, cols = 7, 1024
    raw = iq4_xs_blocks(rng, rows, cols)
    qt = records.build_record("model.layers.0.mlp.down_proj.weight", "IQ4_XS", raw, (rows, cols), IQ4_XS_SIZE)
    got = qt.decode()
    want = gguf.quants.dequantize(raw, T.IQ4_XS)
    assert got.dtype == np.float32 and want.dtype == np.float32 and not np.isnan(got).any()
    assert np.array_equal(got, want) and same_bits(got, want)
    assert same_bits(got, ggml_iq4_xs(raw))
    fields = records.blocks.unpack("IQ4_XS", raw, IQ4_XS_SIZE)
    assert fields["sc"].shape == (rows, cols // 32) and set(np.unique(fields["sc"])) == set(range(64))
    assert fields["codes"].shape == (rows, cols) and set(np.unique(fields["codes"])) == set(range(16))
    assert qt.bits_per_weight == pytest.approx(IQ4_XS_SIZE * 8 / 256 + 32 * 8 / (rows * cols), abs=1e-9)


def test_iq4_xs_tree_multiplies_in_gguf_py_grouping(rng):
    """``(d * (ls - 32)) * kvalues[q]``: the sub-block scale is an affine node of the 6-bit ``ls`` (zero 32, scale
    ``d`` per 8 sub-blocks) multiplying the table lookup. Every such product is exact in fp32 (fp16 ``d``: 11
    significant bits, ``|ls - 32| <= 32``: 6, ``|kvalues| <= 127``: 7), so the decode is the real product rounded
    once, whatever the grouping."""
    raw = iq4_xs_blocks(rng, 3, 512)
    qt = records.build_record("w", "IQ4_XS", raw, (3, 512), IQ4_XS_SIZE)
    weight = qt.record["weight"]
    assert (weight["codec"], weight["group_shape"], weight["input"]["codec"]) == ("scale", [1, 32], "lut")
    factor = weight["factor"]
    assert (factor["codec"], factor["bits"], factor["zero"], factor["group_shape"]) == ("affine", 6, 32, [1, 8])
    fields = records.blocks.unpack("IQ4_XS", raw, IQ4_XS_SIZE)
    d = np.repeat(fields["d"].astype(np.float64), 256, axis=1)
    ls = np.repeat(fields["sc"].astype(np.float64) - 32, 32, axis=1)
    exact = d * ls * np.array(records.IQ4_NL_VALUES, np.float64)[fields["codes"]]
    assert same_bits(qt.decode(), exact.astype(np.float32)) and np.array_equal(exact.astype(np.float32), exact)


def test_iq4_xs_numba_kernel_matches_the_reference_decode(rng):
    """The Numba kernel runs the imported tree: ``x @ W.T`` within fp32 accumulation rounding of the decode."""
    import torch
    from qformat_kernels.numba_plugin import NumbaKernel

    kernel = NumbaKernel()
    rows, cols = 24, 768
    raw = random_blocks("IQ4_XS", rows, cols, rng)
    qt = records.build_record("model.layers.0.mlp.up_proj.weight", "IQ4_XS", raw, (rows, cols), IQ4_XS_SIZE)
    assert kernel.supports(qt.record), kernel.why_unsupported(qt.record)
    prepared = kernel.prepare(qt, "cpu")
    weight = qt.decode().astype(np.float64)
    for batch in (1, 5):
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        y = prepared.matmul(torch.from_numpy(x)).double().numpy()
        bound = 1e-4 * (np.abs(x).astype(np.float64) @ np.abs(weight).T) + 1e-30
        assert np.max(np.abs(y - x.astype(np.float64) @ weight.T) / bound) <= 1.0
    assert np.array_equal(prepared.dequantize().numpy(), qt.decode())


def _tensor_info_offset(path: Path, tensor: str) -> int:
    """Byte offset of ``tensor``'s n_dims in its info entry (ne[0] follows at + 4)."""
    data = path.read_bytes()
    name = tensor.encode()
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def one_iq4_xs_tensor(path: Path, rng: np.random.Generator) -> Path:
    """A GGUF holding one IQ4_XS tensor [4, 512], the last bytes of the file."""
    w = gguf.GGUFWriter(str(path), "llama")
    raw = iq4_xs_blocks(rng, 4, 512)
    w.add_tensor("blk.0.ffn_down.weight", raw, raw_shape=raw.shape, raw_dtype=T.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_iq4_xs_truncated_or_bad_size(tmp_path, rng):
    source = one_iq4_xs_tensor(tmp_path / "one.gguf", rng)
    data = source.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-IQ4_XS_SIZE // 2])  # half of the last super-block
    with pytest.raises(SourceError, match=r"truncated: tensor data \(IQ4_XS, 1088 bytes\)") as info:
        GGUFImporter().open(cut)
    assert (info.value.file, info.value.tensor, info.value.field) == (str(cut), "blk.0.ffn_down.weight", "data")
    at = _tensor_info_offset(source, "blk.0.ffn_down.weight") + 4
    for ne0, message in ((500, "IQ4_XS rows of 500 elements are not whole blocks of 256"),
                         (768, r"truncated: tensor data \(IQ4_XS, 1632 bytes\)")):
        bad = tmp_path / f"ne{ne0}.gguf"
        bad.write_bytes(data[:at] + struct.pack("<Q", ne0) + data[at + 8:])
        with pytest.raises(SourceError, match=message) as info:
            GGUFImporter().open(bad)
        assert (info.value.file, info.value.tensor) == (str(bad), "blk.0.ffn_down.weight")


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_rows_is_the_format_layout(bits, rng):
    for cols in (7, 8, 37, 256):
        codes = rng.integers(0, 1 << bits, size=(5, cols)).astype(np.uint8)
        assert np.array_equal(records.pack_rows(codes, bits), bitpack.pack_codes(codes, bits))


# -- tiny GGUF files ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", np.random.default_rng(7))


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "untied.gguf", np.random.default_rng(8), tied=False,
                           extra_kv={"general.source.url": "https://huggingface.co/someorg/tiny-llama"})


def reference_state_dict(path: Path) -> dict[str, np.ndarray]:
    """transformers' own legacy GGUF load: gguf-py dequantize, its name map and TensorProcessor."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return {name: t.float().numpy() for name, t in tensors.items()}


def gguf_py_values(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """gguf-py's dequantize of every tensor of the file, by GGUF name: (type name, fp32 values)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def imported(path: Path) -> tuple[object, dict]:
    model = GGUFImporter().open(path)
    return model, dict(model.iter_tensors())


def test_tiny_llama_decodes_bit_exactly(tiny_gguf):
    model, tensors = imported(tiny_gguf)
    reference = reference_state_dict(tiny_gguf)
    assert set(tensors) == set(reference) and "lm_head.weight" not in tensors
    for name, value in tensors.items():
        got = value.decode() if hasattr(value, "decode") else np.asarray(value, np.float32)
        assert same_bits(got, reference[name]), name
    # every GGUF type of the file is a record (quantized) or a plain array in its stored dtype
    assert tensors["model.layers.1.mlp.gate_proj.weight"].dtype == np.float16
    assert str(tensors["model.layers.1.mlp.up_proj.weight"].dtype) == "bfloat16"
    assert tensors["model.norm.weight"].dtype == np.float32
    quantized = {v.record["info"]["gguf_type"] for v in tensors.values() if hasattr(v, "record")}
    assert quantized == set(records.SUPPORTED) - {"Q6_K"}  # Q6_K is the untied output layer's
    assert model.config["tie_word_embeddings"] is True and model.config["hidden_size"] == HIDDEN
    assert model.config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in model.config
    assert model.details["permuted_rows"] == [f"model.layers.{i}.self_attn.{p}_proj.weight"
                                              for i in range(LAYERS) for p in ("q", "k")]
    assert model.source_format.startswith("gguf Q4_K_M (") and "5 F32" in model.source_format
    assert "1 IQ4_XS" in model.source_format
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(model.files)
    assert model.base_model is None
    assert not hasattr(gguf.get_tensor_name_map, "cache_info")  # the importer's memoized name map is undone


def test_rows_follow_transformers_permutation(tiny_gguf):
    """q/k rows are permuted as transformers' reverse_permute_weights does; the blocks move with their rows."""
    _, tensors = imported(tiny_gguf)
    values = gguf_py_values(tiny_gguf)
    _, q = values["blk.0.attn_q.weight"]
    head_dim = HIDDEN // HEADS // 2
    expected = q.reshape(HEADS, head_dim, 2, HIDDEN).swapaxes(1, 2).reshape(HIDDEN, HIDDEN)
    assert same_bits(tensors["model.layers.0.self_attn.q_proj.weight"].decode(), expected)
    _, v = values["blk.0.attn_v.weight"]
    assert same_bits(tensors["model.layers.0.self_attn.v_proj.weight"].decode(), v)


def test_untied_output_and_base_model(tiny_untied):
    model, tensors = imported(tiny_untied)
    assert model.config["tie_word_embeddings"] is False
    assert tensors["lm_head.weight"].record["info"]["gguf_type"] == "Q6_K"
    reference = reference_state_dict(tiny_untied)
    assert same_bits(tensors["lm_head.weight"].decode(), reference["lm_head.weight"])
    assert model.base_model == "someorg/tiny-llama"
    assert model.details["types"]["Q6_K"] == 1


def test_source_bits_are_the_gguf_bytes(tiny_gguf):
    model, tensors = imported(tiny_gguf)
    reader = gguf.GGUFReader(str(tiny_gguf))
    quant = [t for t in reader.tensors if t.tensor_type.name in records.SUPPORTED]
    assert model.source_bits == pytest.approx(sum(int(t.n_bytes) for t in quant) * 8
                                              / sum(int(t.n_elements) for t in quant))
    recs = [v for v in tensors.values() if hasattr(v, "record")]
    ours = sum(r.record["storage_bytes"] for r in recs) * 8 / sum(int(np.prod(r.record["shape"])) for r in recs)
    assert ours == pytest.approx(model.source_bits, rel=0.01)


def test_header_walk_reads_the_table_as_gguf_py_does(tiny_gguf):
    from qformat_plugins._gguf_scan import scan

    header = scan(tiny_gguf, records.SUPPORTED)
    reader = gguf.GGUFReader(str(tiny_gguf))
    assert [(e.name, header.data_start + e.offset, e.nbytes, e.type_id) for e in header.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes), int(t.tensor_type)) for t in reader.tensors]


def test_tensors_are_streamed_one_at_a_time(tiny_gguf):
    model = GGUFImporter().open(tiny_gguf)
    first = model.iter_tensors()
    name, _ = next(first)
    again = next(model.iter_tensors())  # a fresh iterator each time
    assert again[0] == name == "model.embed_tokens.weight"


def test_import_checkpoint_writes_a_folder_that_decodes_the_same(tiny_gguf, tmp_path):
    from qformat.conversion.importing import import_checkpoint
    from qformat.format import open_folder

    result = import_checkpoint(tiny_gguf, tmp_path / "out")
    reference = reference_state_dict(tiny_gguf)
    folder = open_folder(tmp_path / "out")
    try:
        assert set(folder.records) | set(folder.plain_names) == set(reference)
        for name in folder.records:
            assert same_bits(folder.decode(name), reference[name]), name
        assert str(folder.tensor("model.layers.1.mlp.up_proj.weight").dtype) == "bfloat16"
    finally:
        folder.close()
    assert result.records == 13 and result.source_bits == pytest.approx(result.bits_per_weight, rel=0.01)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_processor_probe():
    from qformat_plugins import _gguf_hf as hf
    from transformers.modeling_gguf_pytorch_utils import (
        Gemma2TensorProcessor,
        GGUFTensor,
        LlamaTensorProcessor,
        TensorProcessor,
    )

    key_map = {"blk.0.attn_q.weight": "q", "blk.0.attn_v.weight": "v", "blk.0.attn_norm.weight": "n"}
    llama = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    q = hf.probe_rows(llama, "blk.0.attn_q.weight", (256, 256), key_map)
    assert q.hf_name == "q" and q.kind == hf.PERMUTE and sorted(q.perm) == list(range(256))
    assert hf.probe_rows(llama, "blk.0.attn_v.weight", (128, 256), key_map).kind == hf.IDENTITY
    assert hf.probe_rows(llama, "blk.9.attn_v.weight", (128, 256), key_map).hf_name is None  # not a parameter
    gemma = Gemma2TensorProcessor()
    assert hf.probe_rows(gemma, "blk.0.attn_norm.weight", (256,), key_map).kind == hf.VALUES  # w - 1

    class ColumnSwap(TensorProcessor):  # moves columns across quantization blocks: not a row permutation
        def process(self, weights, name, **kwargs):
            return GGUFTensor(weights[:, ::-1], name, {})

    assert hf.probe_rows(ColumnSwap(), "blk.0.attn_v.weight", (128, 256), key_map).kind == hf.VALUES


@pytest.mark.parametrize(("metadata", "expected"), [
    ({"general.source.url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"},
     "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ({"general.source.huggingface.repository": "org/model", "general.base_model.0.repo_url":
      "https://huggingface.co/org/base"}, "org/model"),
    ({"general.base_model.0.repo_url": "https://huggingface.co/org/base/tree/main"}, "org/base"),
    ({"general.base_model.0.organization": "Org", "general.base_model.0.name": "Model-7B"}, "Org/Model-7B"),
    ({"general.base_model.0.organization": "Hugging Face", "general.base_model.0.name": "SmolLM2 135M"}, None),
    ({"general.source.url": "https://github.com/org/repo"}, None),
    ({}, None),
])
def test_base_model_from_metadata(metadata, expected):
    from qformat_plugins._gguf_hf import base_model

    assert base_model(metadata) == expected


# -- detection ----------------------------------------------------------------------------------------------------


def test_detect(tiny_gguf, tmp_path):
    importer = GGUFImporter()
    assert importer.detect(tiny_gguf)
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    assert importer.detect(folder) and gguf_file(folder) == folder / "model.gguf"
    (folder / "config.json").write_text("{}")  # a Hugging Face folder is converted with a method, not imported
    assert not importer.detect(folder)
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(tiny_gguf.read_bytes())
    assert not importer.detect(two)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGML" + bytes(100))
    assert not importer.detect(fake) and not importer.detect(tmp_path / "missing.gguf")


def test_registered_through_the_entry_point():
    from qformat.plugins import get_plugins

    plugins = get_plugins()
    assert isinstance(plugins.importers.get("gguf"), GGUFImporter)
    assert plugins.importer_owner["gguf"] == "import_gguf"


# -- bad files ----------------------------------------------------------------------------------------------------


def _type_field_offset(path: Path, tensor: str) -> int:
    """Byte offset of the ggml type id in ``tensor``'s info entry."""
    data = path.read_bytes()
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def test_truncated_file(tiny_gguf, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:-1000])
    with pytest.raises(SourceError, match="truncated") as info:
        GGUFImporter().open(bad)
    assert info.value.file == str(bad) and info.value.tensor == "output_norm.weight" and info.value.field == "data"
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(tiny_gguf.read_bytes()[:300])
    with pytest.raises(SourceError, match="truncated") as info:
        GGUFImporter().open(header_cut)
    assert info.value.file == str(header_cut) and info.value.field


def test_unknown_type_id(tiny_gguf, tmp_path):
    data = bytearray(tiny_gguf.read_bytes())
    at = _type_field_offset(tiny_gguf, "blk.0.ffn_up.weight")
    data[at:at + 4] = struct.pack("<I", 250)
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="unknown GGUF tensor type id 250") as info:
        GGUFImporter().open(bad)
    assert (info.value.file, info.value.tensor, info.value.field) == (str(bad), "blk.0.ffn_up.weight", "type")
    assert "Q4_K" in str(info.value)  # the supported types are listed


def test_unsupported_type(tmp_path, rng):
    bad = write_tiny_gguf(tmp_path / "iq2.gguf", rng, types={"blk.0.ffn_up": "IQ2_XXS"})
    with pytest.raises(SourceError, match="GGUF type IQ2_XXS is not supported; supported: Q4_0") as info:
        GGUFImporter().open(bad)
    assert info.value.tensor == "blk.0.ffn_up.weight (model.layers.0.mlp.up_proj.weight)"
    assert (info.value.file, info.value.field) == (str(bad), "type")


def test_shape_mismatch(tmp_path, rng):
    bad = write_tiny_gguf(tmp_path / "shape.gguf", rng, shapes={"blk.1.attn_q": (HIDDEN + 32, HIDDEN)})
    with pytest.raises(SourceError, match=r"shape \[288, 256\] \(Q3_K\) does not match \[256, 256\]") as info:
        GGUFImporter().open(bad)
    assert info.value.tensor == "blk.1.attn_q.weight (model.layers.1.self_attn.q_proj.weight)"
    assert (info.value.file, info.value.field) == (str(bad), "shape")


def test_unknown_architecture(tmp_path, rng):
    bad = write_tiny_gguf(tmp_path / "arch.gguf", rng, arch="nosucharch")
    with pytest.raises(SourceError, match="nosucharch") as info:
        GGUFImporter().open(bad)
    assert (info.value.file, info.value.field) == (str(bad), "general.architecture")


def test_not_a_gguf(tmp_path):
    with pytest.raises(SourceError) as info:
        GGUFImporter().open(tmp_path)
    assert info.value.file == str(tmp_path)


# -- the real SmolLM2 Q4_1 GGUF -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_q4_1_bit_exact():
    path = smollm2_gguf()
    start = time.perf_counter()
    model, tensors = imported(path)
    seconds = time.perf_counter() - start
    reference = reference_state_dict(path)
    assert set(tensors) == set(reference)
    recs = {n: v for n, v in tensors.items() if hasattr(v, "record")}
    assert len(recs) == 211 and len(tensors) - len(recs) == 61
    for name, value in tensors.items():
        got = value.decode() if hasattr(value, "decode") else np.asarray(value, np.float32)
        assert same_bits(got, reference[name]), name
    assert recs["model.embed_tokens.weight"].record["info"]["gguf_type"] == "Q8_0"
    assert model.config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    assert model.source_format == "gguf Q4_1 (210 Q4_1, 61 F32, 1 Q8_0)"
    ours = (sum(r.record["storage_bytes"] for r in recs.values()) * 8
            / sum(int(np.prod(r.record["shape"])) for r in recs.values()))
    print(f"SmolLM2 Q4_1: {len(recs)} records bit-exact, bits/weight ours {ours:.4f} vs GGUF {model.source_bits:.4f}, "
          f"open + read {seconds:.1f} s")
    assert ours == pytest.approx(model.source_bits, abs=1e-9)


@pytest.mark.slow
def test_smollm2_config_and_tokenizer_are_transformers_own(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = smollm2_gguf()
    model = GGUFImporter().open(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    ours = dict(model.config)
    for key in ("_name_or_path", "architectures", "dtype"):
        ours.pop(key, None), config.pop(key, None)
    assert ours == config
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert model.files[name] == (tmp_path / name).read_bytes()


@pytest.mark.slow
def test_smollm2_imported_perplexity_equals_the_fp32_expansion(tmp_path):
    """Same weights, same numbers: the imported folder through qformat's kernels and transformers' fp32 expansion of the
    GGUF give the same perplexity to the last printed digit (measured: 12.160764945774254 both, 4 x 512 tokens of the
    shipped evaluation text), and the folder on disk is the GGUF's size give or take its vocabulary metadata."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qformat
    from qformat.conversion.gguf import expand_gguf
    from qformat.conversion.importing import import_checkpoint
    from qformat.conversion.quality import resolve_eval_text
    from qformat.runtime.evaluate import perplexity, tokenize_file

    path = smollm2_gguf()
    result = import_checkpoint(path, tmp_path / "imported")
    assert result.records == 211 and result.bits_per_weight == pytest.approx(result.source_bits, abs=1e-9)
    size = sum(f.stat().st_size for f in (tmp_path / "imported").glob("*.safetensors"))
    assert 0.95 < size / path.stat().st_size < 1.0  # the GGUF also holds the vocabulary; the tokenizer is beside ours
    text = resolve_eval_text("default")
    ids = tokenize_file(AutoTokenizer.from_pretrained(tmp_path / "imported"), text)
    ours = perplexity(qformat.load(tmp_path / "imported"), ids, seqlen=512, limit=4).ppl
    fp32 = AutoModelForCausalLM.from_pretrained(expand_gguf(path), dtype=torch.float32).eval()
    theirs = perplexity(fp32, ids, seqlen=512, limit=4).ppl
    print(f"SmolLM2 Q4_1 imported: perplexity {ours!r} (qformat kernels) vs {theirs!r} (transformers fp32 expansion)")
    assert f"{ours:.3f}" == f"{theirs:.3f}"
