"""The Numba CPU kernels against the reference decoder, for every codec tree they claim, on random records.

What must hold: for every supported tree, ``prepare(qt).matmul(x)`` equals ``x @ decode(qt).T`` within fp32 rounding
(relative to |x| |W|^T, elementwise), for batches 1..8 and ragged shapes; ``dequantize()`` equals the decoded weight;
the prepared weight is smaller than the fp16 weight; trees outside the plan are refused; bad data raises the format's
error codes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from qformat_kernels.numba_plugin import NumbaKernel
from qformat_kernels.numba_prepared import NumbaPreparedWeight

from qformat.errors import FormatError
from qformat.format import QuantizedTensor, RecordBuilder
from qformat.lowering import Unsupported

KERNEL = NumbaKernel()
RTOL = 1e-4  # |y - x W^T| <= RTOL * (|x| |W|^T): fp32 accumulation in another order; a wrong code or scale is O(1)
NAME = "model.layers.0.mlp.up_proj.weight"
NF4 = np.array([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
                0.4407, 0.5626, 0.7230, 1.0], dtype=np.float32)


def check(qt: QuantizedTensor, batches: tuple[int, ...] = (1,), seed: int = 0) -> NumbaPreparedWeight:
    assert KERNEL.supports(qt.record), KERNEL.why_unsupported(qt.record)
    weight = qt.decode().reshape(qt.record["shape"][0], -1).astype(np.float64)
    prepared = KERNEL.prepare(qt, "cpu")
    assert prepared.kernel is KERNEL
    rng = np.random.default_rng(seed)
    for batch in batches:
        x = rng.standard_normal((batch, weight.shape[1])).astype(np.float32)
        y = prepared.matmul(torch.from_numpy(x)).double().numpy()
        ref = x.astype(np.float64) @ weight.T
        bound = RTOL * (np.abs(x).astype(np.float64) @ np.abs(weight).T) + 1e-30
        assert y.shape == ref.shape
        worst = float(np.max(np.abs(y - ref) / bound))
        assert worst <= 1.0, f"batch {batch}: error {worst:.2f}x the bound"
    deq = prepared.dequantize().numpy()
    np.testing.assert_allclose(deq, weight, rtol=0, atol=1e-5 * max(np.abs(weight).max(), 1e-30))
    return prepared


def builder(shape: tuple[int, ...], dtype: str = "BF16") -> RecordBuilder:
    return RecordBuilder(NAME, shape, dtype)


def stats(rng: np.random.Generator, rows: int, groups: int) -> np.ndarray:
    return (np.abs(rng.standard_normal((rows, groups))) * 0.02 + 0.005).astype(np.float16)


def affine_node(b: RecordBuilder, rng: np.random.Generator, rows: int, cols: int, bits: int, group: int,
                zero: str = "tensor", role: str = "codes") -> dict:
    gc = cols if group <= 0 else group
    groups = -(-cols // gc)
    codes = b.packed(role, rng.integers(0, 1 << bits, (rows, cols)), bits)
    zeros: object = None
    if zero == "number":
        zeros = float(1 << (bits - 1))
    elif zero == "tensor":
        zeros = b.tensor(f"{role}.zero", rng.integers(0, 1 << bits, (rows, groups)).astype(np.float16))
    elif zero == "packed":
        zeros = b.packed(f"{role}.zero", rng.integers(0, 1 << bits, (rows, groups)), bits)
    return b.affine(codes, scale=b.tensor(f"{role}.scale", stats(rng, rows, groups)), zero=zeros, bits=bits,
                    group_shape=(1, gc))


# ---------------------------------------------------------------------------------------------------------------
# affine

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 0])
def test_affine_bits_and_groups(bits: int, group: int) -> None:
    rng = np.random.default_rng(bits * 1000 + group)
    rows, cols = 37, 272  # ragged: neither a multiple of any tile width nor of every group size
    b = builder((rows, cols))
    check(b.finish(affine_node(b, rng, rows, cols, bits, group)))


@pytest.mark.parametrize("zero", ["none", "number", "tensor", "packed"])
def test_affine_zero_kinds(zero: str) -> None:
    rng = np.random.default_rng(7)
    b = builder((24, 160))
    check(b.finish(affine_node(b, rng, 24, 160, 4, 32, zero)))


@pytest.mark.parametrize("batch", range(1, 9))
def test_affine_every_small_batch(batch: int) -> None:
    rng = np.random.default_rng(batch)
    b = builder((45, 300))
    check(b.finish(affine_node(b, rng, 45, 300, 4, 64)), batches=(batch,), seed=batch)


def test_affine_batch_shapes_and_dtypes() -> None:
    rng = np.random.default_rng(3)
    b = builder((20, 64))
    prepared = check(b.finish(affine_node(b, rng, 20, 64, 4, 32)))
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = prepared.matmul(x)
    assert y.shape == (2, 3, 20) and y.dtype == torch.bfloat16
    flat = prepared.matmul(x.reshape(6, 64).float())
    torch.testing.assert_close(y.float().reshape(6, 20), flat, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("group", [(1, 24), (1, 8), (4, 16), (3, 40)])
def test_affine_odd_group_grids(group: tuple[int, int]) -> None:
    """Column groups that are not multiples of 16 take the scalar path; row blocks expand to rows."""
    rng = np.random.default_rng(sum(group))
    rows, cols = 10, 100
    b = builder((rows, cols))
    grid = (-(-rows // group[0]), -(-cols // group[1]))
    node = b.affine(b.packed("codes", rng.integers(0, 8, (rows, cols)), 3),
                    scale=b.tensor("scale", (rng.random(grid) * 0.1).astype(np.float32)),
                    zero=b.tensor("zero", rng.integers(0, 8, grid).astype(np.float32)), bits=3, group_shape=group)
    check(b.finish(node))


def test_affine_constants_and_wide_codes() -> None:
    rng = np.random.default_rng(11)
    b = builder((9, 50))
    check(b.finish(b.affine(b.packed("codes", rng.integers(0, 32, (9, 50)), 5), scale=0.0125, zero=15.5, bits=5,
                            group_shape=(1, 1))))
    b = builder((5, 40))
    check(b.finish(b.affine(b.packed("codes", rng.integers(0, 1 << 12, (5, 40)), 12),
                            scale=b.tensor("scale", np.full((5, 1), 1e-3, np.float32)), bits=12,
                            group_shape=(1, 40))))


def test_affine_integer_tensor_codes_and_bitplanes() -> None:
    rng = np.random.default_rng(12)
    b = builder((17, 96))
    q = rng.integers(0, 16, (17, 96))
    check(b.finish(b.affine(b.tensor("codes", q.astype(np.uint8)), scale=b.tensor("scale", stats(rng, 17, 3)),
                            zero=8.0, bits=4, group_shape=(1, 32))))
    b = builder((17, 96))
    check(b.finish(b.affine(b.bitplanes("codes", q, 4), scale=b.tensor("scale", stats(rng, 17, 3)),
                            zero=b.tensor("zero", rng.integers(0, 16, (17, 3)).astype(np.float16)), bits=4,
                            group_shape=(1, 32))))


def test_one_bit_and_one_by_one() -> None:
    rng = np.random.default_rng(13)
    b = builder((6, 700))
    check(b.finish(b.affine(b.packed("codes", rng.integers(0, 2, (6, 700)), 1),
                            scale=b.tensor("scale", stats(rng, 6, 1)), zero=0.5, bits=1, group_shape=(1, 700))))
    b = builder((1, 1))
    check(b.finish(b.affine(b.packed("codes", np.array([[5]]), 3), scale=0.5, bits=3, group_shape=(1, 1))))


# ---------------------------------------------------------------------------------------------------------------
# affine version 2: an offset added after the scale (GGUF d * q + m; the K-quants' - dmin * mn as a nested node)

def offset_value(b: RecordBuilder, rng: np.random.Generator, kind: str, grid: tuple[int, int]) -> object:
    if kind == "tensor":
        return b.tensor("offset", (rng.standard_normal(grid) * 0.05).astype(np.float16))
    if kind == "number":
        return -0.0625
    return b.scale(b.packed("offset.mins", rng.integers(0, 64, grid), 6),  # 6-bit mins times a negated dmin
                   b.tensor("offset.neg_dmin", np.array([[-0.002]], np.float16)), grid)


def with_offset(b: RecordBuilder, node: dict, offset: object) -> dict:
    return b.affine(node["codes"], scale=node["scale"], zero=node.get("zero"), offset=offset, bits=node["bits"],
                    group_shape=node["group_shape"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("offset", ["tensor", "number", "node"])
@pytest.mark.parametrize("zero", ["none", "tensor"])
def test_affine_offset(bits: int, offset: str, zero: str) -> None:
    rng = np.random.default_rng([bits, len(offset), len(zero)])
    rows, cols = 37, 272  # groups of 32: eight whole ones and a last one of 16 columns
    b = builder((rows, cols))
    node = with_offset(b, affine_node(b, rng, rows, cols, bits, 32, zero), offset_value(b, rng, offset, (rows, 9)))
    assert node["version"] == 2
    check(b.finish(node), batches=(1, 3, 6))


@pytest.mark.parametrize("group", [(1, 24), (1, 0), (32, 5)])
def test_affine_offset_odd_grids_and_outer_scales(group: tuple[int, int]) -> None:
    """Groups that are not multiples of 16 (scalar path), per row, and row blocks folded into x (HQQ axis 0); the
    offset also takes the row and column factors above the affine node."""
    rng = np.random.default_rng(sum(group))
    rows, cols = 64, 100
    gr, gc = group[0], group[1] or cols
    grid = (-(-rows // gr), -(-cols // gc))
    b = builder((rows, cols))
    node = b.affine(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4),
                    scale=b.tensor("scale", (rng.random(grid) * 0.1).astype(np.float32)),
                    zero=b.tensor("zero", rng.integers(0, 16, grid).astype(np.float32)), bits=4, group_shape=(gr, gc),
                    offset=offset_value(b, rng, "tensor", grid))
    check(b.finish(node), batches=(1, 3))
    b = builder((rows, cols))
    node = b.affine(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4),
                    scale=b.tensor("scale", (rng.random(grid) * 0.1).astype(np.float32)), bits=4,
                    group_shape=(gr, gc), offset=offset_value(b, rng, "node", grid))
    row = b.scale(node, b.tensor("row", rng.random((rows, 1)).astype(np.float32) + 0.5), (1, cols))
    check(b.finish(b.scale(row, b.tensor("col", rng.random((1, cols)).astype(np.float32) + 0.5), (rows, 1))),
          batches=(1, 3))


# ---------------------------------------------------------------------------------------------------------------
# methods' trees: act-order permutation, SpQR (quantized stats + outliers), low-rank sidecars

def _perm(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(n)


def test_gptq_act_order() -> None:
    rng = np.random.default_rng(21)
    rows, cols = 40, 256
    b = builder((rows, cols))
    check(b.finish(b.permute(affine_node(b, rng, rows, cols, 4, 128, "packed"), _perm(rng, cols))), batches=(1, 5))


def test_spqr_quantized_stats_outliers_permutation() -> None:
    rng = np.random.default_rng(22)
    rows, cols, group, sbits = 48, 192, 16, 3
    b = builder((rows, cols))
    groups = cols // group

    def quantized_stat(role: str) -> dict:  # 3-bit stats, one scale/zero per 16 rows of each column group
        codes = b.packed(f"{role}.codes", rng.integers(0, 8, (rows, groups)), sbits)
        return b.affine(codes, scale=b.tensor(f"{role}.scale", stats(rng, rows // 16, groups)),
                        zero=b.tensor(f"{role}.zero", rng.integers(0, 8, (rows // 16, groups)).astype(np.float16)),
                        bits=sbits, group_shape=(16, 1))

    dense = b.affine(b.packed("codes", rng.integers(0, 8, (rows, cols)), 3), scale=quantized_stat("scale"),
                     zero=quantized_stat("zero"), bits=3, group_shape=(1, group))
    outliers = np.zeros((rows, cols), np.float32)
    mask = rng.random((rows, cols)) < 0.01
    outliers[mask] = rng.standard_normal(int(mask.sum())).astype(np.float32)
    outliers[3] = 0  # an empty row
    tree = b.permute(b.sum([dense, b.sparse_from_dense("outliers", outliers)]), _perm(rng, cols))
    check(b.finish(tree), batches=(1, 2, 3))


def test_lowrank_sidecar_and_residual_stages() -> None:
    rng = np.random.default_rng(23)
    rows, cols, rank = 33, 144, 5
    b = builder((rows, cols))
    lowrank = b.lowrank(b.tensor("a", rng.standard_normal((rows, rank)).astype(np.float16)),
                        b.tensor("b", (rng.standard_normal((rank, cols)) * 0.01).astype(np.float16)))
    stage1 = affine_node(b, rng, rows, cols, 2, 48, "none", "stage1")
    stage2 = affine_node(b, rng, rows, cols, 2, 48, "number", "stage2")
    check(b.finish(b.sum([stage1, stage2, lowrank])), batches=(1, 3))


def test_lowrank_and_sparse_alone() -> None:
    rng = np.random.default_rng(24)
    b = builder((12, 20))
    check(b.finish(b.lowrank(b.tensor("a", rng.standard_normal((12, 3)).astype(np.float32)),
                             b.tensor("b", rng.standard_normal((3, 20)).astype(np.float32)))))
    b = builder((12, 20))
    dense = np.where(rng.random((12, 20)) < 0.2, rng.standard_normal((12, 20)), 0).astype(np.float32)
    check(b.finish(b.sparse_from_dense("outliers", dense)))
    b = builder((12, 20))  # per-row-block factors fold into a
    lowrank = b.lowrank(b.tensor("a", rng.standard_normal((12, 2)).astype(np.float32)),
                        b.tensor("b", rng.standard_normal((2, 20)).astype(np.float32)))
    check(b.finish(b.scale(lowrank, b.tensor("f", rng.random((3, 1)).astype(np.float32)), (4, 20))))


# ---------------------------------------------------------------------------------------------------------------
# scalar and vector codebooks, scale factors

@pytest.mark.parametrize("block", [32, 64, 128, 320])
def test_nf4_absmax(block: int) -> None:
    rng = np.random.default_rng(31)
    rows, cols = 24, 320
    b = builder((rows, cols))
    lut = b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), b.tensor("table", NF4))
    absmax = b.tensor("absmax", stats(rng, rows, -(-cols // block)))
    check(b.finish(b.scale(lut, absmax, (1, block))), batches=(1, 2, 4, 7))


def test_nf4_double_quant() -> None:
    rng = np.random.default_rng(32)
    rows, cols = 16, 512
    b = builder((rows, cols))
    lut = b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), b.tensor("table", NF4.astype(np.float16)))
    blocks = cols // 64
    absmax = b.affine(b.packed("absmax.codes", rng.integers(0, 256, (rows, blocks)), 8),
                      scale=b.tensor("absmax.scale", (rng.random((rows, 1)) * 1e-4).astype(np.float32)),
                      zero=b.tensor("absmax.offset", np.full((rows, 1), -100.0, np.float32)), bits=8,
                      group_shape=(1, blocks))
    check(b.finish(b.scale(lut, absmax, (1, 64))))


def test_lut_per_tile_tables() -> None:
    """Per-row learned tables (SqueezeLLM-like) and a [row block, column group] table grid."""
    rng = np.random.default_rng(33)
    rows, cols = 12, 96
    b = builder((rows, cols))
    check(b.finish(b.lut(b.packed("codes", rng.integers(0, 8, (rows, cols)), 3),
                         b.tensor("table", rng.standard_normal((rows, 1, 8)).astype(np.float16)), (1, cols))))
    b = builder((rows, cols))
    check(b.finish(b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4),
                         b.tensor("table", rng.standard_normal((3, 3, 16)).astype(np.float32)), (4, 32))))


def test_lut_fp8_table_bitplane_codes_input_channel_scale() -> None:
    rng = np.random.default_rng(34)
    rows, cols = 10, 64
    b = builder((rows, cols))
    table = b.tensor("table", rng.standard_normal(256).astype(np.float32))
    lut = b.lut(b.bitplanes("codes", rng.integers(0, 256, (rows, cols)), 8), table)
    per_row = b.scale(lut, b.tensor("scale", stats(rng, rows, 1)), (1, cols))
    check(b.finish(b.scale(per_row, b.tensor("input_scale", rng.random((1, cols)).astype(np.float32) + 0.5),
                           (rows, 1))))


@pytest.mark.parametrize("books_n", [1, 2])
def test_vq(books_n: int) -> None:
    rng = np.random.default_rng(40 + books_n)
    rows, cols, d, k = 30, 128, 8, 256
    b = builder((rows, cols))
    codes = b.packed("codes", rng.integers(0, k, (rows, cols // d * books_n)), 8)
    vq = b.vq(codes, b.tensor("codebooks", rng.standard_normal((books_n, k, d)).astype(np.float16)))
    check(b.finish(b.scale(vq, b.tensor("scale", stats(rng, rows, 1)), (1, cols))), batches=(1, 3))


def test_vq_large_codebook_and_grouped_scale() -> None:
    """K > rows takes the direct path; a scale grid that splits vectors takes per-element scales."""
    rng = np.random.default_rng(43)
    rows, cols, d, k = 8, 48, 4, 1000
    b = builder((rows, cols))
    vq = b.vq(b.tensor("codes", rng.integers(0, k, (rows, cols // d)).astype(np.uint16)),
              b.tensor("codebooks", rng.standard_normal((1, k, d)).astype(np.float32)))
    check(b.finish(vq))
    b = builder((rows, cols))
    vq = b.vq(b.tensor("codes", rng.integers(0, 16, (rows, cols // d)).astype(np.uint16)),
              b.tensor("codebooks", rng.standard_normal((1, 16, d)).astype(np.float32)))
    check(b.finish(b.scale(vq, b.tensor("scale", stats(rng, rows, 8)), (1, 6))))


def test_ternary_per_row() -> None:
    rng = np.random.default_rng(50)
    rows, cols = 11, 203
    b = builder((rows, cols))
    check(b.finish(b.scale(b.ternary("trits", rng.integers(-1, 2, (rows, cols))),
                           b.tensor("scale", stats(rng, rows, 1)), (1, cols))))


def test_bitstack_sign_lowrank_blocks() -> None:
    rng = np.random.default_rng(51)
    rows, cols, rank = 20, 88, 3
    b = builder((rows, cols))
    blocks = []
    for i in range(3):
        signs = rng.integers(0, 2, (rows, cols))
        sign = b.packed(f"b{i}.sign", signs, 1) if i != 1 else b.bitplanes(f"b{i}.sign", signs, 1)
        blocks.append(b.sign_lowrank(sign, b.tensor(f"b{i}.u", rng.random((rows, rank)).astype(np.float16)),
                                     b.tensor(f"b{i}.v", rng.random((rank, cols)).astype(np.float16))))
    check(b.finish(b.sum(blocks)), batches=(1, 2))


def test_conv_shaped_record() -> None:
    rng = np.random.default_rng(52)
    b = builder((8, 4, 3, 3))
    check(b.finish(affine_node(b, rng, 8, 36, 4, 0)))


# ---------------------------------------------------------------------------------------------------------------
# what the kernel refuses, and bad data

def _record(build: Callable[[RecordBuilder, np.random.Generator], dict], shape: tuple[int, int] = (8, 32)
            ) -> QuantizedTensor:
    b = builder(shape)
    return b.finish(build(b, np.random.default_rng(0)))


@pytest.mark.parametrize("build", [
    lambda b, r: b.tensor("w", r.standard_normal((8, 32)).astype(np.float16)),
    lambda b, r: b.permute(b.tensor("w", r.standard_normal((8, 32)).astype(np.float32)), np.arange(32)[::-1]),
    lambda b, r: b.scale(b.lowrank(b.tensor("a", np.ones((8, 2), np.float32)), b.tensor("b", np.ones((2, 32),
                                                                                                    np.float32))),
                         b.tensor("f", np.ones((8, 2), np.float32)), (1, 16)),
    lambda b, r: b.scale(b.permute(affine_node(b, r, 8, 32, 4, 16), np.arange(32)[::-1]),
                         b.tensor("f", np.ones((8, 2), np.float32)), (1, 16)),
], ids=["dense", "permuted-dense", "grouped-scale-lowrank", "grouped-scale-over-permute"])
def test_unsupported_trees_are_refused(build: Callable) -> None:
    qt = _record(build)
    assert not KERNEL.supports(qt.record)
    assert KERNEL.why_unsupported(qt.record)
    with pytest.raises(Unsupported, match=KERNEL.why_unsupported(qt.record).replace("(", r"\(").replace(")", r"\)")):
        KERNEL.prepare(qt)  # refused before any data is read


def test_refusal_reasons_name_the_node() -> None:
    rng = np.random.default_rng(0)
    grid_over_permute = _record(lambda b, r: b.scale(b.permute(affine_node(b, rng, 8, 32, 4, 16), np.arange(32)),
                                                     b.tensor("f", np.ones((8, 2), np.float32)), (1, 16)))
    assert KERNEL.why_unsupported(grid_over_permute.record) == \
        "weight: a grouped scale over a permuted or column-scaled input"
    b = builder((8, 32))
    lowrank = b.lowrank(b.tensor("a", np.ones((8, 2), np.float32)), b.tensor("b", np.ones((2, 32), np.float32)))
    grid_over_lowrank = b.finish(b.sum([affine_node(b, rng, 8, 32, 4, 16),
                                        b.scale(lowrank, b.tensor("f", np.ones((8, 2), np.float32)), (1, 16))]))
    assert KERNEL.why_unsupported(grid_over_lowrank.record) == "weight/terms[1]: a grouped scale over lowrank"
    b = builder((8, 32))  # a grid factor above the permutation is fine: the columns under it are unpermuted
    outer = b.permute(b.scale(affine_node(b, rng, 8, 32, 4, 16), b.tensor("f", np.ones((8, 2), np.float32)), (1, 16)),
                      np.arange(32)[::-1])
    check(b.finish(outer))


def test_unknown_codec_is_refused() -> None:
    record = {"shape": [2, 2], "dtype": "F32", "storage_bytes": 0,
              "weight": {"codec": "mystery", "version": 1, "tensor": "x"}}
    assert not KERNEL.supports(record)
    record["weight"] = {"codec": "affine", "version": 3}
    assert not KERNEL.supports(record)


def _expect_error(qt: QuantizedTensor, code: str) -> None:
    """The reference decoder's error: same code, same field, the record named."""
    with pytest.raises(FormatError) as exc:
        KERNEL.prepare(qt)
    with pytest.raises(FormatError) as reference:
        qt.decode()
    assert exc.value.code == reference.value.code == code and exc.value.tensor == NAME
    assert exc.value.field == reference.value.field


