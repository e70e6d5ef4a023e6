"""Every codec's validation: each error code is raised where the spec says, and the message names file, tensor, field.

Files are assembled with the conformance generator's raw writer (which never validates), then opened and decoded
through the public reader, so these tests see exactly what a user of a malformed file would see.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import make_affine_record
from qformat_conformance.generate import file_of

from qformat.errors import FormatError, UnknownCodecError
from qformat.format import QuantizedTensor, RecordBuilder, bitpack, open_file, signature, write_file
from qformat.format.codecs import CORE_CODECS, Codec, NodeInfo

NAME = "model.layers.0.mlp.up_proj.weight"
F16 = np.float16


def write(tmp_path: Path, qts: list[QuantizedTensor], edit: Callable[[dict, dict], None] | None = None,
          plain: dict | None = None) -> Path:
    path = tmp_path / "case.safetensors"
    path.write_bytes(file_of(qts, plain, edit).to_bytes())
    return path


def open_and_decode(path: Path) -> None:
    qfile = open_file(path)
    for name in qfile.records:
        qfile.decode(name)


def assert_error(path: Path, code: str, tensor: str | None, fld: str | None, stage: str) -> FormatError:
    if stage == "open":
        with pytest.raises(FormatError) as info:
            open_file(path)
    else:
        qfile = open_file(path)  # structure is fine: only the data is wrong
        with pytest.raises(FormatError) as info:
            for name in qfile.records:
                qfile.decode(name)
    exc = info.value
    assert exc.code == code, str(exc)
    assert exc.file == str(path) and str(path) in str(exc)
    if tensor:
        assert exc.tensor == tensor and repr(tensor) in str(exc)
    if fld:
        assert exc.field == fld and repr(fld) in str(exc)
    return exc


def node(record: dict, *path) -> dict:
    value = record["weight"]
    for key in path:
        value = value[key]
    return value


def setter(path: tuple, key: str, value) -> Callable[[dict, dict], None]:
    def edit(records: dict, tensors: dict) -> None:
        node(records[NAME], *path)[key] = value
    return edit


def retensor(role: str, array: np.ndarray) -> Callable[[dict, dict], None]:
    """Replace a tensor and fix storage_bytes so only the intended problem remains."""
    def edit(records: dict, tensors: dict) -> None:
        key = f"{NAME}.{role}"
        records[NAME]["storage_bytes"] += array.nbytes - tensors[key].nbytes
        tensors[key] = array
    return edit


def both(*edits: Callable[[dict, dict], None]) -> Callable[[dict, dict], None]:
    def edit(records: dict, tensors: dict) -> None:
        for e in edits:
            e(records, tensors)
    return edit


# -- record builders for the cases --------------------------------------------------------------------------------

def affine() -> QuantizedTensor:
    return make_affine_record(NAME)


def lut(table_shape=(16,), group=None) -> QuantizedTensor:
    b = RecordBuilder(NAME, (4, 8))
    table = b.tensor("table", np.linspace(-1, 1, int(np.prod(table_shape))).astype(np.float32).reshape(table_shape))
    return b.finish(b.lut(b.packed("codes", np.arange(32).reshape(4, 8) % 16, 4), table, group_shape=group))


def scale() -> QuantizedTensor:
    b = RecordBuilder(NAME, (4, 8))
    return b.finish(b.scale(b.tensor("x", np.ones((4, 8), F16)), b.tensor("f", np.ones((4, 1), F16)), (1, 8)))


def vq() -> QuantizedTensor:
    b = RecordBuilder(NAME, (2, 16))
    return b.finish(b.vq(b.packed("codes", np.arange(8).reshape(2, 4), 4), b.tensor("books", np.ones((1, 16, 4), F16))))


def sparse() -> QuantizedTensor:
    b = RecordBuilder(NAME, (3, 6))
    dense = np.zeros((3, 6), F16)
    dense[0, 1], dense[0, 4], dense[2, 5] = 1, 2, 3
    return b.finish(b.sparse_from_dense("o", dense))


def lowrank() -> QuantizedTensor:
    b = RecordBuilder(NAME, (4, 6))
    return b.finish(b.lowrank(b.tensor("a", np.ones((4, 2), F16)), b.tensor("b", np.ones((2, 6), F16))))


def sign_lowrank() -> QuantizedTensor:
    b = RecordBuilder(NAME, (4, 6))
    return b.finish(b.sign_lowrank(b.packed("sign", np.ones((4, 6), int), 1), b.tensor("u", np.ones((4, 1), F16)),
                                   b.tensor("v", np.ones((1, 6), F16))))


def summed() -> QuantizedTensor:
    b = RecordBuilder(NAME, (2, 3))
    return b.finish(b.sum([b.tensor("a", np.ones((2, 3), F16)), b.tensor("b", np.ones((2, 3), F16))]))


def permuted() -> QuantizedTensor:
    b = RecordBuilder(NAME, (2, 5))
    return b.finish(b.permute(b.tensor("x", np.ones((2, 5), F16)), np.array([4, 0, 3, 1, 2])))


def bitplanes() -> QuantizedTensor:
    b = RecordBuilder(NAME, (2, 5))
    return b.finish(b.affine(b.bitplanes("planes", np.arange(10).reshape(2, 5) % 8, 3), scale=1.0, bits=3,
                             group_shape=(1, 5)))


def ternary() -> QuantizedTensor:
    b = RecordBuilder(NAME, (2, 7))
    return b.finish(b.scale(b.ternary("t", np.zeros((2, 7), int)), b.tensor("s", np.ones((1, 1), F16)), (2, 7)))


def plain_tensor() -> QuantizedTensor:
    b = RecordBuilder(NAME, (2, 3))
    return b.finish(b.tensor("w", np.ones((2, 3), F16)))


def affine_offset() -> QuantizedTensor:
    """Affine version 2: 4-bit codes over 4 x 40, groups of 16, F16 scale and offset (GGUF Q4_1-like)."""
    rng = np.random.default_rng(5)
    b = RecordBuilder(NAME, (4, 40), "F16")
    return b.finish(b.affine(b.packed("codes", rng.integers(0, 16, (4, 40)), 4), bits=4, group_shape=(1, 16),
                             scale=b.tensor("scale", rng.random((4, 3)).astype(F16)),
                             offset=b.tensor("offset", rng.standard_normal((4, 3)).astype(F16))))


def reshaped() -> QuantizedTensor:
    """HQQ axis 0 in small: an affine over [4, 15] with one scale per column (groups of 4), laid out as [6, 10]."""
    rng = np.random.default_rng(6)
    b = RecordBuilder(NAME, (6, 10))
    codes = b.packed("codes", rng.integers(0, 16, (4, 15)), 4)
    return b.finish(b.reshape(b.affine(codes, scale=b.tensor("scale", rng.random((1, 15)).astype(F16)), bits=4,
                                       group_shape=(4, 1))))


def reshaped_tensor() -> QuantizedTensor:
    b = RecordBuilder(NAME, (6, 10))
    return b.finish(b.reshape(b.tensor("x", np.arange(60, dtype=F16).reshape(3, 20))))


# (id, record, edit, code, field, stage)
CASES = [
    # envelope and record level
    ("node_not_object", affine, setter((), "codes", [1, 2]), "bad_record", "weight/codes", "open"),
    ("codec_not_string", affine, setter(("codes",), "codec", 7), "bad_record", "weight/codes/codec", "open"),
    ("empty_tensor_name", affine, setter(("scale",), "tensor", ""), "bad_record", "weight/scale/tensor", "open"),
    ("unknown_codec", affine, setter(("zero",), "codec", "nf5"), "unknown_codec", "weight/zero/codec", "open"),
    ("codec_version_2", affine, setter(("codes",), "version", 2), "unsupported_codec_version",
     "weight/codes/version", "open"),
    ("record_missing_weight", affine, lambda r, t: r[NAME].pop("weight"), "bad_record", "weight", "open"),
    ("record_unknown_field", affine, lambda r, t: r[NAME].update(comment="x"), "bad_field", "comment", "open"),
    ("record_rank_1", affine, lambda r, t: r[NAME].update(shape=[160]), "bad_field", "shape", "open"),
    ("record_rank_9", affine, lambda r, t: r[NAME].update(shape=[4, 40] + [1] * 7), "bad_field", "shape", "open"),
    ("storage_bytes_negative", affine, lambda r, t: r[NAME].update(storage_bytes=-1), "bad_field", "storage_bytes",
     "open"),
    ("storage_bytes_bool", affine, lambda r, t: r[NAME].update(storage_bytes=True), "bad_field", "storage_bytes",
     "open"),
    ("info_not_object", affine, lambda r, t: r[NAME].update(info=[1]), "bad_field", "info", "open"),
    ("weight_is_int", plain_tensor, retensor("w", np.ones((2, 3), np.int8)), "shape_mismatch", "weight", "open"),
    # tensor
    ("tensor_bool", plain_tensor, retensor("w", np.ones((2, 3), bool)), "bad_dtype", "weight/tensor", "open"),
    # packed
    ("packed_bits_0", affine, setter(("codes",), "bits", 0), "bad_field", "weight/codes/bits", "open"),
    ("packed_bits_bool", affine, setter(("codes",), "bits", True), "bad_field", "weight/codes/bits", "open"),
    ("packed_shape_rank", affine, setter(("codes",), "shape", [4, 40, 1]), "bad_field", "weight/codes/shape", "open"),
    ("packed_u16", affine, retensor("codes", np.zeros((4, 10), np.uint16)), "bad_dtype", "weight/codes/tensor",
     "open"),
    ("packed_wrong_shape", affine, retensor("codes", np.zeros((4, 21), np.uint8)), "shape_mismatch",
     "weight/codes/tensor", "open"),
    # bitplanes
    ("bitplanes_i8", bitplanes, retensor("planes", np.zeros((3, 2, 1), np.int8)), "bad_dtype",
     "weight/codes/tensor", "open"),
    ("bitplanes_wrong_planes", bitplanes, retensor("planes", np.zeros((2, 2, 1), np.uint8)), "shape_mismatch",
     "weight/codes/tensor", "open"),
    # ternary
    ("ternary_shape", ternary, retensor("t", np.zeros((2, 1), np.uint8)), "shape_mismatch", "weight/input/tensor",
     "open"),
    ("ternary_dtype", ternary, retensor("t", np.zeros((2, 2), np.int8)), "bad_dtype", "weight/input/tensor", "open"),
    # affine
    ("affine_scale_1d", affine, retensor("scale", np.ones(3, F16)), "shape_mismatch", "weight/scale", "open"),
    ("affine_zero_grid", affine, retensor("zero", np.ones((4, 4), F16)), "shape_mismatch", "weight/zero", "open"),
    ("affine_codes_1d", affine, both(setter((), "codes", {"codec": "tensor", "version": 1, "tensor": f"{NAME}.codes"}),
                                     retensor("codes", np.zeros(160, np.uint8))), "shape_mismatch", "weight/codes",
     "open"),
    ("affine_group_rank", affine, setter((), "group_shape", [16]), "bad_field", "weight/group_shape", "open"),
    ("affine_bits_17", affine, setter((), "bits", 17), "bad_field", "weight/bits", "open"),
    ("affine_zero_string", affine, both(setter((), "zero", "8"), retensor("zero", np.zeros(0, np.uint8))),
     "bad_field", "weight/zero", "open"),
    ("affine_zero_null", affine, both(setter((), "zero", None), retensor("zero", np.zeros(0, np.uint8))),
     "bad_field", "weight/zero", "open"),
    ("affine_scale_overflows_fp32", affine, both(setter((), "scale", 1e39), retensor("scale", np.zeros(0, np.uint8))),
     "bad_field", "weight/scale", "open"),
    ("affine_scale_big_int", affine, both(setter((), "scale", 10**400), retensor("scale", np.zeros(0, np.uint8))),
     "bad_field", "weight/scale", "open"),
    # affine version 2: the offset
    ("affine_v1_offset", affine, setter((), "offset", 0.5), "bad_field", "weight/offset", "open"),
    ("affine_v1_offset_node", affine, setter((), "offset", {"codec": "tensor", "version": 1, "tensor": f"{NAME}.zero"}),
     "bad_field", "weight/offset", "open"),
    ("affine_version_3", affine_offset, setter((), "version", 3), "unsupported_codec_version", "weight/version",
     "open"),
    ("affine_offset_grid", affine_offset, retensor("offset", np.ones((4, 2), F16)), "shape_mismatch",
     "weight/offset", "open"),
    ("affine_offset_1d", affine_offset, retensor("offset", np.ones(3, F16)), "shape_mismatch", "weight/offset",
     "open"),
    ("affine_offset_overflows_fp32", affine_offset, both(setter((), "offset", -1e39),
                                                         retensor("offset", np.zeros(0, np.uint8))),
     "bad_field", "weight/offset", "open"),
    ("affine_offset_string", affine_offset,
     both(setter((), "offset", "0.5"), retensor("offset", np.zeros(0, np.uint8))), "bad_field", "weight/offset",
     "open"),
    ("affine_offset_null", affine_offset, both(setter((), "offset", None), retensor("offset", np.zeros(0, np.uint8))),
     "bad_field", "weight/offset", "open"),
    ("codec_version_list", affine, setter(("codes",), "version", [1]), "unsupported_codec_version",
     "weight/codes/version", "open"),
    ("codec_version_float", affine, setter(("codes",), "version", 1.0), "unsupported_codec_version",
     "weight/codes/version", "open"),
    # lut
    ("lut_1d_with_group", lut, setter((), "group_shape", [1, 8]), "bad_field", "weight/group_shape", "open"),
    ("lut_3d_without_group", lambda: lut((4, 1, 16), (1, 8)), lambda r, t: node(r[NAME]).pop("group_shape"),
     "bad_record", "weight/group_shape", "open"),
    ("lut_2d_table", lut, retensor("table", np.ones((2, 16), np.float32)), "shape_mismatch", "weight/table", "open"),
    ("lut_table_grid", lambda: lut((4, 1, 16), (1, 8)), retensor("table", np.ones((2, 1, 16), np.float32)),
     "shape_mismatch", "weight/table", "open"),
    ("lut_float_codes", lut, both(setter((), "codes", {"codec": "tensor", "version": 1, "tensor": f"{NAME}.codes"}),
                                  retensor("codes", np.zeros((4, 8), np.float32))), "bad_kind", "weight/codes",
     "open"),
    ("lut_short_table", lut, retensor("table", np.ones(15, np.float32)), "code_out_of_range", "weight/codes", "open"),
    # scale
    ("scale_grid", scale, retensor("f", np.ones((3, 1), F16)), "shape_mismatch", "weight/factor", "open"),
    ("scale_factor_1d", scale, retensor("f", np.ones(4, F16)), "shape_mismatch", "weight/factor", "open"),
    ("scale_input_3d", scale, retensor("x", np.ones((4, 8, 1), F16)), "shape_mismatch", "weight/input", "open"),
    # vq
    ("vq_books_2d", vq, retensor("books", np.ones((16, 4), F16)), "shape_mismatch", "weight/codebooks", "open"),
    ("vq_codes_shape", vq, both(setter(("codes",), "shape", [2, 8]), retensor("codes", np.zeros((2, 4), np.uint8))),
     "shape_mismatch", "weight/codes", "open"),
    ("vq_small_books", vq, retensor("books", np.ones((1, 8, 4), F16)), "code_out_of_range", "weight/codes", "open"),
    ("vq_int_books", vq, retensor("books", np.ones((1, 16, 4), np.int16)), "shape_mismatch", "weight/codebooks",
     "open"),
    # sparse_csr
    ("csr_row_ptr_length", sparse, retensor("o.row_ptr", np.zeros(3, np.int32)), "shape_mismatch",
     "weight/row_ptr", "open"),
    ("csr_row_ptr_dtype", sparse, retensor("o.row_ptr", np.zeros(4, np.uint32)), "shape_mismatch",
     "weight/row_ptr", "open"),
    ("csr_col_idx_float", sparse, retensor("o.col_idx", np.zeros(3, np.float32)), "bad_dtype", "weight/col_idx",
     "open"),
    ("csr_values_length", sparse, retensor("o.values", np.zeros(2, F16)), "shape_mismatch", "weight/values", "open"),
    ("csr_row_ptr_start", sparse, retensor("o.row_ptr", np.array([1, 2, 2, 3], np.int32)), "bad_index",
     "weight/row_ptr", "decode"),
    ("csr_row_ptr_decreasing", sparse, retensor("o.row_ptr", np.array([0, 3, 2, 3], np.int32)), "bad_index",
     "weight/row_ptr", "decode"),
    ("csr_negative_index", sparse, retensor("o.col_idx", np.array([1, -4, 5], np.int16)), "index_out_of_range",
     "weight/col_idx", "decode"),
    ("csr_duplicate_column", sparse, retensor("o.col_idx", np.array([4, 4, 5], np.uint16)), "bad_index",
     "weight/col_idx", "decode"),
    # lowrank / sign_lowrank
    ("lowrank_inner", lowrank, retensor("b", np.ones((3, 6), F16)), "shape_mismatch", "weight/b", "open"),
    ("sign_shape", sign_lowrank, retensor("v", np.ones((1, 5), F16)), "shape_mismatch", "weight/sign", "open"),
    ("sign_uv_inner", sign_lowrank, retensor("u", np.ones((4, 2), F16)), "shape_mismatch", "weight/v", "open"),
    ("sign_from_tensor", sign_lowrank,
     both(setter((), "sign", {"codec": "tensor", "version": 1, "tensor": f"{NAME}.sign"}),
          retensor("sign", np.ones((4, 6), np.uint8))), "bad_kind", "weight/sign", "open"),
    # sum
    ("sum_shapes", summed, retensor("b", np.ones((2, 4), F16)), "shape_mismatch", "weight/terms[1]", "open"),
    ("sum_terms_object", summed, setter((), "terms", {"a": 1}), "bad_field", "weight/terms", "open"),
    ("sum_65_terms", summed, lambda r, t: node(r[NAME])["terms"].extend([node(r[NAME], "terms", 0)] * 63),
     "bad_field", "weight/terms", "open"),
    ("sum_1d_terms", summed, both(retensor("a", np.ones(6, F16)), retensor("b", np.ones(6, F16)),
                                  lambda r, t: r[NAME].update(shape=[6, 1])), "shape_mismatch", "weight/terms[0]",
     "open"),
    # permute
    ("perm_length", permuted, retensor("perm", np.arange(4, dtype=np.int32)), "shape_mismatch", "weight/perm",
     "open"),
    ("perm_float", permuted, retensor("perm", np.arange(5, dtype=np.float32)), "shape_mismatch", "weight/perm",
     "open"),
    ("perm_negative", permuted, retensor("perm", np.array([0, 1, 2, 3, -1], np.int16)), "bad_permutation",
     "weight/perm", "decode"),
    ("perm_too_large", permuted, retensor("perm", np.array([0, 1, 2, 3, 5], np.int64)), "bad_permutation",
     "weight/perm", "decode"),
    # reshape
    ("reshape_count", reshaped, both(setter((), "shape", [6, 11]), lambda r, t: r[NAME].update(shape=[6, 11])),
     "shape_mismatch", "weight/input", "open"),
    ("reshape_dim_zero", reshaped, setter((), "shape", [0, 60]), "bad_field", "weight/shape", "open"),
    ("reshape_dim_negative", reshaped, setter((), "shape", [-6, -10]), "bad_field", "weight/shape", "open"),
    ("reshape_shape_rank", reshaped, setter((), "shape", [60]), "bad_field", "weight/shape", "open"),
    ("reshape_shape_missing", reshaped, lambda r, t: node(r[NAME]).pop("shape"), "bad_record", "weight/shape",
     "open"),
    ("reshape_input_missing", reshaped_tensor, both(lambda r, t: node(r[NAME]).pop("input"),
                                                    lambda r, t: r[NAME].update(storage_bytes=0),
                                                    lambda r, t: t.pop(f"{NAME}.x")), "bad_record", "weight/input",
     "open"),
    # the input's grid is checked against the input's own [4, 15], not the output's [6, 10]
    ("reshape_input_grid", reshaped, retensor("scale", np.ones((1, 10), F16)), "shape_mismatch",
     "weight/input/scale", "open"),
    ("reshape_input_3d", reshaped_tensor, retensor("x", np.ones((3, 20, 1), F16)), "shape_mismatch", "weight/input",
     "open"),
    ("reshape_vs_record", reshaped, setter((), "shape", [10, 6]), "shape_mismatch", "weight", "open"),
    ("reshape_input_padding", reshaped, retensor("codes", np.full((4, 8), 0xF0, np.uint8)), "nonzero_padding",
     "weight/input/codes/tensor", "decode"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_validation_error(tmp_path, case):
    _, build, edit, code, fld, stage = case
    assert_error(write(tmp_path, [build()], edit), code, NAME, fld, stage)


def test_every_case_is_valid_before_the_edit(tmp_path):
    """Guards against cases that fail for a reason other than their edit."""
    for builder in {c[1] for c in CASES}:
        open_and_decode(write(tmp_path, [builder()]))


def test_data_errors_name_the_file(tmp_path):
    def dirty(records: dict, tensors: dict) -> None:
        array = tensors[f"{NAME}.planes"].copy()
        array[2, 1, 0] |= 0x80
        tensors[f"{NAME}.planes"] = array
    assert_error(write(tmp_path, [bitplanes()], dirty), "nonzero_padding", NAME, "weight/codes/tensor", "decode")


def test_unknown_codec_is_its_own_class(tmp_path):
    exc = assert_error(write(tmp_path, [affine()], setter((), "codec", "hqq")), "unknown_codec", NAME,
                       "weight/codec", "open")
    assert isinstance(exc, UnknownCodecError) and "plugin" in exc.message


def test_limits(tmp_path):
    def deep(records: dict, tensors: dict) -> None:
        weight = records[NAME]["weight"]
        for _ in range(16):
            weight = {"codec": "scale", "version": 1, "input": weight, "group_shape": [1, 1],
                      "factor": {"codec": "tensor", "version": 1, "tensor": f"{NAME}.scale"}}
        records[NAME]["weight"] = weight
    exc = assert_error(write(tmp_path, [affine()], deep), "limit_exceeded", NAME, None, "open")
    assert "deeper than 16" in exc.message


def test_decode_in_memory_equals_decode_from_file(tmp_path):
    qt = make_affine_record(NAME, (5, 33), bits=3, group=8)
    path = write_file(tmp_path / "m.safetensors", quantized=[qt])
    np.testing.assert_array_equal(qt.decode(), open_file(path).decode(NAME))


def test_signature_lists_the_tree():
    assert signature(affine().record["weight"]) == "affine[4](packed[4],tensor,tensor)"
    assert signature(summed().record["weight"]) == "sum(tensor,tensor)"
    assert signature(permuted().record["weight"]) == "permute(tensor)"


def test_builder_rejects_duplicate_roles_and_bad_dtypes():
    b = RecordBuilder(NAME, (2, 3))
    b.tensor("a", np.ones((2, 3), F16))
    with pytest.raises(ValueError):
        b.store("a", np.ones(2, F16))
    with pytest.raises(ValueError):
        RecordBuilder(NAME, (2, 3), "I8")


def test_builder_names_an_unreferenced_tensor():
    b = RecordBuilder(NAME, (2, 3))
    node_ = b.tensor("a", np.ones((2, 3), F16))
    b.store("orphan", np.ones(2, F16))
    with pytest.raises(FormatError) as info:
        b.finish(node_)
    assert info.value.code == "bad_record" and "orphan" in info.value.message


def test_builder_validates_on_finish():
    b = RecordBuilder(NAME, (2, 3))
    with pytest.raises(FormatError) as info:
        b.finish(b.tensor("a", np.ones((3, 2), F16)))
    assert info.value.code == "shape_mismatch" and info.value.tensor == NAME


def test_a_plugin_codec_is_decoded_through_the_registry(tmp_path):
    class Negate(Codec):
        name = "tests.negate"
        required = frozenset({"input"})

        def infer(self, node_: dict, ctx) -> NodeInfo:
            inner = ctx.infer(node_["input"], "input")
            return NodeInfo(inner.shape, "float")

        def decode(self, node_: dict, ctx) -> np.ndarray:
            return -np.asarray(ctx.decode(node_["input"], "input"), dtype=np.float32)

    registry = CORE_CODECS.extended([Negate()], owner="tests")  # readers know the codecs they are given
    b = RecordBuilder(NAME, (2, 3), registry=registry)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    qt = b.finish(b.node("tests.negate", 1, input=b.tensor("x", x)))
    path = write_file(tmp_path / "p.safetensors", quantized=[qt])
    np.testing.assert_array_equal(open_file(path, registry).decode(NAME), -x)
    with pytest.raises(UnknownCodecError):
        open_file(path)  # the core registry, the default, does not know it


def test_mutating_a_decoded_record_copy_does_not_touch_the_file(tmp_path):
    path = write_file(tmp_path / "m.safetensors", quantized=[affine()])
    qfile = open_file(path)
    record = copy.deepcopy(qfile.records[NAME])
    record["weight"]["bits"] = 2
    assert qfile.records[NAME]["weight"]["bits"] == 4
    with pytest.raises(ValueError):
        qfile.tensor(f"{NAME}.codes")[0, 0] = 1  # mapped read-only


def test_lut_1x1_tile_table_applies_everywhere(tmp_path):
    b = RecordBuilder(NAME, (4, 8))
    table = np.linspace(-1, 1, 16).astype(np.float32)
    codes = np.arange(32).reshape(4, 8) % 16
    qt = b.finish(b.lut(b.packed("codes", codes, 4), b.tensor("table", table.reshape(1, 1, 16)), group_shape=(1, 4)))
    path = write_file(tmp_path / "t.safetensors", quantized=[qt])
    np.testing.assert_array_equal(open_file(path).decode(NAME), table[codes])


# -- affine version 2: the offset ---------------------------------------------------------------------------------

def bits_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def per_tile(params: np.ndarray, group: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    params = np.asarray(params, dtype=np.float32)
    if params.shape == (1, 1):
        return np.broadcast_to(params, shape)
    return params[(np.arange(shape[0]) // group[0])[:, None], (np.arange(shape[1]) // group[1])[None, :]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero", [None, "tensor", "number"])
@pytest.mark.parametrize("offset", ["tensor", "number", "affine", "scale"])
def test_affine_offset_decodes_as_float32_numpy_bit_for_bit(bits: int, zero: str | None, offset: str):
    """((q - Z) * S) + M, each fp32-rounded; without zero exactly gguf-py's d * q + m."""
    rng = np.random.default_rng([bits, len(offset), 0 if zero is None else len(zero)])
    rows, cols, group = 5, 72, (1, 32)  # 72 columns: the last group has 8
    grid = (rows, 3)
    b = RecordBuilder(NAME, (rows, cols))
    q = rng.integers(0, 1 << bits, (rows, cols))
    d = (rng.standard_normal(grid) * 0.01).astype(F16)
    m = (rng.standard_normal(grid) * 0.3).astype(F16)
    z = {"tensor": rng.integers(0, 1 << bits, grid).astype(F16), "number": 7.5, None: None}[zero]
    if offset == "tensor":
        offset_value, M = b.tensor("offset", m), m.astype(np.float32)
    elif offset == "number":
        offset_value, M = -0.3125, np.full((1, 1), -0.3125, np.float32)
    else:  # a nested node: 6-bit mins times a negated per-tensor dmin (the K-quants' "- dmin * mn")
        mn = rng.integers(0, 64, grid)
        neg_dmin = np.array([[-0.0123]], F16)
        codes_node = b.packed("offset.codes", mn, 6)
        if offset == "affine":
            offset_value = b.affine(codes_node, scale=b.tensor("offset.dmin", neg_dmin), bits=6, group_shape=grid)
        else:
            offset_value = b.scale(codes_node, b.tensor("offset.dmin", neg_dmin), grid)
        M = mn.astype(np.float32) * neg_dmin.astype(np.float32)
    zero_value = b.tensor("zero", z) if isinstance(z, np.ndarray) else z
    qt = b.finish(b.affine(b.packed("codes", q, bits), scale=b.tensor("scale", d), zero=zero_value, offset=offset_value,
                           bits=bits, group_shape=group))
    assert qt.record["weight"]["version"] == 2
    expected = q.astype(np.float32)
    if z is not None:
        expected = expected - per_tile(np.full((1, 1), z) if np.ndim(z) == 0 else z, group, (rows, cols))
    expected = expected * per_tile(d, group, (rows, cols))
    expected = expected + per_tile(M, group, (rows, cols))
    assert np.array_equal(bits_of(qt.decode()), bits_of(expected))
    if z is None and offset == "tensor":  # literally d * q + m, as gguf-py writes it
        gguf_like = per_tile(d, group, (rows, cols)) * q.astype(np.float32) + per_tile(m, group, (rows, cols))
        assert np.array_equal(bits_of(qt.decode()), bits_of(gguf_like))


