"""Triton kernels against the reference decoder: every supported codec tree, the conformance vectors, the launch
configurations the GPU autotuner may pick, and an ahead-of-time compile for sm_90 (H100).

With a CUDA device the kernels run for real on it. Without one they run on CPU under the triton interpreter:
TRITON_INTERPRET must be set before triton.language is imported (its own @jit helpers are built then), so it is set
here, before anything imports triton (``import torch`` does not). Nothing here times the kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("triton") is None:  # found without importing: triton reads its settings on import
    pytest.skip("triton is not installed", allow_module_level=True)
torch = pytest.importorskip("torch")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERPRETING
if not ON_GPU and not INTERPRETING:
    if "triton.language" in sys.modules:  # its own @jit helpers (tl.sum, tl.cdiv, ...) were built for a GPU
        pytest.skip("triton was imported before this module could set TRITON_INTERPRET=1; run "
                    "`TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py`", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if ON_GPU else "cpu"

from qformat_kernels import triton_plan  # noqa: E402
from qformat_kernels.triton_plugin import TritonKernel  # noqa: E402

from qformat.errors import FormatError  # noqa: E402
from qformat.format import RecordBuilder, bitpack, open_file, signature  # noqa: E402

R, C = 40, 200  # neither a multiple of 32: exercises padding, clamped rows and partial groups
RNG_SEED = 1234


class CpuTriton(TritonKernel):
    """The same kernel, run by the interpreter on CPU tensors."""

    device = "cpu"


KERNEL = TritonKernel() if ON_GPU else CpuTriton()
RTOL = 1e-4 if ON_GPU else 1e-5  # of |x| @ |W|.T: fp32 sums in another order (3xTF32 products on tensor cores)


# ---------------------------------------------------------------------------------------------------------------
# records built from random data, one per codec tree

def _rng(tag: str) -> np.random.Generator:
    return np.random.default_rng([RNG_SEED, sum(map(ord, tag))])


def _f16(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float16)


def affine_tree(bits: int, group: int = 64, rows: int = R, cols: int = C):
    rng = _rng(f"affine{bits}{group}")
    b = RecordBuilder("w", (rows, cols))
    tiles = (rows, -(-cols // group))
    q = rng.integers(0, 1 << bits, (rows, cols))
    zero = rng.integers(0, 1 << bits, tiles).astype(np.float32)
    node = b.affine(b.packed("codes", q, bits), scale=b.tensor("scale", _f16(rng, *tiles)),
                    zero=b.tensor("zero", zero), bits=bits, group_shape=(1, group))
    return b.finish(node)


def second_level_tree():
    """3-bit codes, groups of 16; scale and zero themselves 3-bit affine per 8 x 1 blocks (SpQR-like)."""
    rng = _rng("second")
    b = RecordBuilder("w", (R, C))
    tiles = (R, -(-C // 16))
    stat_tiles = (-(-R // 8), tiles[1])

    def stat(role: str) -> dict:
        return b.affine(b.packed(f"{role}.q", rng.integers(0, 8, tiles), 3), bits=3, group_shape=(8, 1),
                        scale=b.tensor(f"{role}.s", np.abs(_f16(rng, *stat_tiles))),
                        zero=b.tensor(f"{role}.z", rng.integers(0, 8, stat_tiles).astype(np.float16)))

    node = b.affine(b.packed("codes", rng.integers(0, 8, (R, C)), 3), scale=stat("scale"), zero=stat("zero"),
                    bits=3, group_shape=(1, 16))
    return b.finish(node)


def act_order_tree():
    """GPTQ act-order: groups in permuted column order, packed 4-bit zeros, a permutation."""
    rng = _rng("actorder")
    b = RecordBuilder("w", (R, C))
    tiles = (R, -(-C // 32))
    inner = b.affine(b.packed("codes", rng.integers(0, 16, (R, C)), 4), bits=4, group_shape=(1, 32),
                     scale=b.tensor("scale", _f16(rng, *tiles)), zero=b.packed("zero", rng.integers(0, 16, tiles), 4))
    return b.finish(b.permute(inner, rng.permutation(C)))


def outliers_tree():
    """permute(sum(affine, sparse_csr)) with ~2% outliers."""
    rng = _rng("outliers")
    b = RecordBuilder("w", (R, C))
    tiles = (R, -(-C // 64))
    base = b.affine(b.packed("codes", rng.integers(0, 8, (R, C)), 3), bits=3, group_shape=(1, 64),
                    scale=b.tensor("scale", _f16(rng, *tiles)), zero=4)
    dense = np.where(rng.random((R, C)) < 0.02, rng.standard_normal((R, C)), 0).astype(np.float32)
    return b.finish(b.permute(b.sum([base, b.sparse_from_dense("outliers", dense)]), rng.permutation(C)))


def lowrank_tree():
    rng = _rng("lowrank")
    b = RecordBuilder("w", (R, C))
    tiles = (R, -(-C // 32))
    base = b.affine(b.packed("codes", rng.integers(0, 16, (R, C)), 4), bits=4, group_shape=(1, 32),
                    scale=b.tensor("scale", _f16(rng, *tiles)), zero=8.0)
    side = b.lowrank(b.tensor("a", _f16(rng, R, 8)), b.tensor("b", rng.standard_normal((8, C)).astype(np.float32)))
    return b.finish(b.sum([base, side]))


def residual_tree():
    """Two 2-bit affine stages plus outliers, summed left to right."""
    rng = _rng("residual")
    b = RecordBuilder("w", (R, C))
    stages = [b.affine(b.packed(f"q{i}", rng.integers(0, 4, (R, C)), 2), bits=2, group_shape=(R, C),
                       scale=b.tensor(f"s{i}", _f16(rng, R, 1)[:1, :1]), zero=1.5) for i in range(2)]
    dense = np.where(rng.random((R, C)) < 0.01, 1.0, 0).astype(np.float32)
    return b.finish(b.sum([*stages, b.sparse_from_dense("outliers", dense)]))


def nf4_double_quant_tree():
    """scale(lut(packed 4, NF4 table), absmax quantized to 8 bits per 256 blocks)."""
    rng = _rng("nf4")
    b = RecordBuilder("w", (R, C))
    table = np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)
    blocks = (R, -(-C // 64))
    absmax = b.affine(b.packed("absmax.q", rng.integers(0, 256, blocks), 8), bits=8, group_shape=(R, C),
                      scale=b.tensor("absmax.s", np.array([[0.01]], dtype=np.float32)), zero=-3.0)
    node = b.scale(b.lut(b.packed("codes", rng.integers(0, 16, (R, C)), 4), b.tensor("table", table)), absmax,
                   group_shape=(1, 64))
    return b.finish(node)


def lut_tiled_tree():
    """A per-tile learned codebook [Gr, Gc, T] of 8 entries over 8 x 100 tiles (codes: 3 bits)."""
    rng = _rng("luttile")
    b = RecordBuilder("w", (R, C))
    table = rng.standard_normal((R // 8, 2, 8)).astype(np.float16)
    node = b.lut(b.packed("codes", rng.integers(0, 8, (R, C)), 3), b.tensor("table", table), group_shape=(8, 100))
    return b.finish(node)


def vq_tree(d: int, m: int, code_bits: int, int_codes: bool = False):
    """Additive codebooks [m, 2**code_bits, d], with an AQLM-style per-row scale."""
    rng = _rng(f"vq{d}{m}{code_bits}{int_codes}")
    cols = C - C % d
    b = RecordBuilder("w", (R, cols))
    books = b.tensor("books", _f16(rng, m, 1 << code_bits, d))
    q = rng.integers(0, 1 << code_bits, (R, cols // d * m))
    codes = b.tensor("codes", q.astype(np.uint16)) if int_codes else b.packed("codes", q, code_bits)
    node = b.scale(b.vq(codes, books), b.tensor("row_scale", np.abs(_f16(rng, R, 1))), group_shape=(1, cols))
    return b.finish(node)


def bitplanes_tree(bits: int, lut: bool):
    rng = _rng(f"planes{bits}{lut}")
    b = RecordBuilder("w", (R, C))
    planes = b.bitplanes("codes", rng.integers(0, 1 << bits, (R, C)), bits)
    if lut:
        return b.finish(b.lut(planes, b.tensor("table", rng.standard_normal(1 << bits).astype(np.float32))))
    tiles = (-(-R // 4), -(-C // 128))
    return b.finish(b.affine(planes, bits=bits, group_shape=(4, 128), scale=b.tensor("scale", _f16(rng, *tiles)),
                             zero=b.tensor("zero", _f16(rng, *tiles))))


def ternary_tree():
    rng = _rng("ternary")
    b = RecordBuilder("w", (R, C))
    node = b.scale(b.ternary("trits", rng.integers(-1, 2, (R, C))), b.tensor("scale", np.abs(_f16(rng, R, 1))),
                   group_shape=(1, C))
    return b.finish(node)


def bf16_params_tree():
    """Scales exact in bf16 but not in fp16 (tiny powers of two): held as bf16 on the device."""
    rng = _rng("bf16")
    b = RecordBuilder("w", (R, C))
    tiles = (R, -(-C // 64))
    scale = (2.0 ** rng.integers(-40, -30, tiles)).astype(np.float32)
    node = b.affine(b.packed("codes", rng.integers(0, 16, (R, C)), 4), bits=4, group_shape=(1, 64),
                    scale=b.tensor("scale", scale), zero=7.0)
    return b.finish(node)


def int_codes_tree():
    """8-bit codes stored as a plain U8 tensor, one per-tensor scale, per-column (input-channel) factor."""
    rng = _rng("intcodes")
    b = RecordBuilder("w", (R, C))
    inner = b.affine(b.tensor("codes", rng.integers(0, 256, (R, C)).astype(np.uint8)), bits=8, group_shape=(1, 1),
                     scale=0.004, zero=b.tensor("zero", np.array([[127.5]], dtype=np.float32)))
    return b.finish(b.scale(inner, b.tensor("in_scale", np.abs(_f16(rng, 1, C)) + 0.5), group_shape=(R, 1)))


def offset_tree(bits: int, offset: str, zero: bool = False, factor: bool = False, group: int = 32):
    """Affine version 2 (GGUF Q4_1-like d * q + m): groups of 32 over 200 columns (the last has 8), the offset an
    fp16 tensor, a constant or a nested node (6-bit mins times a negated dmin, as the K-quants' - dmin * mn)."""
    rng = _rng(f"offset{bits}{offset}{zero}{factor}{group}")
    b = RecordBuilder("w", (R, C))
    tiles = (R, -(-C // group))
    if offset == "tensor":
        value = b.tensor("m", _f16(rng, *tiles))
    elif offset == "number":
        value = -0.375
    else:
        neg_dmin = b.tensor("m.neg_dmin", -np.abs(_f16(rng, 1, 1)))
        value = b.scale(b.packed("m.q", rng.integers(0, 64, tiles), 6), neg_dmin, group_shape=tiles)
    zeros = b.tensor("zero", rng.integers(0, 1 << bits, tiles).astype(np.float16)) if zero else None
    node = b.affine(b.packed("codes", rng.integers(0, 1 << bits, (R, C)), bits), bits=bits, group_shape=(1, group),
                    scale=b.tensor("d", _f16(rng, *tiles)), zero=zeros, offset=value)
    if factor:
        node = b.scale(node, b.tensor("row", np.abs(_f16(rng, R, 1)) + 0.5), group_shape=(1, C))
    return b.finish(node)


TREES = {
    **{f"affine_w{bits}": (lambda bits=bits: affine_tree(bits)) for bits in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)},
    "affine_w4_g32": lambda: affine_tree(4, group=32),
    "affine_w3_per_row": lambda: affine_tree(3, group=C),
    "second_level_stats": second_level_tree,
    "act_order": act_order_tree,
    "outliers": outliers_tree,
    "lowrank_sidecar": lowrank_tree,
    "residual": residual_tree,
    "nf4_double_quant": nf4_double_quant_tree,
    "lut_per_tile": lut_tiled_tree,
    "vq_aqlm_2x8_d8": lambda: vq_tree(8, 2, 8),
    "vq_1x12_d6": lambda: vq_tree(6, 1, 12),
    "vq_u16_tensor_codes": lambda: vq_tree(4, 1, 10, int_codes=True),
    "bitplanes_affine_w3": lambda: bitplanes_tree(3, lut=False),
    "bitplanes_lut_w5": lambda: bitplanes_tree(5, lut=True),
    "ternary": ternary_tree,
    "int_codes": int_codes_tree,
    "bf16_params": bf16_params_tree,
    "affine_offset_w4_g32": lambda: offset_tree(4, "tensor"),
    "affine_offset_w8_g32_zero": lambda: offset_tree(8, "tensor", zero=True),
    "affine_offset_w4_constant": lambda: offset_tree(4, "number", zero=True),
    "affine_offset_w8_constant": lambda: offset_tree(8, "number"),
    "affine_offset_w4_node_row_scale": lambda: offset_tree(4, "node", factor=True),
    "affine_offset_w8_node_g24": lambda: offset_tree(8, "node", group=24),
}
EXACT = {name for name in TREES if name != "lowrank_sidecar"}  # matrix products may round in any order


def _check_matmul(prepared, reference: np.ndarray, batch: int, dtype: torch.dtype = torch.float32,
                  rtol: float = RTOL) -> None:
    x = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, reference.shape[1]))
                         .astype(np.float32)).to(dtype)
    y = prepared.matmul(x.to(DEVICE)).cpu()
    assert y.dtype == dtype and tuple(y.shape) == (batch, reference.shape[0])
    xs = x.float().numpy().astype(np.float64)
    expected = xs @ reference.T.astype(np.float64)
    bound = rtol * (np.abs(xs) @ np.abs(reference.T).astype(np.float64)) + 1e-30
    err = np.abs(y.float().numpy() - expected) / bound
    assert err.max() <= 1, f"batch {batch}: error {err.max():.2f}x the bound"


