"""The core codec ``concat`` (spec/components.md#concat): float parts side by side along the columns.

Round trips against plain numpy, row-range decoding, the builder, every rejection with its error code and field, and
the kernels' reaction: the fused kernels do not lower ``concat``, so such a record runs on the reference path.
"""

from __future__ import annotations

import numpy as np
import pytest

from qformat.errors import FormatError
from qformat.format import QuantizedTensor, RecordBuilder, decode_record, signature
from qformat.lowering import Unsupported, plan


def _affine(b: RecordBuilder, rng: np.random.Generator, role: str, rows: int, cols: int, bits: int, group: int):
    q = rng.integers(0, 1 << bits, (rows, cols))
    s = (rng.random((rows, -(-cols // group))) * 0.1 + 0.01).astype(np.float16)
    z = rng.integers(0, 1 << bits, (rows, -(-cols // group)))
    node = b.affine(b.packed(f"{role}.codes", q, bits), bits=bits, group_shape=(1, group),
                    scale=b.tensor(f"{role}.scale", s), zero=b.packed(f"{role}.zero", z, bits))
    cols_of = np.arange(cols) // group
    expected = (q.astype(np.float32) - z[:, cols_of].astype(np.float32)) * s.astype(np.float32)[:, cols_of]
    return node, expected


def slim_like(rows: int = 7, seed: int = 0) -> tuple[QuantizedTensor, np.ndarray]:
    """permute(concat(2-bit over 16 cols, 3-bit over 32, 4-bit over 8)) with its expected decode."""
    rng = np.random.default_rng(seed)
    b = RecordBuilder("m.slim.weight", (rows, 56), "BF16")
    parts, values = zip(*[_affine(b, rng, f"b{k}", rows, c, k, 8) for k, c in ((2, 16), (3, 32), (4, 8))],
                        strict=True)
    perm = rng.permutation(56)
    qt = b.finish(b.permute(b.concat(list(parts)), perm))
    stored = np.concatenate(values, axis=1)
    expected = np.empty_like(stored)
    expected[:, perm] = stored
    return qt, expected


def test_concat_decodes_parts_side_by_side_exactly():
    qt, expected = slim_like()
    got = qt.decode()
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    assert signature(qt.record["weight"]).startswith("permute(concat(affine[2](")
    assert qt.record["weight"]["input"]["axis"] == 1


def test_concat_row_ranges_decode_each_parts_rows(monkeypatch: pytest.MonkeyPatch):
    from qformat.format import record as record_module

    qt, expected = slim_like(rows=300, seed=3)
    monkeypatch.setattr(record_module, "CHUNK_ELEMENTS", 56 * 7)  # ranges of 7 rows: 43 of them
    ranges = record_module._row_ranges(qt.context(), qt.record["weight"], (300, 56), split_products=True)
    assert len(ranges) > 40
    chunked = decode_record(qt.name, qt.record, qt.tensor_info, lambda n: np.asarray(qt.tensors[n]))
    np.testing.assert_array_equal(chunked, expected)


def test_builder_concat_of_one_part_is_the_part():
    b = RecordBuilder("w", (2, 3))
    node = b.tensor("x", np.ones((2, 3), np.float16))
    assert b.concat([node]) is node
    explicit = b.node("concat", 1, parts=[node], axis=1)
    np.testing.assert_array_equal(b.finish(explicit).decode(), np.ones((2, 3), np.float32))


def _record(weight: dict, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> QuantizedTensor:
    tensors = {f"w.{k}": v for k, v in arrays.items()}
    record = {"shape": list(shape), "dtype": "F32", "storage_bytes": sum(a.nbytes for a in tensors.values()),
              "weight": weight}
    return QuantizedTensor("w", record, tensors)


def _t(role: str) -> dict:
    return {"codec": "tensor", "version": 1, "tensor": f"w.{role}"}


A = np.ones((2, 3), np.float32)


@pytest.mark.parametrize("weight, arrays, shape, code, fld", [
    ({"codec": "concat", "version": 1, "axis": 1, "parts": [_t("a"), _t("b")]},
     {"a": A, "b": np.ones((3, 2), np.float32)}, (2, 5), "shape_mismatch", "weight/parts[1]"),
    ({"codec": "concat", "version": 1, "axis": 0, "parts": [_t("a")]}, {"a": A}, (2, 3), "bad_field", "weight/axis"),
    ({"codec": "concat", "version": 1, "axis": True, "parts": [_t("a")]}, {"a": A}, (2, 3), "bad_field",
     "weight/axis"),
    ({"codec": "concat", "version": 1, "axis": 1, "parts": []}, {}, (2, 3), "bad_field", "weight/parts"),
    ({"codec": "concat", "version": 1, "axis": 1, "parts": _t("a")}, {"a": A}, (2, 3), "bad_field", "weight/parts"),
    ({"codec": "concat", "version": 1, "axis": 1, "parts": [_t("a")] * 65}, {"a": A}, (2, 195), "bad_field",
     "weight/parts"),
    ({"codec": "concat", "version": 1, "parts": [_t("a")]}, {"a": A}, (2, 3), "bad_record", "weight/axis"),
    ({"codec": "concat", "version": 2, "axis": 1, "parts": [_t("a")]}, {"a": A}, (2, 3),
     "unsupported_codec_version", "weight/version"),
    ({"codec": "concat", "version": 1, "axis": 1, "parts": [_t("a"), _t("c")]},
     {"a": A, "c": np.ones((2, 2), np.uint8)}, (2, 5), "bad_kind", "weight/parts[1]"),
    ({"codec": "concat", "version": 1, "axis": 1, "parts": [_t("a")], "extra": 1}, {"a": A}, (2, 3), "bad_field",
     "weight/extra"),
    ({"codec": "concat", "version": 1, "axis": 1, "parts": [_t("a"), _t("a")]}, {"a": A}, (2, 5),
     "shape_mismatch", None),  # 6 columns, not the record's 5: the root's shape check
])
def test_concat_rejections(weight, arrays, shape, code, fld):
    with pytest.raises(FormatError) as error:
        _record(weight, arrays, shape).decode()
    assert error.value.code == code, str(error.value)
    if fld is not None:
        assert error.value.field == fld, str(error.value)


def test_numba_runs_concat_parts_and_triton_refuses_them():
    from qformat_kernels.numba_plugin import NumbaKernel
    from qformat_kernels.triton_plan import why_unsupported as triton_why

    from qformat.lowering import Columns, Concat
    from qformat.testing import check_kernel

    qt, expected = slim_like(rows=40)
    lowered = plan(qt.record)
    concat = lowered.root.child
    assert isinstance(concat, Concat) and [(p.start, p.stop) for p in concat.parts] == [(0, 16), (16, 48), (48, 56)]
    assert all(isinstance(p, Columns) for p in concat.parts) and [t.width for t in lowered.terms] == [16, 32, 8]
    kernel = NumbaKernel()
    assert kernel.why_unsupported(qt.record) is None
    assert check_kernel(kernel, [qt], batches=(1, 3)).checked == 2
    np.testing.assert_array_equal(kernel.prepare(qt).dequantize_numpy(), expected)
    assert "concat" in triton_why(qt.record)


def test_lowering_refuses_a_part_whose_width_the_record_does_not_say():
    b = RecordBuilder("w", (2, 5))
    qt = b.finish(b.concat([b.tensor("a", np.ones((2, 3), np.float16)), b.tensor("b", np.ones((2, 2), np.float16))]))
    with pytest.raises(Unsupported, match="width"):
        plan(qt.record)
    # the reference path runs it: the dispatcher falls back to it for a record no kernel supports
    from qformat.runtime.dispatch import REFERENCE, select_kernel

    assert select_kernel(qt.record, forced="auto") is REFERENCE
