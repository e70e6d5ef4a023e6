"""qformat.lowering: one reading of a record's tree into terms, shared by the Numba and Triton kernels.

What must hold: the structural plan (kinds, transforms, input chain, output factors, scale kinds) from the JSON alone;
trees outside the grammar refused with a reason; the kernel's predicate asked before any data is read; every data
check made once, with the reference decoder's error code and field (conformance vectors); statistics decoded as the
reference decoder decodes them; shared permutations and factors read once and read-only; no torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from qformat_conformance import runner

from qformat.errors import FormatError
from qformat.format import QuantizedTensor, RecordBuilder, open_file
from qformat.lowering import Codes, Permute, Scale, Sum, Term, Unsupported, lower, plan, plan_terms

NAME = "model.layers.0.mlp.up_proj.weight"
R, C = 12, 64


def builder(shape: tuple[int, ...] = (R, C)) -> RecordBuilder:
    return RecordBuilder(NAME, shape)


def affine(b: RecordBuilder, rng: np.random.Generator, role: str = "codes", bits: int = 4, group: int = 16,
           zero: bool = True) -> dict:
    groups = C // group
    return b.affine(b.packed(role, rng.integers(0, 1 << bits, (R, C)), bits),
                    scale=b.tensor(f"{role}.scale", (rng.random((R, groups)) * 0.1).astype(np.float16)),
                    zero=b.tensor(f"{role}.zero", rng.integers(0, 16, (R, groups)).astype(np.float32)) if zero
                    else None, bits=bits, group_shape=(1, group))


def everything() -> QuantizedTensor:
    """permute(sum(scale_col(scale_row(affine)), scale_grid(sparse), lowrank, sign_lowrank, lut, vq))."""
    rng = np.random.default_rng(0)
    b = builder()
    codes = b.scale(b.scale(affine(b, rng), b.tensor("row", rng.random((R, 1)).astype(np.float32)), (1, C)),
                    b.tensor("col", rng.random((1, C)).astype(np.float32) + 0.5), (R, 1))
    dense = np.where(rng.random((R, C)) < 0.05, rng.standard_normal((R, C)), 0).astype(np.float32)
    outliers = b.scale(b.sparse_from_dense("outliers", dense), b.tensor("grid", rng.random((3, 4)).astype(np.float32)),
                       (4, 16))
    lowrank = b.lowrank(b.tensor("a", rng.standard_normal((R, 2)).astype(np.float16)),
                        b.tensor("b", rng.standard_normal((2, C)).astype(np.float32)))
    signs = b.sign_lowrank(b.bitplanes("sign", rng.integers(0, 2, (R, C)), 1),
                           b.tensor("u", rng.random((R, 2)).astype(np.float32)),
                           b.tensor("v", rng.random((2, C)).astype(np.float32)))
    lut = b.lut(b.tensor("lut.codes", rng.integers(0, 6, (R, C)).astype(np.uint8)),
                b.tensor("lut.table", rng.standard_normal(6).astype(np.float32)))
    vq = b.vq(b.packed("vq.codes", rng.integers(0, 8, (R, C // 4)), 3),
              b.tensor("vq.books", rng.standard_normal((1, 8, 4)).astype(np.float16)))
    return b.finish(b.permute(b.sum([codes, outliers, lowrank, signs, lut, vq]), rng.permutation(C)))


def subnode(record: dict, path: str) -> dict:
    """The node at a lowering path such as ``weight/input/terms[1]/values``."""
    node = record
    for part in path.split("/"):
        if part.endswith("]"):
            key, index = part[:-1].split("[")
            node = node[key][int(index)]
        else:
            node = node[part]
    return node


def reference_decode(qt: QuantizedTensor, node: dict | float) -> np.ndarray:
    if not isinstance(node, dict):
        return np.full((1, 1), node, np.float32)
    return np.asarray(qt.context().decode(node, "x"), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# the structural pass

def test_plan_reads_the_tree_into_terms() -> None:
    qt = everything()
    planned = plan(qt.record)
    assert (planned.rows, planned.cols) == (R, C)
    assert isinstance(planned.root, Permute) and isinstance(planned.root.child, Sum)
    assert [t.kind for t in planned.terms] == ["codes", "sparse", "lowrank", "signs", "codes", "vq"]
    assert [t.codec for t in planned.terms] == ["affine", "sparse_csr", "lowrank", "sign_lowrank", "lut", "vq"]
    assert [(t.kind, t.path) for t in plan_terms(qt.record)] == [(t.kind, t.path) for t in planned.terms]
    codes, outliers, lowrank = planned.terms[:3]
    perm = planned.root
    assert codes.path == "weight/input/terms[0]/input/input"
    col, row = codes.transforms[1:]
    assert (col.kind, row.kind) == ("column", "row") and (col.group, row.group) == ((R, 1), (1, C))
    assert codes.transforms == (perm, col, row)  # outermost first
    assert codes.chain == (perm, col)  # input transforms, outermost first
    assert codes.factors == [row]  # output factors, innermost first
    (grid,) = outliers.factors
    assert grid.kind == "grid" and outliers.chain == (perm,) and grid.path == "weight/input/terms[1]"
    assert lowrank.transforms == (perm,) and lowrank.factors == []
    assert isinstance(codes.codes, Codes) and codes.codes.codec == "packed" and codes.codes.path == f"{codes.path}/codes"
    assert planned.terms[3].codes.codec == "bitplanes" and planned.terms[3].codes.path.endswith("/sign")
    assert planned.terms[4].codes.codec == "tensor" and outliers.codes is None


def test_nested_factors_are_innermost_first() -> None:
    rng = np.random.default_rng(1)
    b = builder()
    inner = b.scale(affine(b, rng), b.tensor("f1", rng.random((R, 4)).astype(np.float32)), (1, 16))
    outer = b.scale(inner, b.tensor("f2", rng.random((R, 1)).astype(np.float32)), (1, C))
    (term,) = plan_terms(b.finish(outer).record)
    assert [(f.kind, f.path) for f in term.factors] == [("grid", "weight/input"), ("row", "weight")]


@pytest.mark.parametrize(("record", "reason"), [
    ({"weight": {}}, "not a record"),
    ({"shape": [4], "weight": {}}, "not a record"),
    ({"shape": [4, True], "weight": {}}, "not a record"),
    ({"shape": [4, 8], "weight": {"codec": "tensor", "version": 1, "tensor": "w"}}, "weight: tensor as a term"),
    ({"shape": [4, 8], "weight": {"codec": "affine", "version": 3}}, "weight: affine version 3"),
    ({"shape": [4, 8], "weight": {"codec": "lut", "version": 2}}, "weight: lut version 2"),
    ({"shape": [4, 8], "weight": {"codec": "sum", "version": 1, "terms": []}}, "weight: sum without terms"),
    ({"shape": [4, 8], "weight": {"codec": "scale", "version": 1, "group_shape": [0, 1], "input": {}}},
     "weight: group_shape [0, 1]"),
    ({"shape": [4, 8], "weight": {"codec": "affine", "version": 1, "group_shape": [1, 8],
                                  "codes": {"codec": "ternary", "version": 1}}}, "weight/codes: codes from ternary"),
    ({"shape": [4, 8], "weight": {"codec": "permute", "version": 1, "input": {"codec": "rotate.hadamard",
                                                                             "version": 1}}},
     "weight/input: rotate.hadamard as a term"),
    ({"shape": [4, 8], "weight": "packed"}, "weight: not a codec node"),
])
def test_trees_outside_the_grammar_are_refused_with_the_reason(record: dict, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason.replace("[", r"\[").replace("]", r"\]")):
        plan(record)


# ---------------------------------------------------------------------------------------------------------------
# the data pass

def test_lower_decodes_statistics_as_the_reference_decoder() -> None:
    qt = everything()
    lowered = lower(qt)
    assert lowered.name == NAME and (lowered.rows, lowered.cols) == (R, C)
    codes, outliers, lowrank, signs, lut, vq = lowered.terms
    node = subnode(qt.record, codes.path)
    np.testing.assert_array_equal(codes.scale.values, reference_decode(qt, node["scale"]))
    np.testing.assert_array_equal(codes.zero.values, reference_decode(qt, node["zero"]))
    assert codes.scale.group == codes.zero.group == (1, 16)
    for transform in codes.transforms[1:]:
        np.testing.assert_array_equal(transform.factor, reference_decode(qt, transform.node["factor"]))
        assert transform.param == (transform.factor, transform.group)
    np.testing.assert_array_equal(lowered.root.perm, qt.tensors[f"{NAME}.perm"])
    for term, keys in ((lowrank, ("a", "b")), (signs, ("u", "v")), (lut, ("table",)), (vq, ("codebooks",))):
        node = subnode(qt.record, term.path)
        for key in keys:
            got = getattr(term, "books" if key == "codebooks" else key)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, reference_decode(qt, node[key]))
    dense = reference_decode(qt, subnode(qt.record, outliers.path))
    rows = np.repeat(np.arange(R), np.diff(outliers.row_ptr))
    np.testing.assert_array_equal(outliers.row_of, rows)
    np.testing.assert_array_equal(dense[outliers.row_of, outliers.col_idx], outliers.values)
    assert outliers.row_ptr.dtype == outliers.col_idx.dtype == np.int64
    # code leaves: the stored data, checked; values() as the reference decoder returns the codes
    for term in (codes, signs, lut, vq):
        np.testing.assert_array_equal(term.codes.values(), reference_decode_ints(qt, term.codes.node))
    assert lut.codes.top == int(qt.tensors[f"{NAME}.lut.codes"].max())


@pytest.mark.parametrize("offset", ["tensor", "number", "node"])
def test_affine_version_2_offset_is_lowered_like_scale_and_zero(offset: str) -> None:
    rng = np.random.default_rng(len(offset))
    b = builder()
    grid = (R, C // 16)
    value = {"tensor": lambda: b.tensor("codes.offset", rng.standard_normal(grid).astype(np.float16)),
             "number": lambda: -0.25,
             "node": lambda: b.scale(b.packed("codes.offset.mins", rng.integers(0, 64, grid), 6),
                                     b.tensor("codes.offset.neg_dmin", np.array([[-0.01]], np.float16)), grid)}[offset]()
    node = affine(b, rng)
    node = b.affine(node["codes"], scale=node["scale"], zero=node["zero"], offset=value, bits=4, group_shape=(1, 16))
    qt = b.finish(node)
    (term,) = plan_terms(qt.record)
    assert term.kind == "codes" and term.codec == "affine" and term.offset is None  # nothing read yet
    (term,) = lower(qt).terms
    assert term.offset.group == term.scale.group == (1, 16)
    np.testing.assert_array_equal(term.offset.values, reference_decode(qt, node["offset"]))
    assert term.offset.values.dtype == np.float32
    assert lower(everything()).terms[0].offset is None  # version 1: no offset


def reference_decode_ints(qt: QuantizedTensor, node: dict) -> np.ndarray:
    return np.asarray(qt.context().decode(node, "x"))


def test_shared_transforms_are_read_once_and_read_only() -> None:
    lowered = lower(everything())
    perms = {id(t.chain[0]) for t in lowered.terms}
    assert len(perms) == 1  # one Permute (and one perm array) for every term under it
    perm = lowered.terms[0].chain[0]
    assert not perm.perm.flags.writeable
    for transform in lowered.terms[0].transforms[1:]:
        assert isinstance(transform, Scale) and not transform.factor.flags.writeable


def test_the_kernels_predicate_runs_before_any_data_is_read() -> None:
    qt = everything()
    qt.tensors[f"{NAME}.perm"] = qt.tensors[f"{NAME}.perm"].copy()
    qt.tensors[f"{NAME}.perm"][0] = qt.tensors[f"{NAME}.perm"][1]  # bad data: lowering it is a format error
    seen = []
    with pytest.raises(Unsupported, match="no signs here"):
        lower(qt, check=lambda p: seen.append(p) or "no signs here")
    assert [t.kind for t in seen[0].terms][3] == "signs" and seen[0].terms[0].scale is None  # nothing decoded yet
    with pytest.raises(FormatError) as caught:
        lower(qt, check=lambda p: None)
    assert (caught.value.code, caught.value.field, caught.value.tensor) == ("bad_permutation", "weight/perm", NAME)


def test_structure_is_validated_first() -> None:
    qt = everything()
    qt.record = {**qt.record, "storage_bytes": qt.record["storage_bytes"] + 1}
    with pytest.raises(FormatError) as caught:
        lower(qt)
    assert caught.value.code == "bad_accounting"


def _decode_error_vectors() -> list[tuple[str, Path, str]]:
    manifest = runner.load_manifest()
    folder = Path(manifest["_dir"])
    return [(e["id"], folder / e["file"], e["error"]["code"]) for e in manifest["vectors"]
            if e["kind"] == "invalid" and e["error"]["stage"] == "decode"]


def test_data_errors_are_the_reference_decoders() -> None:
    """Every conformance vector whose problem only data shows: lowering raises the reference decoder's error (code
    and field) for every record it plans."""
    checked = 0
    for vid, path, code in _decode_error_vectors():
        qfile = open_file(path)
        try:
            for name, record in qfile.records.items():
                try:
                    plan(record)
                except Unsupported:
                    continue
                with pytest.raises(FormatError) as reference:
                    qfile.decode(name)
                with pytest.raises(FormatError) as ours:
                    lower(qfile.quantized(name))
                got = (ours.value.code, ours.value.field, ours.value.tensor)
                assert got == (reference.value.code, reference.value.field, name), vid
                assert ours.value.code == code, vid
                checked += 1
        finally:
            qfile.close()
    assert checked >= 10


def test_valid_vectors_lower_without_error() -> None:
    manifest = runner.load_manifest()
    folder = Path(manifest["_dir"])
    lowered = 0
    for entry in manifest["vectors"]:
        if entry["kind"] != "valid" or entry.get("options"):
            continue
        qfile = open_file(folder / entry["file"])
        try:
            for name, record in qfile.records.items():
                try:
                    plan(record)
                except Unsupported:
                    continue
                result = lower(qfile.quantized(name))
                assert all(isinstance(t, Term) for t in result.terms)
                lowered += 1
        finally:
            qfile.close()
    assert lowered >= 40


def test_ternary_check_without_unpacking_agrees_with_unpack_ternary() -> None:
    from qformat.format import bitpack
    from qformat.lowering import _ternary_valid

    rng = np.random.default_rng(5)
    verdicts = set()
    for cols in range(1, 17):
        for _ in range(100):
            packed = bitpack.pack_ternary(rng.integers(-1, 2, (3, cols)))
            packed[rng.integers(0, 3), rng.integers(0, packed.shape[1])] = rng.integers(0, 256)  # maybe bad
            verdict = _ternary_valid(packed, cols)
            assert verdict == bitpack.unpack_ternary(packed, cols)[1], (cols, packed)
            verdicts.add(verdict)
    assert verdicts == {True, False}


def test_numpy_only() -> None:
    code = "import sys, qformat.lowering; print(sorted(m for m in ('torch', 'numba', 'triton') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