@pytest.mark.parametrize("name", sorted(TREES))
def test_tree_matches_reference(name: str) -> None:
    qt = TREES[name]()
    assert KERNEL.supports(qt.record), signature(qt.record["weight"])
    reference = qt.decode().reshape(qt.record["shape"][0], -1)
    prepared = KERNEL.prepare(qt, DEVICE)
    assert (prepared.out_features, prepared.in_features) == reference.shape
    weight = prepared.dequantize().cpu().numpy()
    if name in EXACT:
        np.testing.assert_array_equal(weight, reference)
    else:
        np.testing.assert_allclose(weight, reference, rtol=1e-6, atol=1e-6)
    for batch in (1, 4):
        _check_matmul(prepared, reference, batch)
    # packed data (padded to whole words, statistics expanded), never a full-precision copy
    assert 0 < prepared.nbytes() <= 2 * qt.record["storage_bytes"]
    if name == "bf16_params":
        assert prepared.root.tensors[1].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    """fp16/bf16 x: the GEMV accumulates in fp32; the batched path feeds tl.dot in x's dtype."""
    qt = affine_tree(4)
    reference = qt.decode()
    prepared = KERNEL.prepare(qt, DEVICE)
    for batch in (1, 4):
        _check_matmul(prepared, reference, batch, dtype, rtol=1e-2)


