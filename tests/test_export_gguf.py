"""The GGUF exporter (plugins/export_gguf.py): what it writes, gguf-py dequantizes bit for bit to the folder's reference
decode. An imported GGUF exports to the same tensor bytes and types (every supported type, on a tiny GGUF written
here; slow: the real SmolLM2-135M-Instruct Q4_1 GGUF, which llama.cpp then runs to the same tokens); our methods' trees
export exactly where a GGUF type holds them and are listed, or re-quantized with --allow-requant, where none does."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_fixtures import LAYERS, QUANTIZABLE, gguf_blocks, smollm2_gguf, write_tiny_gguf
from gguf_fixtures import random_blocks as any_blocks
from qformat_plugins import _gguf_records as import_records
from qformat_plugins._export_affine import Tree
from qformat_plugins._export_gguf_records import candidates, dequantize, to_blocks
from qformat_plugins.export_gguf import GGUFExporter
from tiny_model import make_tiny_llama

from qformat.api import convert
from qformat.cli import main
from qformat.conversion.importing import import_checkpoint
from qformat.exporters import InexpressibleError, RequantizedWarning, same_bits
from qformat.format import RecordBuilder, open_folder

# the tiny models' byte-level tokenizers have a pre-tokenizer llama.cpp does not know: exported as "default"
pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer's pre-tokenizer:qformat.exporters.ExportWarning",
                                        "ignore:tokens beyond the model's:qformat.exporters.ExportWarning")
SUPPORTED = import_records.SUPPORTED


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Any bytes for the codes and finite fp16 scales, or gguf-py's quantizer's blocks (TQ1_0 always: its base-3
    bytes are canonical only as gguf-py writes them)."""
    if type_name in QUANTIZABLE and (type_name == "TQ1_0" or rng.random() < 0.5):
        return gguf_blocks(type_name, rows, cols, rng)
    return any_blocks(type_name, rows, cols, rng)


