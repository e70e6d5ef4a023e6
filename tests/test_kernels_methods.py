"""The kernels on the codec trees the built-in methods write (issue 14): NF4 (and double quantization), bitsandbytes
FP4, FP8 per channel, FP4 E2M1 with fp16 group scales, MXFP4, NVFP4, LLM.int8, HQQ (axis 1 and 0), SqueezeLLM, AWQ.

What must hold: the Numba kernels and the Triton kernels (the interpreter on CPU; small shapes, seconds) give
``x @ W.T`` of the reference decoder within the kernel tolerance (``qformat.testing.check_kernel``) at batches 1 and
3, and ``dequantize()`` equals the decoded weight; the fast Numba paths are the ones taken (a 16-entry table in
registers, FP8 decoded arithmetically, HQQ axis-0 statistics folded into x rather than expanded to [R, C]).
Records come from ``qformat_kernels.method_trees`` (random codes: the kernels do not depend on the values).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

if importlib.util.find_spec("triton") is not None and "triton.language" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see test_kernels_triton.py)

import torch  # noqa: E402
from qformat_kernels import method_trees, numba_prepared  # noqa: E402
from qformat_kernels import numba_gemv as K  # noqa: E402
from qformat_kernels.numba_plugin import NumbaKernel  # noqa: E402
from qformat_kernels.numba_prepared import CodeTerm, RowBlockTerm  # noqa: E402

from qformat import lowering  # noqa: E402
from qformat.format import RecordBuilder  # noqa: E402
from qformat.testing import check_kernel  # noqa: E402

NUMBA = NumbaKernel()
TREES = sorted(method_trees.TREES)
# (rows, cols): cols a multiple of 64 (the block formats need it), neither a multiple of the 128-column tiles;
# 150 rows leave a ragged last row tile (and a short last HQQ axis-0 block of 22 rows)
SHAPES = [(64, 192), (150, 320)]
SIXTEEN_ENTRY = ("nf4", "nf4dq", "fp4", "e2m1", "mxfp4", "nvfp4", "nvfp4n", "squeeze3", "squeeze4", "squeeze3s")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", TREES)
def test_numba_matches_reference(name: str, shape: tuple[int, int]) -> None:
    rows, cols = shape
    rows -= rows % method_trees.ROW_MULTIPLE.get(name, 1)
    qt = method_trees.build(name, rows, cols, seed=sum(map(ord, name)))
    report = check_kernel(NUMBA, [qt], batches=(1, 3))
    assert report.checked == 2


def _terms(name: str, rows: int = 128, cols: int = 256) -> list:
    prepared = NUMBA.prepare(method_trees.build(name, rows, cols))
    return [t for _, terms in prepared.groups for t in terms]


@pytest.mark.skipif(not K.PERMUTE_LUT, reason="no AVX2/AVX-512 permute on this CPU")
@pytest.mark.parametrize("name", SIXTEEN_ENTRY)
def test_small_tables_use_register_permutes(name: str) -> None:
    codes = [t for t in _terms(name) if isinstance(t, CodeTerm)]
    assert codes and all(t.lut_mode == K.LUT_PERMUTE for t in codes)


@pytest.mark.parametrize("name", ["slim3", "slim2"])
def test_slim_runs_one_code_term_per_concat_part(name: str) -> None:
    """permute(concat(affine 2/3/4-bit)): one gather of x per part (perm, then the part's columns) and one code term
    each, as wide as its part."""
    prepared = NUMBA.prepare(method_trees.build(name, 64, 320))
    assert len(prepared.groups) == 3
    widths = []
    for chain, terms in prepared.groups:
        assert [op for op, _ in chain] == ["perm", "take"] and len(terms) == 1 and isinstance(terms[0], CodeTerm)
        widths.append(chain[1][1].shape[0])
    assert sum(widths) == 320 and sorted(widths) == [64, 128, 128]


def test_fp8_decodes_arithmetically() -> None:
    assert [t.lut_mode for t in _terms("fp8")] == [K.LUT_E4M3_TILE]
    assert [t.lut_mode for t in _terms("fp8h")] == [K.LUT_E4M3_TILE]


def _fp8_record(table: np.ndarray, codes: np.ndarray, packed: bool = False, group: int = 0) -> object:
    rows, cols = codes.shape
    group = group or cols
    b = RecordBuilder("w", codes.shape, "BF16")
    leaf = b.packed("codes", codes, 8) if packed else b.tensor("codes", codes.astype(np.uint8))
    lut = b.lut(leaf, b.tensor("table", table))
    scale = np.linspace(0.5, 2, rows * -(-cols // group), dtype=np.float32).reshape(rows, -1)
    return b.finish(b.scale(lut, b.tensor("scale", scale), (1, group)))


def test_fp8_e5m2_and_nan_codes() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (48, 160))
    e5m2 = (np.arange(256, dtype=np.uint16) << 8).astype(np.uint16).view(np.float16).astype(np.float32)
    finite = np.where(np.isfinite(e5m2), e5m2, 0.0).astype(np.float32)
    safe = np.where(np.isfinite(e5m2)[codes], codes, 0)
    # E5M2 with its inf/NaN codes unused: arithmetic; used (the table says 0 there): the table is looked up
    e4m3 = method_trees.e4m3_table()
    no_nan = np.where((codes & 0x7F) == 0x7F, 0, codes)
    # groups narrower than a 64-column tile: the slot-by-slot decoding
    for table, data, packed, group, mode in [
            (finite, safe, False, 0, K.LUT_E5M2_TILE), (finite, codes, False, 0, K.LUT_GATHER),
            (e4m3, codes, False, 0, K.LUT_GATHER), (e4m3, no_nan, True, 0, K.LUT_E4M3_TILE),
            (e4m3, no_nan, False, 32, K.LUT_E4M3), (finite, safe, True, 16, K.LUT_E5M2)]:
        qt = _fp8_record(table, data, packed, group)
        prepared = NUMBA.prepare(qt)
        assert prepared.groups[0][1][0].lut_mode == mode
        check_kernel(NUMBA, [qt], batches=(1, 3, 4))


@pytest.mark.parametrize("name", ["hqq4a0", "hqq3a0"])
def test_hqq_axis0_folds_statistics_into_x(name: str) -> None:
    rows, cols = 256, 512
    prepared = NUMBA.prepare(method_trees.build(name, rows, cols))
    (term,) = _terms(name, rows, cols)
    assert isinstance(term, RowBlockTerm)
    # statistics per 64-row block, not expanded to one value per weight: well under 16 bits per weight
    assert prepared.nbytes() * 8 / (rows * cols) < 6
    assert prepared.decode_fn() is None  # the one-row fast path would skip the per-block x
    # nor is it stacked with a plain code term of the same column layout (it would lose its per-block x)
    b = RecordBuilder("w", (rows, cols), "BF16")
    plain = b.finish(b.affine(b.packed("codes", np.zeros((rows, cols), np.int64), 4), bits=4, group_shape=(1, cols),
                              scale=b.tensor("scale", np.ones((rows, 1), np.float16))))
    other = NUMBA.prepare(plain)
    assert prepared.fuse_rows([prepared, other]) is None and other.fuse_rows([other, prepared]) is None


def test_row_block_statistics_under_row_scales() -> None:
    """A [32, 1]-tiled affine (zero a number) under a per-row scale: folded per block, the row factor outside."""
    rng = np.random.default_rng(9)
    rows, cols = 96, 144
    b = RecordBuilder("w", (rows, cols), "BF16")
    inner = b.affine(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), bits=4, group_shape=(32, 1),
                     scale=b.tensor("scale", rng.random((3, cols)).astype(np.float16)), zero=7.5)
    qt = b.finish(b.scale(inner, b.tensor("rows", rng.random((rows, 1)).astype(np.float32)), (1, cols)))
    assert isinstance(NUMBA.prepare(qt).groups[0][1][0], RowBlockTerm)
    check_kernel(NUMBA, [qt], batches=(1, 3, 7))
    # one scale for the matrix and zero points per [rows, 2] tile (taller than the matrix: one block)
    b = RecordBuilder("w", (rows, cols), "BF16")
    qt = b.finish(b.affine(b.packed("codes", rng.integers(0, 8, (rows, cols)), 3), bits=3, group_shape=(128, 2),
                           scale=0.01, zero=b.tensor("zero", rng.random((1, cols // 2)).astype(np.float16) * 7)))
    assert isinstance(NUMBA.prepare(qt).groups[0][1][0], RowBlockTerm)
    check_kernel(NUMBA, [qt], batches=(1, 3))


def test_fold_factors_multiplies_nested_grids() -> None:
    rng = np.random.default_rng(3)
    rows, cols = 8, 64
    b = RecordBuilder("w", (rows, cols))
    lut = b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), b.tensor("table", method_trees.E2M1))
    inner = b.scale(lut, b.tensor("block", rng.random((rows, 4)).astype(np.float32)), (1, 16))
    middle = b.scale(inner, b.tensor("pair", rng.random((4, 2)).astype(np.float32)), (2, 32))
    qt = b.finish(b.scale(middle, b.tensor("global", np.array([[0.5]], np.float32)), (rows, cols)))
    lowered = lowering.lower(qt)
    scales = []
    node = lowered.root
    while isinstance(node, lowering.Scale):
        scales.append(node)
        node = node.child
    folded = lowering.fold_factors(scales, rows, cols)
    assert folded.group == (1, 16)
    assert [s.group for s in scales] == [(rows, cols), (2, 32), (1, 16)]  # outermost first
    expected = scales[2].factor * scales[1].factor.repeat(2, axis=0).repeat(2, axis=1) * 0.5
    np.testing.assert_allclose(folded.values, expected, rtol=1e-6)
    assert lowering.finest_group([(1, 16), (1, 24)], rows, cols) is None  # 24 does not hold whole 16s


# ---------------------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU)

def _triton_kernel():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    if not on_gpu and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("triton was imported before TRITON_INTERPRET could be set")
    from qformat_kernels.triton_plugin import TritonKernel

    if on_gpu:
        return TritonKernel(), "cuda"

    class CpuTriton(TritonKernel):
        device = "cpu"

    return CpuTriton(), "cpu"


@pytest.mark.parametrize("name", TREES)
def test_triton_matches_reference(name: str) -> None:
    kernel, device = _triton_kernel()
    qt = method_trees.build(name, 64, 192, seed=sum(map(ord, name)))
    if name in method_trees.ROW_MULTIPLE:  # vq version 2 (VPTQ): refused, the dispatcher falls back to Numba
        assert "(version 2)" in kernel.why_unsupported(qt.record)
        return
    if name == "qmoe_stream":  # the dictionary stream: the Numba kernel decodes it, Triton does not yet
        assert "ternary_dict" in kernel.why_unsupported(qt.record)
        return
    if name.startswith("bitstack"):  # sign_lowrank (BitStack): no Triton kernel yet, Numba or the reference path
        assert kernel.why_unsupported(qt.record) in ("weight: a scale over sign_lowrank (only directly over one code "
                                                     "or codebook term)", "weight: a scale over sum (only directly "
                                                     "over one code or codebook term)")
        return
    if name.startswith("slim"):  # concat parts: no Triton kernel yet, Numba or the reference path
        assert "concat" in kernel.why_unsupported(qt.record)
        return
    assert kernel.why_unsupported(qt.record) is None
    report = check_kernel(kernel, [qt], batches=(1, 3), device=device)
    assert report.checked == 2


def test_triton_refuses_scales_that_do_not_nest() -> None:
    kernel, _ = _triton_kernel()
    b = RecordBuilder("w", (8, 96))
    lut = b.lut(b.packed("codes", np.zeros((8, 96), np.int64), 4), b.tensor("table", method_trees.E2M1))
    inner = b.scale(lut, b.tensor("a", np.ones((8, 6), np.float32)), (1, 16))
    qt = b.finish(b.scale(inner, b.tensor("b", np.ones((8, 4), np.float32)), (1, 24)))
    assert kernel.why_unsupported(qt.record) == "weight: nested scales on grids that do not nest"
    assert NUMBA.supports(qt.record)  # the Numba kernels multiply any row/column grids


# tables of small integers times one power of two (E2M1 and the formats built on it, GGUF's IQ4_NL values) take the
# one-plane int8 lookup; tables that are not (NF4, bitsandbytes' FP4, per-row k-means) keep the fp32 byte planes
INT8_TABLES = ("e2m1", "mxfp4", "nvfp4", "nvfp4n")


@pytest.mark.skipif(not K.NIBBLE_LUT, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("name", SIXTEEN_ENTRY)
def test_small_integer_tables_take_the_int8_plane(name: str) -> None:
    codes = [t for t in _terms(name) if isinstance(t, CodeTerm)]
    three_bit = name.startswith("squeeze3")  # 8-entry tables: one permute, no nibble layout
    expected = K.NIBBLE_OFF if three_bit else K.NIBBLE_INT8 if name in INT8_TABLES else K.NIBBLE_PLANES
    assert codes and all(t.nibble == expected for t in codes)


def test_int8_table_form_is_exact() -> None:
    from qformat_kernels.numba_prepared import int8_table_form

    e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
    scale = np.array([[0.1, 3e-5], [7.0, 0.0]], dtype=np.float32)
    table, rescaled = int8_table_form(e2m1[None], scale)
    assert np.array_equal(table[0] / 2.0 ** 24 / 2, e2m1)  # k = 2 * value, unit 2**-1
    assert np.array_equal(table[0][:, None, None] * rescaled, e2m1[:, None, None] * scale)
    iq4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
    assert np.array_equal(int8_table_form(iq4[None], scale)[0][0], iq4 * 2.0 ** 24)
    assert int8_table_form(np.array([[0, 1, 255]], dtype=np.float32), scale) is None  # k beyond int8
    assert int8_table_form(np.array([[0, 1 / 3]], dtype=np.float32), scale) is None  # no short binary form
    assert int8_table_form(iq4[None], np.array([[1e-38]], dtype=np.float32)) is None  # scale would go subnormal


@pytest.mark.skipif(not K.NIBBLE_LUT, reason="no AVX2 on this CPU")
def test_iq4_nl_table_through_the_int8_plane() -> None:
    """GGUF IQ4_NL's shape of record (16 integer values, a scale per 32 columns) on the int8 lookup, whole rows."""
    rng = np.random.default_rng(11)
    rows, cols = 40, 512
    iq4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float16)
    b = RecordBuilder("w", (rows, cols), "F16")
    lut = b.lut(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4), b.tensor("table", iq4))
    scale = (rng.standard_normal((rows, cols // 32)) * 1e-3).astype(np.float16)
    qt = b.finish(b.scale(lut, b.tensor("scale", scale), (1, 32)))
    terms = [t for _, group in NUMBA.prepare(qt).groups for t in group]
    assert [t.nibble for t in terms if isinstance(t, CodeTerm)] == [K.NIBBLE_INT8]
    check_kernel(NUMBA, [qt], batches=(1, 2, 4))


# block scales the whole-row kernels keep as one byte per group (decoded exactly in the kernel): MXFP4's shared
# exponents (powers of two: the fp32 exponent field), NVFP4's E4M3 scales times its global scale (or alone)
@pytest.mark.skipif(not K.NIBBLE_LUT, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("name, code", [("mxfp4", K.SCALE_E8M0), ("nvfp4", K.SCALE_E4M3), ("nvfp4n", K.SCALE_E4M3),
                                        ("e2m1", K.SCALE_F32), ("nf4", K.SCALE_F32), ("fp4", K.SCALE_F32)])
def test_block_scales_kept_as_bytes(name: str, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_prepared, "COMPACT_E4M3", True)  # NVFP4's byte scales are off by default
    qt = method_trees.build(name, 64, 320, seed=3)
    prepared = NUMBA.prepare(qt)
    terms = [t for _, group in prepared.groups for t in group if isinstance(t, CodeTerm)]
    assert [t.scale_code for t in terms] == [code]
    assert terms[0].scale.dtype == (np.float32 if code == K.SCALE_F32 else np.uint8)
    check_kernel(NUMBA, [qt], batches=(1, 2, 3))
    # rows stacked (q/k/v) keep the byte scales and compute exactly what each part does
    parts = [NUMBA.prepare(method_trees.build(name, rows, 320, seed=seed)) for seed, rows in ((4, 48), (5, 23))]
    fused = parts[0].fuse_rows(parts)  # (method_trees' NVFP4 global scale is the same in both parts)
    assert fused is not None
    whole, views = fused
    assert [t.scale_code for _, group in whole.groups for t in group] == [code]
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 320)).astype(np.float32))
    torch.testing.assert_close(whole.matmul(x), torch.cat([p.matmul(x) for p in parts], dim=1), rtol=0, atol=0)
    for view, part in zip(views, parts, strict=True):
        torch.testing.assert_close(view.dequantize(), part.dequantize(), rtol=0, atol=0)


def test_compact_scales_only_where_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from qformat_kernels.numba_prepared import compact_scales, decode_scales

    monkeypatch.setattr(numba_prepared, "COMPACT_E4M3", False)
    block = np.array([[0.5, 448.0]], dtype=np.float32)
    assert compact_scales(block * np.float32(0.0123), block) is None  # the default: NVFP4's scales stay fp32
    monkeypatch.setattr(numba_prepared, "COMPACT_E4M3", True)

    powers = np.ldexp(np.ones((3, 4), dtype=np.float32), np.arange(-20, -8).reshape(3, 4)).astype(np.float32)
    powers[0, 0] = 0.0
    codes, kind, mul = compact_scales(powers, None)
    assert kind == K.SCALE_E8M0 and codes.dtype == np.uint8
    assert np.array_equal(decode_scales(codes, kind, mul).view(np.uint32), powers.view(np.uint32))
    assert compact_scales(-powers, None) is None  # negative scales: no E8M0 byte
    assert compact_scales(np.float32(3.0) * powers, None) is None  # not powers of two, no block to match
    subnormal = powers.copy()
    subnormal[1, 1] = np.float32(1e-40)
    assert compact_scales(subnormal, None) is None
    block = np.array([[0.5, 448.0, -2.0, 0.0], [0.015625, 1.125, 3.5, 240.0]], dtype=np.float32)  # E4M3 values
    scale = block * np.float32(0.0123)
    codes, kind, mul = compact_scales(scale, block)
    assert kind == K.SCALE_E4M3 and mul == np.float32(np.ldexp(np.float32(0.0123), 120))
    assert np.array_equal(decode_scales(codes, kind, mul).view(np.uint32), scale.view(np.uint32))
    assert compact_scales(scale, block + np.float32(0.01)) is None  # not E4M3 values
    assert compact_scales(scale * np.linspace(1, 2, 4, dtype=np.float32), block) is None  # not one factor