def test_leading_dims_and_large_batch() -> None:
    qt = act_order_tree()
    reference = qt.decode()
    prepared = KERNEL.prepare(qt, DEVICE)
    x = torch.randn(2, 3, C)
    np.testing.assert_allclose(prepared.matmul(x.to(DEVICE)).cpu().numpy(), x.numpy() @ reference.T, rtol=1e-4,
                               atol=1e-4)
    big = torch.randn(KERNEL.max_batch + 1, C)  # above max_batch: dequantize once, dense matmul
    np.testing.assert_allclose(prepared.matmul(big.to(DEVICE)).cpu().numpy(), big.numpy() @ reference.T, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_frozen_gemv_launch(split_k: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode fast path: a fixed configuration bound once; one K split stores y in x's dtype directly."""
    import triton
    from qformat_kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_RUNNER_OK", None)
    qt = affine_tree(4)
    reference = qt.decode()
    prepared = KERNEL.prepare(qt, DEVICE)
    frozen = triton_ops.FrozenGemv(prepared.root, triton.Config({"BN": 16, "BK": 64, "SPLIT_K": split_k},
                                                                 num_warps=4, num_stages=2))
    assert frozen.direct == (split_k == 1) and frozen.out_dtype(dtype) == (dtype if split_k == 1 else torch.float32)
    for _ in range(2):  # the second call may take the compiled kernel's own launcher (on a GPU)
        x = torch.randn(1, C, dtype=dtype)
        y = frozen(x.to(DEVICE))
        assert y.dtype == dtype and y.shape == (1, R)
        expected = x.double().numpy() @ reference.T.astype(np.float64)
        np.testing.assert_allclose(y.double().cpu().numpy(), expected, rtol=2e-2 if dtype == torch.float16 else 1e-4,
                                   atol=2e-2 if dtype == torch.float16 else 1e-4)
    # the prepared weight itself switches to a frozen launch only on a GPU, after its first autotuned call
    x = torch.randn(1, 1, C)
    prepared.matmul(x.to(DEVICE))
    assert (prepared._gemv is not None) == ON_GPU
    np.testing.assert_allclose(prepared.matmul(x.to(DEVICE)).cpu().numpy()[0], x.numpy()[0] @ reference.T,
                               rtol=1e-4, atol=1e-4)


# The GPU's autotuned configurations take code paths the interpreter's single large block never does: split-K with
# atomic adds, several K steps, row blocks inside one scale tile, column blocks inside one group, vq vectors
# spanning blocks. Run a few such configurations explicitly.
SMALL_CONFIGS = [{"BN": 8, "BK": 64, "SPLIT_K": 1}, {"BN": 16, "BK": 32, "SPLIT_K": 4}, {"BN": 32, "BK": 128, "SPLIT_K": 2}]
CONFIG_TREES = ["affine_w3", "act_order", "second_level_stats", "nf4_double_quant", "lut_per_tile", "vq_aqlm_2x8_d8",
                "vq_1x12_d6", "bitplanes_affine_w3", "int_codes", "residual", "affine_offset_w8_g32_zero",
                "affine_offset_w4_node_row_scale", "affine_offset_w8_node_g24"]


@pytest.mark.parametrize("name", CONFIG_TREES)
def test_autotune_configurations(name: str) -> None:
    qt = TREES[name]()
    reference = qt.decode()
    prepared = KERNEL.prepare(qt, DEVICE)
    for config in SMALL_CONFIGS:
        prepared.config = config
        np.testing.assert_array_equal(prepared.dequantize().cpu().numpy(), reference)
        for batch in (1, 4):
            _check_matmul(prepared, reference, batch)


def test_autotuner_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU launch path (triton.autotune: pruning, grids from the tuned meta, y restored after every trial),
    driven under the interpreter with a stand-in timer that makes the last surviving configuration win."""
    from qformat_kernels import triton_ops as ops

    trials: list[int] = []

    def later_is_faster(kernel_call, quantiles):
        kernel_call()
        trials.append(1)
        return [1.0 / len(trials)] * len(quantiles)

    qt = affine_tree(4, cols=1024)  # K long enough that split-K configurations survive pruning
    reference = qt.decode()
    prepared = KERNEL.prepare(qt, DEVICE)
    monkeypatch.setattr(ops, "gemv_tuned", ops.autotuned(ops.gemv_kernel, later_is_faster))
    monkeypatch.setattr(ops, "matmul_tuned", ops.autotuned(ops.matmul_kernel, later_is_faster))
    monkeypatch.setattr(ops, "INTERPRET", False)  # launch as on a GPU: through the autotuners
    for batch in (1, 4):
        _check_matmul(prepared, reference, batch)
    assert ops.gemv_tuned.best_config.kwargs["SPLIT_K"] > 1 and ops.matmul_tuned.best_config.kwargs["SPLIT_K"] > 1
    assert len(trials) > 4


# ---------------------------------------------------------------------------------------------------------------
# layout, support and data checks

@pytest.mark.parametrize("bits", range(1, 17))
def test_sliced_layout_round_trips(bits: int) -> None:
    q = np.random.default_rng(bits).integers(0, 1 << bits, (5, 77))
    codes = triton_plan.sliced_from_packed(bitpack.pack_codes(q, bits), bits, 77)
    np.testing.assert_array_equal(triton_plan.unslice(codes), q)
    assert codes.words.nbytes == 5 * codes.padded_cols * bits // 8  # exactly b bits per (padded) code
    planar = triton_plan.sliced_from_planes(bitpack.pack_bitplanes(q, bits), 77)
    np.testing.assert_array_equal(triton_plan.unslice(planar), q)


def test_padding_policy() -> None:
    kp = triton_plan._padded_cols
    assert kp(4096) == 4096 and kp(4000) == 4096 and kp(576) == 576 and kp(200) == 224 and kp(11008) == 11008


def test_supports_only_what_it_handles() -> None:
    b = RecordBuilder("w", (8, 16))
    sign = b.packed("sign", np.ones((8, 16), dtype=np.int64), 1)
    bitstack = b.finish(b.sign_lowrank(sign, b.tensor("u", np.ones((8, 2), np.float32)),
                                       b.tensor("v", np.ones((2, 16), np.float32))))
    assert not KERNEL.supports(bitstack.record)
    assert KERNEL.why_unsupported(bitstack.record) == "weight: sign_lowrank"
    b = RecordBuilder("w", (8, 16))
    rows = b.tensor("rows", np.ones((8, 1), np.float32))
    over_sum = b.finish(b.scale(b.sum([b.ternary(f"t{i}", np.ones((8, 16), np.int64)) for i in range(2)]), rows,
                                group_shape=(1, 16)))
    assert KERNEL.why_unsupported(over_sum.record) == \
        "weight: a scale over sum (only directly over one code or codebook term)"
    dense = RecordBuilder("w", (8, 16))
    assert not KERNEL.supports(dense.finish(dense.tensor("dense", np.ones((8, 16), np.float32))).record)
    nested = {"codec": "scale", "version": 1, "input": {"codec": "scale", "version": 1}, "factor": 1.0,
              "group_shape": [1, 1]}
    assert not KERNEL.supports({"weight": nested})
    future = dict(affine_tree(4).record)
    future["weight"] = {**future["weight"], "version": 3}
    assert not KERNEL.supports(future)
    assert all(KERNEL.supports(make().record) for make in TREES.values())
    assert all(KERNEL.why_unsupported(make().record) is None for make in TREES.values())


def test_rejects_what_the_reference_rejects() -> None:
    qt = affine_tree(5, rows=4, cols=201)  # 1005 bits a row: 3 padding bits in the last byte
    codes_key = qt.record["weight"]["codes"]["tensor"]
    qt.tensors[codes_key] = qt.tensors[codes_key].copy()
    qt.tensors[codes_key][:, -1] |= 0x80  # a padding bit
    with pytest.raises(FormatError) as ref:
        qt.decode()
    with pytest.raises(FormatError) as ours:
        KERNEL.prepare(qt, DEVICE)
    assert ours.value.code == ref.value.code == "nonzero_padding"
    assert ours.value.field == ref.value.field == "weight/codes/tensor"

    qt = act_order_tree()
    perm_key = qt.record["weight"]["perm"]
    qt.tensors[perm_key] = qt.tensors[perm_key].copy()
    qt.tensors[perm_key][0] = qt.tensors[perm_key][1]
    with pytest.raises(FormatError) as ref:
        qt.decode()
    with pytest.raises(FormatError) as ours:
        KERNEL.prepare(qt, DEVICE)
    assert ours.value.code == ref.value.code == "bad_permutation"
    assert ours.value.field == ref.value.field == "weight/perm"


def test_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        TritonKernel().prepare(affine_tree(2), "cpu")


def test_registered_through_the_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from qformat.plugins import build_plugins

    monkeypatch.setenv("QFORMAT_PLUGINS", "triton_kernels")
    plugins = build_plugins()
    assert plugins.info["triton_kernels"].error is None
    kernel = plugins.kernels["triton"]
    assert isinstance(kernel, TritonKernel) and kernel.device == "cuda"


# ---------------------------------------------------------------------------------------------------------------
# conformance vectors

def _vectors() -> tuple[Path, list[dict]]:
    from qformat_conformance import runner

    manifest = runner.load_manifest()
    return Path(manifest["_dir"]), manifest["vectors"]


def test_conformance_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's kernel check (dequantize and matmul with 1 and 3 rows) on every valid vector, plus exact
    equality of dequantize wherever the vector demands it. On a GPU without autotuning: timing ~10 launch
    configurations for each of 40 codec signatures takes minutes; test_autotune_configurations covers those."""
    from qformat_conformance import runner
    from qformat_kernels import triton_ops

    monkeypatch.setattr(triton_ops, "AUTOTUNE", False)

    folder, vectors = _vectors()
    failures, passed = [], 0
    for entry in vectors:
        result = runner.check_kernel(KERNEL, entry, folder, rtol=1e-4)
        if result.status == runner.FAIL:
            failures.append(f"{entry['id']}: {result.got} {result.detail}")
        passed += result.status == runner.PASS
        if result.status == runner.PASS and entry.get("tolerance", 0) == 0:
            qfile = open_file(folder / entry["file"])
            for name in qfile.records:
                if KERNEL.supports(qfile.records[name]):
                    expected = qfile.decode(name).reshape(qfile.records[name]["shape"][0], -1)
                    got = KERNEL.prepare(qfile.quantized(name), DEVICE).dequantize().cpu().numpy()
                    if not np.array_equal(got, expected):
                        failures.append(f"{entry['id']}/{name}: dequantize is not bit-exact")
            qfile.close()
    assert not failures, failures
    assert passed >= 40


def test_conformance_decode_errors() -> None:
    """Invalid vectors whose problem only data shows: prepare refuses them with the reference's error code."""
    folder, vectors = _vectors()
    checked = 0
    for entry in vectors:
        if entry["kind"] != "invalid" or entry["error"]["stage"] != "decode":
            continue
        qfile = open_file(folder / entry["file"])
        for name, record in qfile.records.items():
            if not KERNEL.supports(record):
                continue
            with pytest.raises(FormatError) as caught:
                KERNEL.prepare(qfile.quantized(name), DEVICE).dequantize()
            with pytest.raises(FormatError) as reference:
                qfile.decode(name)
            assert caught.value.code == entry["error"]["code"], entry["id"]
            assert caught.value.field == reference.value.field, entry["id"]
            checked += 1
        qfile.close()
    assert checked >= 8


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for the GPU (no GPU needed)

def test_kernels_compile_for_sm90() -> None:
    """Lower a representative set of kernels to sm_90 machine code; fail on errors or register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = ("import json; from qformat_kernels import triton_aot as a\n"
            "print(json.dumps([a.usage(a.compile_for(k, c, m)) for k, c, m in a.REPRESENTATIVE]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(u["stack"] == 0 for u in usage), usage
    assert all(u["registers"] <= 255 for u in usage)