def llama_rows(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, as an index: GGUF row i is HF row order[i]."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def gguf_tensors(path: Path) -> dict[str, tuple[str, bytes, tuple[int, ...]]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, t.data.tobytes(), tuple(int(d) for d in t.shape)) for t in reader.tensors}


def assert_decodes_to_folder(path: Path, folder_path: Path, report) -> None:
    """Every tensor of the GGUF, dequantized by gguf-py (rows back in transformers' order), equals the folder's
    reference decode (plain tensors: their stored values), bit for bit."""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    folder = open_folder(folder_path)
    config = folder.config
    try:
        for item in report.tensors:
            if item.name.startswith("("):
                continue
            tensor = by_name[item.target]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            want = folder.decode(item.name)
            values = values.reshape(np.shape(want))
            if item.name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                heads = config["num_attention_heads"] if "q_proj" in item.name else config["num_key_value_heads"]
                values = values[np.argsort(llama_rows(values.shape[0], heads))]
            assert same_bits(values, np.asarray(want, np.float32)), item.name
    finally:
        folder.close()


# -- one record per type ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_every_imported_type_exports_to_its_own_bytes(type_name, rng):
    """The importer's tree of each GGUF type is recognised and packed back to the same blocks; gguf-py's dequantize
    of them is the record's reference decode."""
    for _ in range(3):
        rows, cols = 6, 512
        raw = random_blocks(type_name, rows, cols, rng)
        qt = import_records.build_record("model.layers.0.mlp.up_proj.weight", type_name, raw, (rows, cols),
                                         GGML_QUANT_SIZES[T[type_name]][1])
        (found, fields), *_ = candidates(Tree(qt))
        assert found == type_name
        blocks = to_blocks(found, fields)
        assert np.array_equal(blocks, raw)
        assert same_bits(dequantize(blocks, found), qt.decode())


def test_iq4_xs_needs_its_own_sub_scales(rng):
    """IQ4_XS is recognised by its whole tree: a sub-scale zero other than 32 or sub-scales wider than 6 bits are
    no GGUF layout (the same lut under a plain fp16 factor per 32 columns is IQ4_NL)."""
    from qformat_plugins._export_affine import NotExpressible

    rows, cols = 4, 512

    def lut_times(factor) -> Tree:
        b = RecordBuilder("model.layers.0.mlp.up_proj.weight", (rows, cols))
        table = b.tensor("table", np.array(import_records.IQ4_NL_VALUES, np.float16))
        return Tree(b.finish(b.scale(b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), table),
                                     factor(b), (1, 32))))

    def sub_scales(zero: int, bits: int):
        d = (rng.standard_normal((rows, cols // 256)) * 0.05).astype(np.float16)
        return lambda b: b.affine(b.packed("sc", rng.integers(0, 1 << bits, (rows, cols // 32)), bits),
                                  scale=b.tensor("d", d), zero=zero, bits=bits, group_shape=(1, 8))

    assert candidates(lut_times(sub_scales(32, 6)))[0][0] == "IQ4_XS"
    for zero, bits in ((31, 6), (32, 7)):
        with pytest.raises(NotExpressible):
            candidates(lut_times(sub_scales(zero, bits)))
    per_32 = (rng.random((rows, cols // 32)) * 0.01).astype(np.float16)
    assert candidates(lut_times(lambda b: b.tensor("scale", per_32)))[0][0] == "IQ4_NL"


def affine(bits: int, group: int, zero, scale: np.ndarray, codes: np.ndarray, offset=None):
    b = RecordBuilder("model.layers.0.mlp.up_proj.weight", codes.shape)
    zero_node = zero if zero is None or isinstance(zero, (int, float)) else b.packed("zero", zero, bits)
    node = b.affine(b.packed("codes", codes, bits), scale=b.tensor("scale", scale), zero=zero_node, bits=bits,
                    group_shape=(1, group), offset=None if offset is None else b.tensor("offset", offset))
    return b.finish(node)


@pytest.mark.parametrize(("bits", "group", "sym", "expected"), [
    (4, 32, True, "Q4_0"), (4, 128, True, "Q4_0"), (4, 256, True, "Q4_0"), (8, 32, True, "Q8_0"),
    (8, 64, True, "Q8_0"), (3, 32, True, "Q4_0"), (2, 64, False, "Q4_0"), (3, 32, False, "Q4_0"),
    (5, 32, True, "Q5_0"), (4, 32, False, "Q5_0"), (4, 128, False, "Q5_0")])
def test_affine_trees_take_the_smallest_exact_type(bits, group, sym, expected, rng):
    """Our methods' trees (fp16 scale per group, integer zero): the scale of a group wider than 32 columns repeats
    over its 32-column blocks; (q - z) must fit the type's signed range."""
    rows, cols = 8, 256
    codes = rng.integers(0, 1 << bits, size=(rows, cols)).astype(np.uint8)
    scale = (rng.random((rows, cols // group)) * 0.02 + 0.001).astype(np.float16)
    zero = float(1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, size=(rows, cols // group)).astype(np.uint8)
    qt = affine(bits, group, zero, scale, codes)
    options = candidates(Tree(qt))
    assert options[0][0] == expected
    blocks = to_blocks(*options[0])
    assert same_bits(dequantize(blocks, expected), qt.decode())


def test_asymmetric_4_bit_is_q4_1_when_the_minimum_is_an_fp16_value(rng):
    """Q4_1's m = -z·s must be exactly an fp16 value: powers of two for the scale make it so."""
    rows, cols = 4, 128
    codes = rng.integers(0, 16, size=(rows, cols)).astype(np.uint8)
    scale = (2.0 ** -rng.integers(4, 9, size=(rows, cols // 32))).astype(np.float16)
    zero = rng.integers(0, 16, size=(rows, cols // 32)).astype(np.uint8)
    qt = affine(4, 32, zero, scale, codes)
    assert [t for t, _ in candidates(Tree(qt))][:2] == ["Q4_1", "Q5_0"]
    assert same_bits(dequantize(to_blocks(*candidates(Tree(qt))[0]), "Q4_1"), qt.decode())


@pytest.mark.parametrize(("case", "reason"), [
    ("group16", "changes inside blocks of 32"), ("fp32_scale", "not exactly representable in fp16"),
    ("float_zero", "not an integer"), ("asym8", "wider than Q4_0/Q5_0/Q8_0"), ("cols", "not whole 32-column")])
def test_trees_no_gguf_type_holds(case, reason, rng):
    from qformat_plugins._export_affine import NotExpressible

    rows, cols = 4, 80 if case == "cols" else 128
    bits = 8 if case == "asym8" else 4
    group = 16 if case == "group16" else 32
    codes = rng.integers(0, 1 << bits, size=(rows, cols)).astype(np.uint8)
    scale = (rng.random((rows, -(-cols // group))) * 0.02 + 0.001).astype(np.float32 if case == "fp32_scale"
                                                                             else np.float16)
    zero = rng.integers(0, 1 << bits, size=scale.shape).astype(np.uint8)
    if case == "asym8":
        codes[0, 0], zero[0, 0] = 255, 0
    if case == "float_zero":
        b = RecordBuilder("w", (rows, cols))
        node = b.affine(b.packed("codes", codes, bits), scale=b.tensor("scale", scale.astype(np.float16)),
                        zero=b.tensor("zero", (zero + 0.5).astype(np.float16)), bits=bits, group_shape=(1, group))
        qt = b.finish(node)
    else:
        qt = affine(bits, group, zero, scale, codes)
    with pytest.raises(NotExpressible, match=reason):
        candidates(Tree(qt))


# -- a tiny GGUF of every type: import, export, same bytes --------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_of_every_type_round_trips(tied, tmp_path, rng):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", rng, tied=tied, blocks=random_blocks)
    import_checkpoint(source, tmp_path / "imported")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizedWarning)
        report = GGUFExporter().export(tmp_path / "imported", tmp_path / "out.gguf")
    original, exported = gguf_tensors(source), gguf_tensors(tmp_path / "out.gguf")
    assert set(exported) == set(original) and ("output.weight" in exported) == (not tied)
    for name, (type_name, data, shape) in original.items():
        assert exported[name] == (type_name, data, shape), name
    assert {t.kind for t in report.tensors} == {*SUPPORTED, "F32", "F16", "BF16"} - ({"Q6_K"} if tied else set())
    assert all(t.exact for t in report.tensors)
    assert_decodes_to_folder(tmp_path / "out.gguf", tmp_path / "imported", report)
    meta = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    assert meta["general.architecture"].contents() == "llama" and meta["llama.block_count"].contents() == LAYERS
    assert meta["general.quantized_by"].contents() == "qformat"
    assert meta["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)  # the source's own
    assert meta["tokenizer.ggml.model"].contents() == "gpt2"
    assert meta["tokenizer.ggml.tokens"].contents()[:4] == ["<s0>", "<s1>", "<s2>", "A"]
    assert meta["tokenizer.ggml.bos_token_id"].contents() == 0


# -- models converted by our own methods ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gguf-export") / "tiny", layers=2, hidden=128, intermediate=256)


def rtn(tiny: Path, out: Path, **params) -> Path:
    convert(tiny, out, "rtn", params=params, quiet=True, output_layer="keep")  # one method's trees throughout
    return out


@pytest.mark.parametrize(("params", "kind"), [
    ({"bits": 4, "group_size": 32, "sym": True}, "Q4_0"), ({"bits": 8, "group_size": 32, "sym": True}, "Q8_0"),
    ({"bits": 4, "group_size": 32, "sym": False}, None), ({"bits": 4, "group_size": 128, "sym": True}, "Q4_0")])
def test_rtn_models_export_exactly(tiny, tmp_path, params, kind):
    folder = rtn(tiny, tmp_path / "rtn", **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizedWarning)
        report = GGUFExporter().export(folder, tmp_path / "out.gguf")
    quantized = [t for t in report.tensors if t.kind not in ("F32", "F16", "BF16")]
    assert len(quantized) == 14 and all(t.exact for t in report.tensors)
    if kind is not None:
        assert {t.kind for t in quantized} == {kind}
    else:  # asymmetric 4-bit: Q4_1 where -z·s is an fp16 value, else Q5_0 (always exact)
        assert {t.kind for t in quantized} <= {"Q4_1", "Q5_0"}
    assert_decodes_to_folder(tmp_path / "out.gguf", folder, report)
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert "output.weight" in gguf_tensors(tmp_path / "out.gguf")  # make_tiny_llama does not tie


def test_the_default_8_bit_output_layer_is_exactly_q8_0(tiny, tmp_path):
    """The converter's default output layer (8 bits per output channel, symmetric) repeats each row's scale in every
    32-column block: Q8_0, exact, beside the Q4_0 blocks of the method."""
    folder = tmp_path / "q"
    convert(tiny, folder, "rtn", params={"bits": 4, "group_size": 32, "sym": True}, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizedWarning)
        report = GGUFExporter().export(folder, tmp_path / "out.gguf")
    assert all(t.exact for t in report.tensors)
    assert gguf_tensors(tmp_path / "out.gguf")["output.weight"][0] == "Q8_0"
    assert gguf_tensors(tmp_path / "out.gguf")["blk.0.ffn_up.weight"][0] == "Q4_0"
    assert_decodes_to_folder(tmp_path / "out.gguf", folder, report)


def test_a_tree_no_type_holds_is_listed_then_requantized(tiny, tmp_path, capsys):
    """Groups of 16 columns: two scales in one 32-column block. Every such tensor is listed (name and tree signature)
    and nothing is written; --allow-requant re-quantizes just those, with a warning giving each relative error."""
    folder = rtn(tiny, tmp_path / "g16", bits=4, group_size=16, sym=False)
    out = tmp_path / "out.gguf"
    with pytest.raises(InexpressibleError) as info:
        GGUFExporter().export(folder, out)
    assert len(info.value.tensors) == 14
    assert {t.signature for t in info.value.tensors} == {"affine[4](packed[4],tensor,packed[4])"}
    assert all("changes inside blocks of 32" in t.reason for t in info.value.tensors)
    assert "model.layers.1.mlp.down_proj.weight" in str(info.value) and "--allow-requant" in str(info.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code = main(["export", "--to", "gguf", str(folder), str(out)])
    assert code == 1 and not out.exists()
    assert "14 tensor(s)" in capsys.readouterr().err
    with pytest.warns(RequantizedWarning, match="relative error"):
        report = GGUFExporter().export(folder, out, allow_requant=True)
    requantized = report.requantized
    assert len(requantized) == 14 and {t.kind for t in requantized} == {"Q4_1"}
    assert all(0 < t.relative_error < 0.2 for t in requantized)
    assert gguf_tensors(out)["blk.0.ffn_up.weight"][0] == "Q4_1"


def test_cli_export_json(tiny, tmp_path, capsys):
    folder = rtn(tiny, tmp_path / "rtn", bits=8, group_size=32, sym=True)
    code = main(["export", "--to", "gguf", str(folder), str(tmp_path / "m.gguf"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["exporter"] == "gguf" and report["kinds"]["Q8_0"] == 14 and report["exact"] == report["tensors"]
    assert main(["export", "--to", "gguf", str(folder), str(tmp_path / "m.gguf")]) == 1  # the output exists
    assert "exists" in capsys.readouterr().err
    assert main(["export", "--to", "nosuch", str(folder), str(tmp_path / "x")]) == 1
    assert "installed exporters" in capsys.readouterr().err


def test_listed_by_qformat_plugins(capsys):
    assert main(["plugins"]) == 0
    assert "exporter gguf (qformat export --to gguf DIR OUT)" in capsys.readouterr().out


# -- the real SmolLM2-135M-Instruct Q4_1 GGUF (slow) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_exported(tmp_path_factory) -> tuple[Path, Path, object, dict]:
    work = tmp_path_factory.mktemp("smollm2")
    start = time.perf_counter()
    import_checkpoint(smollm2_gguf(), work / "imported")
    imported = time.perf_counter()
    report = GGUFExporter().export(work / "imported", work / "smollm2.gguf")
    timings = {"import": imported - start, "export": time.perf_counter() - imported}
    return smollm2_gguf(), work / "smollm2.gguf", report, timings


@pytest.mark.slow
def test_smollm2_round_trip_is_byte_identical(smollm2_exported):
    source, exported, report, timings = smollm2_exported
    original, ours = gguf_tensors(source), gguf_tensors(exported)
    assert set(ours) == set(original) and len(ours) == 272
    assert [n for n in original if ours[n] != original[n]] == []
    assert report.kinds == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and all(t.exact for t in report.tensors)
    fields = gguf.GGUFReader(str(exported)).fields
    theirs = gguf.GGUFReader(str(source)).fields
    for key in ("general.architecture", "general.name", "general.file_type", "llama.block_count",
                "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "general.quantization_version"):
        assert fields[key].contents() == theirs[key].contents(), key
    print(f"SmolLM2 Q4_1: {len(ours)} tensors byte-identical; import {timings['import']:.1f} s, "
          f"export {timings['export']:.1f} s")


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_runs_the_exported_smollm2_to_the_same_tokens(smollm2_exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    source, exported, _, _ = smollm2_exported
    tokens = {}
    for label, path in (("original", source), ("exported", exported)):
        llm = llama_cpp.Llama(model_path=str(path), n_threads=2, verbose=False, n_ctx=256, seed=0)
        prompt = llm.tokenize(b"The capital of France is", add_bos=True, special=True)
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == 16:
                break
        tokens[label] = (prompt, out, llm.detokenize(out).decode("utf-8", "replace"))
        del llm
    print(f"llama.cpp greedy 16 tokens: original {tokens['original'][1]} {tokens['original'][2]!r}; "
          f"exported {tokens['exported'][1]} {tokens['exported'][2]!r}")
    assert tokens["exported"][:2] == tokens["original"][:2] and len(tokens["original"][1]) == 16


def tiny_qwen2(folder: Path) -> Path:
    import torch
    from tiny_model import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=1)
    Qwen2ForCausalLM(config).save_pretrained(str(folder))
    make_tokenizer(folder, 512)
    return folder


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_computes_what_the_folder_computes(arch, tiny, tmp_path):
    """Names, q/k row order, hyperparameters: llama.cpp's logits on the exported file match transformers' on the
    folder's reference decode (within llama.cpp's own activation rounding: it multiplies Q4_0 weights by Q8_0
    activations), for a Llama (permuted q/k rows) and a Qwen2 (attention biases, tied embedding)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from qformat.api import load_dequantized

    source = tiny if arch == "llama" else tiny_qwen2(tmp_path / "qwen2")
    folder = rtn(source, tmp_path / "rtn", bits=4, group_size=32, sym=True)
    GGUFExporter().export(folder, tmp_path / "m.gguf")
    ids = [5, 17, 99, 250, 3, 77, 401, 12]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_threads=2, verbose=False, logits_all=True, n_ctx=64)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = load_dequantized(folder)(torch.tensor([ids])).logits[0].float().numpy()
    assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 0.03
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.75


def test_the_check_catches_blocks_gguf_py_reads_differently(tiny, tmp_path, monkeypatch):
    """Blocks that gguf-py dequantizes to anything but the reference decode make the record inexpressible."""
    from qformat_plugins import export_gguf

    folder = rtn(tiny, tmp_path / "rtn", bits=4, group_size=32, sym=True)

    def off_by_one(type_name, fields):
        blocks = to_blocks(type_name, fields)
        blocks[0, -1] ^= 1
        return blocks

    monkeypatch.setattr(export_gguf, "to_blocks", off_by_one)
    with pytest.raises(InexpressibleError) as info:
        GGUFExporter().export(folder, tmp_path / "out.gguf")
    assert len(info.value.tensors) == 14
    assert all("dequantizes the Q4_0 blocks differently" in t.reason for t in info.value.tensors)
    assert not (tmp_path / "out.gguf").exists()
