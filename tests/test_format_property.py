"""Property tests: random shapes, widths, group shapes and trees round-trip through build -> write -> open -> decode.

The expected weight is computed here with plain numpy from the generating arrays, never by the decoder under test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qformat.format import RecordBuilder, bitpack, open_file, write_file

SETTINGS = settings(max_examples=40, deadline=None, database=None)  # no .hypothesis/ folder in the repo
NAME = "model.layers.0.mlp.down_proj.weight"
FLOATS = {"F16": np.float16, "F32": np.float32, "BF16": ml_dtypes.bfloat16}


def expand(params: np.ndarray, group: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    params = np.asarray(params, dtype=np.float32)
    if params.shape == (1, 1):
        return np.broadcast_to(params, shape)
    rows = np.arange(shape[0]) // group[0]
    cols = np.arange(shape[1]) // group[1]
    return params[rows][:, cols]


def round_trip(qts, **options) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_file(Path(tmp) / "p.safetensors", quantized=qts)
        qfile = open_file(path)
        out = {name: qfile.decode(name, **options) for name in qfile.records}
        qfile.close()
        return out


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 50), bits=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack(rows, cols, bits, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, cols))
    packed = bitpack.pack_codes(codes, bits)
    assert packed.shape == (rows, (cols * bits + 7) // 8)
    assert bitpack.padding_bits_are_zero(packed, bits, cols)
    np.testing.assert_array_equal(bitpack.unpack_codes(packed, bits, cols), codes)
    planes = bitpack.pack_bitplanes(codes, bits)
    np.testing.assert_array_equal(bitpack.unpack_bitplanes(planes, cols), codes)


@st.composite
def affine_cases(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    return {
        "rows": rows, "cols": cols, "bits": draw(st.integers(1, 16)),
        "group": (draw(st.integers(1, rows + 2)), draw(st.integers(1, cols + 2))),
        "layout": draw(st.sampled_from(["packed", "bitplanes", "tensor"])),
        "scale": draw(st.sampled_from(["F16", "F32", "BF16", "const", "tile1x1"])),
        "zero": draw(st.sampled_from(["none", "const", "F16", "packed"])),
        "dtype": draw(st.sampled_from(["F32", "F16", "BF16"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@SETTINGS
@given(case=affine_cases())
def test_affine_round_trip(case):
    rng = np.random.default_rng(case["seed"])
    rows, cols, bits, group = case["rows"], case["cols"], case["bits"], case["group"]
    grid = (-(-rows // group[0]), -(-cols // group[1]))
    q = rng.integers(0, 1 << bits, size=(rows, cols))
    b = RecordBuilder(NAME, (rows, cols), case["dtype"])
    if case["layout"] == "packed":
        codes = b.packed("codes", q, bits)
    elif case["layout"] == "bitplanes":
        codes = b.bitplanes("codes", q, bits)
    else:
        codes = b.tensor("codes", q.astype(np.uint8 if bits <= 8 else np.uint16))
    if case["scale"] == "const":
        scale_value, scale = 0.375, 0.375
    elif case["scale"] == "tile1x1":
        scale_value = np.array([[0.5]], np.float32)
        scale = b.tensor("scale", scale_value)
    else:
        scale_value = (rng.random(grid) * 0.1 + 0.001).astype(FLOATS[case["scale"]])
        scale = b.tensor("scale", scale_value)
    zero_value, zero = None, None
    if case["zero"] == "const":
        zero_value, zero = float(1 << (bits - 1)), 1 << (bits - 1)
    elif case["zero"] == "F16":
        zero_value = (rng.random(grid) * (1 << min(bits, 10))).astype(np.float16)
        zero = b.tensor("zero", zero_value)
    elif case["zero"] == "packed":
        zero_value = rng.integers(0, 1 << bits, size=grid)
        zero = b.packed("zero", zero_value, bits)
    qt = b.finish(b.affine(codes, scale=scale, zero=zero, bits=bits, group_shape=group))

    expected = q.astype(np.float32)
    if zero_value is not None:
        expected = expected - expand(np.reshape(zero_value, (1, 1)) if np.ndim(zero_value) == 0 else zero_value,
                                     group, q.shape)
    expected = expected * expand(np.reshape(scale_value, (1, 1)) if np.ndim(scale_value) == 0 else scale_value,
                                 group, q.shape)
    np.testing.assert_array_equal(round_trip([qt])[NAME], expected)
    assert qt.record["storage_bytes"] == sum(a.nbytes for a in qt.tensors.values())


@SETTINGS
@given(rows=st.integers(1, 10), cols=st.integers(1, 30), bits=st.integers(1, 8), per_tile=st.booleans(),
       group=st.tuples(st.integers(1, 12), st.integers(1, 32)), extra=st.integers(0, 5),
       seed=st.integers(0, 2**32 - 1))
def test_lut_round_trip(rows, cols, bits, per_tile, group, extra, seed):
    rng = np.random.default_rng(seed)
    entries = (1 << bits) + extra
    q = rng.integers(0, 1 << bits, size=(rows, cols))
    b = RecordBuilder(NAME, (rows, cols))
    if per_tile:
        grid = (-(-rows // group[0]), -(-cols // group[1]))
        table = rng.standard_normal(grid + (entries,)).astype(np.float16)
        qt = b.finish(b.lut(b.packed("codes", q, bits), b.tensor("table", table), group_shape=group))
        expected = table.astype(np.float32)[(np.arange(rows) // group[0])[:, None], (np.arange(cols) // group[1])[None],
                                            q]
    else:
        table = rng.standard_normal(entries).astype(np.float32)
        qt = b.finish(b.lut(b.packed("codes", q, bits), b.tensor("table", table)))
        expected = table[q]
    np.testing.assert_array_equal(round_trip([qt])[NAME], expected)


@SETTINGS
@given(rows=st.integers(1, 8), slices=st.integers(1, 6), d=st.integers(1, 5), m=st.integers(1, 3),
       k=st.one_of(st.sampled_from([2, 4, 16, 256]), st.integers(1, 300)), seed=st.integers(0, 2**32 - 1))
def test_vq_round_trip(rows, slices, d, m, k, seed):
    rng = np.random.default_rng(seed)
    books = rng.standard_normal((m, k, d)).astype(np.float16)
    q = rng.integers(0, k, size=(rows, slices * m))
    b = RecordBuilder(NAME, (rows, slices * d))
    if k > 1 and k & (k - 1) == 0:  # a power of two: packed codes whose bound is exactly K
        codes = b.packed("codes", q, k.bit_length() - 1)
    else:  # otherwise a packed bound would exceed K (rejected structurally): a plain U16 tensor
        codes = b.tensor("codes", q.astype(np.uint16))
    qt = b.finish(b.vq(codes, b.tensor("books", books)))
    f = books.astype(np.float32)
    expected = np.zeros((rows, slices, d), np.float32)
    for r in range(rows):
        for j in range(slices):
            acc = f[0, q[r, j * m]]
            for i in range(1, m):
                acc = acc + f[i, q[r, j * m + i]]
            expected[r, j] = acc
    np.testing.assert_array_equal(round_trip([qt])[NAME], expected.reshape(rows, slices * d))


@SETTINGS
@given(rows=st.integers(1, 10), cols=st.integers(1, 40), density=st.floats(0, 0.5), ternary=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_permute_sum_sparse_round_trip(rows, cols, density, ternary, seed):
    rng = np.random.default_rng(seed)
    b = RecordBuilder(NAME, (rows, cols))
    if ternary:
        t = rng.integers(-1, 2, size=(rows, cols))
        s = rng.random((rows, 1)).astype(np.float16)
        base = b.scale(b.ternary("trits", t), b.tensor("s", s), group_shape=(1, cols))
        base_value = t.astype(np.float32) * s.astype(np.float32)
    else:
        x = rng.standard_normal((rows, cols)).astype(np.float16)
        base, base_value = b.tensor("x", x), x.astype(np.float32)
    dense = np.where(rng.random((rows, cols)) < density, rng.standard_normal((rows, cols)), 0).astype(np.float16)
    perm = rng.permutation(cols)
    qt = b.finish(b.permute(b.sum([base, b.sparse_from_dense("outliers", dense)]), perm))
    stored = base_value + dense.astype(np.float32)
    expected = np.empty_like(stored)
    for j in range(cols):
        expected[:, perm[j]] = stored[:, j]
    np.testing.assert_array_equal(round_trip([qt])[NAME], expected)


@SETTINGS
@given(rows=st.integers(1, 8), cols=st.integers(1, 20), rank=st.integers(1, 4), blocks=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_sign_lowrank_round_trip(rows, cols, rank, blocks, seed):
    rng = np.random.default_rng(seed)
    b = RecordBuilder(NAME, (rows, cols))
    terms, expected = [], np.zeros((rows, cols), np.float32)
    for i in range(blocks):
        sign = rng.integers(0, 2, size=(rows, cols))
        # values on a 1/64 grid: products and sums are exact in fp32, so any summation order gives the same bits
        u = (rng.integers(-128, 128, size=(rows, rank)) / 64).astype(np.float16)
        v = (rng.integers(-128, 128, size=(rank, cols)) / 64).astype(np.float16)
        terms.append(b.sign_lowrank(b.packed(f"b{i}.sign", sign, 1), b.tensor(f"b{i}.u", u), b.tensor(f"b{i}.v", v)))
        magnitude = (u.astype(np.float64) @ v.astype(np.float64)).astype(np.float32)
        expected = expected + np.where(sign == 1, magnitude, -magnitude)
    qt = b.finish(b.sum(terms))
    np.testing.assert_array_equal(round_trip([qt])[NAME], expected)


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 30), bits=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_bitplane_truncation_round_trip(rows, cols, bits, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, size=(rows, cols))
    keep = int(rng.integers(1, bits + 1))
    b = RecordBuilder(NAME, (rows, cols))
    qt = b.finish(b.affine(b.bitplanes("planes", q, bits), scale=1.0, bits=bits, group_shape=(1, 1)))
    dropped = bits - keep
    expected = q if dropped == 0 else ((q >> dropped) << dropped) | (1 << (dropped - 1))
    np.testing.assert_array_equal(round_trip([qt], use_planes=keep)[NAME], expected.astype(np.float32))