def test_bad_data_raises_format_errors() -> None:
    rng = np.random.default_rng(60)
    b = builder((4, 10))
    qt = b.finish(b.affine(b.packed("codes", rng.integers(0, 8, (4, 10)), 3), scale=1.0, bits=3,
                           group_shape=(1, 10)))
    qt.tensors[f"{NAME}.codes"][:, -1] |= 0x80  # 30 bits used of 32: the top bit is padding
    _expect_error(qt, "nonzero_padding")

    b = builder((4, 16))
    codes = np.full((4, 16), 3, np.uint8)
    qt = b.finish(b.lut(b.tensor("codes", codes), b.tensor("table", np.ones(8, np.float32))))
    check(qt)
    qt.tensors[f"{NAME}.codes"][2, 5] = 8  # integer codes carry no width: only the data can be out of range
    _expect_error(qt, "code_out_of_range")

    b = builder((3, 5))
    qt = b.finish(b.scale(b.ternary("trits", np.zeros((3, 5), np.int64)), b.tensor("s", np.ones((1, 1), np.float32)),
                          (3, 5)))
    qt.tensors[f"{NAME}.trits"][0, 0] = 250
    _expect_error(qt, "code_out_of_range")


def test_prepared_weight_is_packed() -> None:
    """4-bit g128: sliced words plus fp32 scale and scale*zero stay well under the fp16 weight (no dense copy)."""
    rng = np.random.default_rng(70)
    rows, cols = 256, 1024
    b = builder((rows, cols))
    prepared = KERNEL.prepare(b.finish(affine_node(b, rng, rows, cols, 4, 128)))
    fp16_bytes = rows * cols * 2
    assert prepared.nbytes() < 0.3 * fp16_bytes
    big = [a for _, terms in prepared.groups for t in terms for a in t.arrays() if a.size >= rows * cols // 8]
    assert all(a.dtype == np.uint32 for a in big)


def test_gpu_device_is_refused() -> None:
    b = builder((4, 16))
    qt = b.finish(b.affine(b.packed("codes", np.zeros((4, 16), np.int64), 4), scale=1.0, bits=4,
                           group_shape=(1, 16)))
    with pytest.raises(ValueError):
        KERNEL.prepare(qt, "cuda")


# ---------------------------------------------------------------------------------------------------------------
# stacking layers that read the same input (q/k/v, gate/up), and the decode entry

def _affine_part(rows: int, cols: int, seed: int, bits: int = 4, group: int = 32, zero: str = "packed",
                 lut: bool = False, table_scale: float = 1.0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    b = builder((rows, cols))
    if lut:
        table = b.tensor("table", NF4 * np.float32(table_scale))
        node = b.scale(b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), table),
                       b.tensor("absmax", stats(rng, rows, cols // group)), group_shape=(1, group))
        return b.finish(node)
    return b.finish(affine_node(b, rng, rows, cols, bits, group, zero))


@pytest.mark.parametrize("kind", ["affine", "nf4", "two_tables", "ragged"])
def test_fuse_rows_is_exact_and_shares_memory(kind: str) -> None:
    cols = 200 if kind == "ragged" else 256
    group = 40 if kind == "ragged" else 32  # 40: not a multiple of 16, the scalar any-group kernel
    parts = [KERNEL.prepare(_affine_part(rows, cols, seed, group=group, lut=kind in ("nf4", "two_tables"),
                                         table_scale=1.0 + seed * (kind == "two_tables")))
             for seed, rows in enumerate((48, 16, 23))]
    fused = parts[0].fuse_rows(parts)
    assert fused is not None
    whole, views = fused
    assert (whole.out_features, whole.in_features) == (87, cols) and whole.kernel is KERNEL
    assert [v.out_features for v in views] == [48, 16, 23] and [v.name for v in views] == [p.name for p in parts]
    assert sum(v.nbytes() for v in views) <= whole.nbytes() <= sum(p.nbytes() for p in parts)
    assert all(np.shares_memory(v._single.words, whole._single.words) for v in views)
    rng = np.random.default_rng(9)
    for batch in (1, 2, 3, 8):
        x = torch.from_numpy(rng.standard_normal((batch, cols)).astype(np.float32))
        want = [p.matmul(x) for p in parts]
        got = whole.matmul(x)
        torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=0, atol=0)  # the same sums per row
        for view, expected in zip(views, want, strict=True):
            torch.testing.assert_close(view.matmul(x), expected, rtol=0, atol=0)
    for view, part in zip(views, parts, strict=True):
        torch.testing.assert_close(view.dequantize(), part.dequantize(), rtol=0, atol=0)


def test_fuse_rows_refuses_different_layouts() -> None:
    base = KERNEL.prepare(_affine_part(32, 256, 0))
    others = {
        "bits": _affine_part(32, 256, 1, bits=3),
        "group": _affine_part(32, 256, 2, group=64),
        "width": _affine_part(32, 128, 3),
        "zero": _affine_part(32, 256, 4, zero="none"),
        "codec": _affine_part(32, 256, 5, lut=True),
    }
    for why, qt in others.items():
        assert base.fuse_rows([base, KERNEL.prepare(qt)]) is None, why
    rng = np.random.default_rng(6)
    b = builder((32, 256))
    permuted = b.finish(b.permute(affine_node(b, rng, 32, 256, 4, 32, "packed"), _perm(rng, 256)))
    assert base.fuse_rows([base, KERNEL.prepare(permuted)]) is None  # not one plain code term
    assert base.fuse_rows([base]) is None


def test_decode_fn_matches_matmul_and_declines_other_inputs() -> None:
    prepared = KERNEL.prepare(_affine_part(40, 256, 7))
    decode = prepared.decode_fn()
    assert decode is not None
    for shape in ((256,), (1, 256), (1, 1, 256)):
        x = torch.randn(*shape)
        y = decode(x)
        assert y is not None and y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
        torch.testing.assert_close(y, prepared.matmul(x), rtol=0, atol=0)
    x_strided = torch.randn(1, 512)[:, ::2]
    torch.testing.assert_close(decode(x_strided), prepared.matmul(x_strided.contiguous()), rtol=0, atol=0)
    for other in (torch.randn(2, 256), torch.randn(1, 256, dtype=torch.float64), torch.randn(1, 1, 1, 256),
                  torch.randn(1, 128), torch.randn(1, 256, requires_grad=True)):
        assert decode(other) is None
    ragged = KERNEL.prepare(_affine_part(8, 200, 8, group=40))
    assert ragged.decode_fn() is None  # no aligned fast path: callers use matmul


def test_single_terms_that_are_not_codes_have_no_decode_path_and_do_not_fuse() -> None:
    """A weight of one codebook, outlier or low-rank term: the fast path and row stacking decline (they used to raise
    AttributeError, which broke binding the layer)."""
    from qformat.runtime.dispatch import bind, fuse_rows

    rng = np.random.default_rng(80)
    b = builder((8, 32))
    vq = b.finish(b.vq(b.packed("codes", rng.integers(0, 16, (8, 8)), 4),
                       b.tensor("books", rng.standard_normal((1, 16, 4)).astype(np.float32))))
    b = builder((8, 32))
    sparse = b.finish(b.sparse_from_dense("o", np.where(rng.random((8, 32)) < 0.2, 1.0, 0.0).astype(np.float32)))
    for qt in (vq, sparse):
        prepared = check(qt)
        assert prepared.decode_fn() is None
        assert prepared.fuse_rows([prepared, KERNEL.prepare(qt)]) is None
        assert fuse_rows([prepared, KERNEL.prepare(qt)]) is None
        x = torch.randn(1, 32)
        torch.testing.assert_close(bind(prepared)(x), prepared.matmul(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# stall protection

def test_thread_governor_backs_off_after_a_stall_and_retries() -> None:
    import numba
    from qformat_kernels.numba_threads import ThreadGovernor

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least two numba threads")
    now = [0.0]
    governor = ThreadGovernor(backoff_s=2.0, clock=lambda: now[0])

    def kernel(seconds: float) -> None:
        now[0] += seconds

    numba.set_num_threads(2)
    try:
        best, budget = [float("inf"), 0], 1e-3
        governor.run(best, budget, kernel, 5.0)  # the first call may compile: never judged
        assert numba.get_num_threads() == 2 and best[0] == float("inf")
        governor.run(best, budget, kernel, 2e-4)
        governor.run(best, budget, kernel, 3e-4)  # slower than the best but within the budget: fine
        assert numba.get_num_threads() == 2 and best[0] == pytest.approx(2e-4)
        governor.run(best, budget, kernel, 8e-3)  # a stall
        assert numba.get_num_threads() == 1 and governor.backing_off()
        governor.run(best, budget, kernel, 5e-4)  # single-threaded meanwhile
        assert numba.get_num_threads() == 1
        now[0] += 2.0
        governor.run(best, budget, kernel, 2e-4)  # backoff over: parallel again
        assert numba.get_num_threads() == 2 and not governor.backing_off()
        stalled_from_start = [float("inf"), 0]
        governor.run(stalled_from_start, budget, kernel, 8e-3)
        governor.run(stalled_from_start, budget, kernel, 8e-3)  # no good time seen yet: the budget decides
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