def test_affine_builder_writes_version_2_only_with_an_offset():
    b = RecordBuilder(NAME, (2, 8))
    codes = b.packed("codes", np.arange(16).reshape(2, 8) % 16, 4)
    assert b.affine(codes, scale=0.5, zero=8, bits=4, group_shape=(1, 8))["version"] == 1
    node_ = b.affine(codes, scale=0.5, offset=-1.0, bits=4, group_shape=(1, 8))
    assert node_["version"] == 2 and node_["offset"] == -1.0 and "zero" not in node_
    np.testing.assert_array_equal(b.finish(node_).decode(), (np.arange(16).reshape(2, 8) % 16) * 0.5 - 1.0)


def test_affine_version_2_without_offset_decodes_like_version_1(tmp_path):
    qt = affine()
    path = write(tmp_path, [qt], setter((), "version", 2))
    np.testing.assert_array_equal(open_file(path).decode(NAME), qt.decode())


def test_affine_offset_in_row_ranges_equals_the_whole_decode():
    """A record large enough to be decoded in row ranges, with tiles of 5 rows straddling the range boundary."""
    rng = np.random.default_rng(9)
    rows, cols, group = 2100, 520, (5, 32)
    grid = (-(-rows // 5), -(-cols // 32))
    b = RecordBuilder(NAME, (rows, cols))
    q = rng.integers(0, 16, (rows, cols))
    d, m = rng.random(grid).astype(F16), rng.standard_normal(grid).astype(F16)
    qt = b.finish(b.affine(b.packed("codes", q, 4), scale=b.tensor("scale", d), offset=b.tensor("offset", m), bits=4,
                           group_shape=group))
    expected = per_tile(d, group, (rows, cols)) * q.astype(np.float32) + per_tile(m, group, (rows, cols))
    assert np.array_equal(bits_of(qt.decode()), bits_of(expected))


def test_decode_work_counts_the_offset_node(tmp_path):
    """The offset's subtree counts toward the decode-work limits like scale's and zero's (spec/record.md#limits)."""
    qt = affine_offset()
    walk = qt.context()
    walk.infer(qt.record["weight"], "weight")
    # affine [4, 40] + packed codes [4, 40] + scale [4, 3] + offset [4, 3]
    assert walk.work == 2 * 4 * 40 + 2 * 4 * 3
    n = 8192

    def amplified(records: dict, tensors: dict) -> None:  # an inner [n, n] product inside an [n, 1] offset
        u8 = {role: np.ones(shape, np.uint8) for role, shape in (("x", (n, 1)), ("y", (1, n)), ("z", (n, 1)))}
        for role, array in u8.items():
            tensors[f"{NAME}.{role}"] = array
        record = records[NAME]
        record["shape"] = [n, 16]
        weight = record["weight"]
        weight["group_shape"] = [1, 16]
        weight["scale"] = 0.5
        weight["codes"]["shape"] = [n, 16]
        tensors[f"{NAME}.codes"] = np.zeros((n, 8), np.uint8)
        del tensors[f"{NAME}.scale"], tensors[f"{NAME}.offset"]

        def t(role: str) -> dict:
            return {"codec": "tensor", "version": 1, "tensor": f"{NAME}.{role}"}
        inner = {"codec": "lowrank", "version": 1, "a": t("x"), "b": t("y")}
        weight["offset"] = {"codec": "lowrank", "version": 1, "a": inner, "b": t("z")}
        record["storage_bytes"] = sum(a.nbytes for k, a in tensors.items() if k.startswith(NAME + "."))
    assert_error(write(tmp_path, [affine_offset()], amplified), "limit_exceeded", NAME, "weight/offset/a", "open")


def test_gguf_q4_1_blocks_decode_bit_identically():
    """Random Q4_1 blocks (F16 d, F16 m, 16 bytes of nibbles): gguf-py's dequantize equals our affine v2 record."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    rng = np.random.default_rng(41)
    rows, blocks_per_row = 6, 4
    n = rows * blocks_per_row
    d = (rng.standard_normal(n) * 0.02).astype(F16)
    m = (rng.standard_normal(n) * 0.5).astype(F16)
    qs = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(n, 2), m.view(np.uint8).reshape(n, 2), qs], axis=1)
    want = dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType.Q4_1)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(rows, -1)  # element j: low nibble of byte j, then
    b = RecordBuilder(NAME, (rows, 32 * blocks_per_row), "F16")             # element j + 16: its high nibble
    qt = b.finish(b.affine(b.packed("codes", codes, 4), bits=4, group_shape=(1, 32),
                           scale=b.tensor("d", d.reshape(rows, -1)), offset=b.tensor("m", m.reshape(rows, -1))))
    assert want.dtype == np.float32 and want.shape == (rows, 32 * blocks_per_row)
    assert np.array_equal(bits_of(qt.decode()), bits_of(want))


def test_gguf_q4_k_blocks_decode_bit_identically():
    """Random Q4_K super-blocks: (d * sc) * q - dmin * mn as the spec's tree (composition.md, GGUF Q4_1 and Q4_K)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import Q4_K, dequantize

    rng = np.random.default_rng(42)
    rows, supers_per_row = 3, 2
    n = rows * supers_per_row
    d = (rng.standard_normal(n) * 0.01).astype(F16)
    dmin = (np.abs(rng.standard_normal(n)) * 0.01).astype(F16)
    scales = rng.integers(0, 256, (n, 12), dtype=np.uint8)
    qs = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    cols = 256 * supers_per_row
    want = dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType.Q4_K)
    sc, mn = Q4_K.get_scale_min(scales)  # [n, 8] 6-bit sub-scales and mins: an importer's unpacking
    chunks = qs.reshape(n, 4, 32)  # each 32 bytes: 32 elements in the low nibbles, the next 32 in the high ones
    codes = np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(rows, cols)
    b = RecordBuilder(NAME, (rows, cols), "F16")
    scale = b.scale(b.packed("scale.codes", sc.reshape(rows, -1), 6), b.tensor("scale.d", d.reshape(rows, -1)), (1, 8))
    offset = b.scale(b.packed("offset.codes", mn.reshape(rows, -1), 6),
                     b.tensor("offset.neg_dmin", (-dmin).reshape(rows, -1)), (1, 8))
    qt = b.finish(b.affine(b.packed("codes", codes, 4), scale=scale, offset=offset, bits=4, group_shape=(1, 32)))
    assert np.array_equal(bits_of(qt.decode()), bits_of(want))


# -- bugs found in qformat/format (strict xfail: they start passing when fixed) -----------------------------------

def raises_format_error(path: Path) -> FormatError:
    """Open and decode; the reader must raise FormatError (a crash with another exception is the bug)."""
    with pytest.raises(FormatError) as info:
        open_and_decode(path)
    return info.value


def test_vq_zero_vector_length_is_rejected(tmp_path):
    edit = retensor("books", np.ones((1, 16, 0), F16))
    assert raises_format_error(write(tmp_path, [vq()], edit)).code == "shape_mismatch"


def test_vq_zero_codebooks_is_rejected(tmp_path):
    edit = both(retensor("books", np.ones((0, 16, 4), F16)),
                setter((), "codes", {"codec": "tensor", "version": 1, "tensor": f"{NAME}.codes"}),
                retensor("codes", np.zeros((2, 0), np.uint8)))
    raises_format_error(write(tmp_path, [vq()], edit))


def vq2_record(rows: int = 12, cols: int = 8, p: int = 3, d: int = 2, m: int = 2, k: int = 16,
               seed: int = 0) -> tuple[QuantizedTensor, np.ndarray]:
    """A vq version 2 record ([p, d] tiles) and its decode computed tile by tile from the spec's formula."""
    rng = np.random.default_rng(seed)
    books = rng.standard_normal((m, k, p * d)).astype(F16)
    q = rng.integers(0, k, (rows // p, cols // d * m))
    b = RecordBuilder(NAME, (rows, cols))
    qt = b.finish(b.vq(b.packed("codes", q, (k - 1).bit_length()), b.tensor("books", books), vector_shape=(p, d)))
    want = np.zeros((rows, cols), np.float32)
    for i in range(rows // p):
        for j in range(cols // d):
            acc = books[0, q[i, j * m]].astype(np.float32)
            for t in range(1, m):
                acc = acc + books[t, q[i, j * m + t]].astype(np.float32)
            want[i * p:(i + 1) * p, j * d:(j + 1) * d] = acc.reshape(p, d)
    return qt, want


@pytest.mark.parametrize("tile", [(3, 2), (8, 1), (1, 4), (2, 8)])
def test_vq_version_2_decodes_whole_and_by_row_ranges(tmp_path, tile):
    p, d = tile
    qt, want = vq2_record(rows=p * 5, cols=d * 3, p=p, d=d)
    assert qt.record["weight"]["version"] == (1 if p == 1 else 2)  # the lowest version that expresses it
    assert ("vector_shape" in qt.record["weight"]) == (p > 1)
    assert np.array_equal(qt.decode(), want)
    reader = qt.row_reader()
    for rows in ([0], [p * 5 - 1], [1, p, p + 1, 2 * p - 1], list(range(p * 5))[::-1]):
        assert np.array_equal(reader.rows(np.array(rows)), want[rows])
    qfile = open_file(write_file(tmp_path / "v2.safetensors", {}, [qt]))
    assert np.array_equal(qfile.decode(NAME), want)


def test_vq_builder_checks_vector_shape_against_the_codebooks():
    b = RecordBuilder(NAME, (8, 4))
    books = b.tensor("books", np.ones((1, 4, 4), F16))
    with pytest.raises(ValueError, match="vector_shape"):
        b.vq(b.packed("codes", np.zeros((4, 4), np.int64), 2), books, vector_shape=(2, 1))


def test_record_dtype_of_wrong_type(tmp_path):
    exc = raises_format_error(write(tmp_path, [affine()], lambda r, t: r[NAME].update(dtype=["F16"])))
    assert exc.code == "bad_field" and exc.field == "dtype"


def test_record_with_huge_dimension(tmp_path):
    raises_format_error(write(tmp_path, [affine()], lambda r, t: r[NAME].update(shape=[4, 10**30])))


# -- reshape ------------------------------------------------------------------------------------------------------

def test_reshape_lays_out_the_inputs_elements_row_major():
    qt = reshaped()
    t = {k.rsplit(".", 1)[1]: v for k, v in qt.tensors.items()}
    m = bitpack.unpack_codes(t["codes"], 4, 15).astype(np.float32) * t["scale"].astype(np.float32)
    assert bits_of(qt.decode()).tolist() == bits_of(m.reshape(6, 10)).tolist()
    assert signature(qt.record["weight"]) == "reshape(affine[4](packed[4],tensor))"
    ints = RecordBuilder(NAME, (2, 6))  # an int input converts to fp32
    plain = ints.finish(ints.reshape(ints.tensor("x", np.arange(12, dtype=np.int16).reshape(3, 4))))
    assert plain.decode().tolist() == np.arange(12, dtype=np.float32).reshape(2, 6).tolist()


@pytest.mark.parametrize(("inner", "chunk"), [((2, 30000), 1 << 12), ((1, 60000), 1 << 12), ((3000, 20), 1 << 10),
                                              ((7, 60000 // 7 + 1), 1 << 12)],
                         ids=["long-input-rows", "one-input-row", "short-input-rows", "ragged"])
def test_reshape_row_ranges_equal_the_whole_decode(monkeypatch, inner, chunk):
    """Ranges whose first and last input rows are partial, input rows longer than a range (decoded once and
    sliced), and a RowReader's scattered rows all give the whole decode's values."""
    from qformat.format import record

    rows, cols = 300, 200
    n = inner[0] * inner[1]
    rng = np.random.default_rng(12)
    if n != rows * cols:  # ragged: the input is [7, 8572] = 60004 elements, so use a matching output
        rows, cols = 4, n // 4
    b = RecordBuilder(NAME, (rows, cols))
    q = rng.integers(0, 8, inner)
    scale = (rng.random((inner[0], 1)) + 0.5).astype(F16)
    qt = b.finish(b.reshape(b.affine(b.packed("codes", q, 3), scale=b.tensor("scale", scale), zero=3.5, bits=3,
                                     group_shape=(1, inner[1]))))
    expected = ((q.astype(np.float32) - np.float32(3.5)) * scale.astype(np.float32)).reshape(rows, cols)
    whole = qt.decode()
    monkeypatch.setattr(record, "CHUNK_ELEMENTS", chunk)
    ranged = qt.decode()
    assert bits_of(whole).tolist() == bits_of(expected).tolist() == bits_of(ranged).tolist()
    picks = np.array([0, rows - 1, rows // 2, 1, rows // 2 + 1])
    assert bits_of(qt.row_reader().rows(picks)).tolist() == bits_of(expected[picks]).tolist()


def test_decode_work_counts_the_reshape_node():
    qt = reshaped()
    walk = qt.context()
    walk.infer(qt.record["weight"], "weight")
    assert walk.work == 60 + 60 + 60 + 15  # reshape, affine, packed codes, scale


def test_reshape_runs_through_the_runtime_reference_path():
    """The kernels' lowering does not know reshape: the dispatcher takes the torch reference path, correctly."""
    import torch

    from qformat.lowering import Unsupported, plan
    from qformat.runtime.dispatch import REFERENCE, prepare_weight
    from qformat.runtime.nn import QLinear

    qt = reshaped()
    with pytest.raises(Unsupported, match="reshape"):
        plan(qt.record)
    layer = QLinear(10, 6, bias=False, record=qt.record)
    layer.attach(prepare_weight(qt))
    assert layer.prepared.kernel is REFERENCE
    x = torch.randn(3, 10)
    with torch.no_grad():
        for rows in (x[:1], x):  # the one-row decode path and a batch
            want = rows.double() @ torch.from_numpy(qt.decode()).double().T
            torch.testing.assert_close(layer(rows).double(), want, rtol=1e-5, atol=1e-5)
