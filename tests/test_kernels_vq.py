"""vq version 2 (vectors spanning p output rows) through the lowering and the Numba kernels.

What must hold: every valid ``vq`` conformance vector runs through the Numba kernels (``x @ W.T`` within the kernel
tolerance at batches 1 and 3, ``dequantize()`` bit-exact where the vector is exact); a real VPTQ record (the plugin on
a small random weight: residual codebook, per-column norm, several vector lengths) and random records of any [p, d]
tile under row, column and grid scales match the reference decoder; VPTQ's [v, 1] takes the column kernel (direct or
histogram form); the Triton kernels refuse version 2 cleanly (the dispatcher then falls back). Version 1 (AQLM): the
code-byte table path and the direct path match the reference decoder too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_kernels import method_trees, triton_plan
from qformat_kernels.numba_plugin import NumbaKernel
from qformat_kernels.numba_prepared import VqTerm, VqTileTerm
from qformat_plugins.vptq import VPTQ

from qformat import lowering
from qformat.format import QuantizedTensor, RecordBuilder, open_file
from qformat.methods import LayerInput
from qformat.testing import check_kernel

NUMBA = NumbaKernel()


def _tile_terms(qt: QuantizedTensor) -> list[VqTileTerm]:
    prepared = NUMBA.prepare(qt)
    return [t for _, terms in prepared.groups for t in terms if isinstance(t, VqTileTerm)]


def test_conformance_vq_vectors() -> None:
    from qformat_conformance import runner

    manifest = runner.load_manifest()
    folder = Path(manifest["_dir"])
    entries = [e for e in manifest["vectors"] if e["kind"] == "valid" and e["id"].startswith("vq")]
    assert sum(e["id"].startswith("vq_v2") for e in entries) >= 3
    for entry in entries:
        result = runner.check_kernel(NUMBA, entry, folder, rtol=1e-4)
        assert result.status == runner.PASS, (entry["id"], result.got, result.detail)
        if entry.get("tolerance", 0) == 0:
            qfile = open_file(folder / entry["file"])
            for name, record in qfile.records.items():
                expected = qfile.decode(name).reshape(record["shape"][0], -1)
                assert np.array_equal(NUMBA.prepare(qfile.quantized(name)).dequantize().numpy(), expected), name
            qfile.close()


@pytest.mark.parametrize("params", [
    {"codebook_size": 64, "residual_codebook_size": 16, "norm": True},
    {"vector_len": 12, "codebook_size": 100, "residual_codebook_size": 3, "norm": True},
    {"vector_len": 16, "codebook_size": 32},
])
def test_vptq_records(params: dict) -> None:
    rng = np.random.default_rng(7)
    rows, cols = 48, 96
    weight = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    layer = LayerInput("x.weight", weight, "F32", torch.eye(cols))
    qt = VPTQ().run(layer, {"kmeans_iters": 2, **params}).qt
    assert NUMBA.supports(qt.record) and triton_plan.why_unsupported(qt.record) is not None
    assert check_kernel(NUMBA, [qt], batches=(1, 3)).checked == 2
    assert np.array_equal(NUMBA.prepare(qt).dequantize().numpy(), qt.decode())  # the same sums, in order
    terms = _tile_terms(qt)
    assert len(terms) == 1 + bool(params.get("residual_codebook_size")) and all(t.column for t in terms)
    # 96 codes per code row: the histogram form for 64 and 32 entries, the direct form for 128 (100 padded)
    assert terms[0].histogram == (params["codebook_size"] != 100)


def _random_vq(rng: np.random.Generator, rows: int, cols: int, tile: tuple[int, int], books_n: int, entries: int
               ) -> tuple[RecordBuilder, dict]:
    p, d = tile
    b = RecordBuilder("w", (rows, cols), "BF16")
    codes = b.packed("codes", rng.integers(0, entries, (rows // p, cols // d * books_n)), max(1, (entries - 1)
                                                                                            .bit_length()))
    books = b.tensor("books", rng.standard_normal((books_n, entries, p * d)).astype(np.float16))
    return b, b.vq(codes, books, vector_shape=tile)


@pytest.mark.parametrize("tile,books_n", [((8, 1), 1), ((4, 1), 2), ((2, 4), 2), ((20, 1), 1), ((3, 2), 1)])
def test_random_tiles_under_row_and_column_scales(tile: tuple[int, int], books_n: int) -> None:
    rng = np.random.default_rng(sum(tile) + books_n)
    rows, cols = 60 if tile[0] != 8 else 64, 48
    b, node = _random_vq(rng, rows, cols, tile, books_n, 32)
    row = b.scale(node, b.tensor("row", (rng.random((rows, 1)) + 0.5).astype(np.float16)), (1, cols))
    qt = b.finish(b.scale(row, b.tensor("norm", (rng.random((1, cols)) + 0.5).astype(np.float16)), (rows, 1)))
    assert check_kernel(NUMBA, [qt], batches=(1, 3)).checked == 2
    (term,) = _tile_terms(qt)
    assert term.column == (tile[1] == 1 and tile[0] <= 16)


def test_grid_scale_splitting_tiles_takes_the_general_kernel() -> None:
    rng = np.random.default_rng(3)
    rows, cols = 32, 40
    b, node = _random_vq(rng, rows, cols, (4, 1), 2, 16)
    qt = b.finish(b.scale(node, b.tensor("grid", (rng.random((16, 4)) + 0.5).astype(np.float32)), (2, 10)))
    assert check_kernel(NUMBA, [qt], batches=(1, 2)).checked == 2
    (term,) = _tile_terms(qt)
    assert not term.column


def test_lowering_of_version_2() -> None:
    rng = np.random.default_rng(4)
    b, node = _random_vq(rng, 16, 8, (8, 1), 1, 4)
    qt = b.finish(node)
    (term,) = lowering.lower(qt).terms
    assert term.kind == "vq" and term.vector_rows == 8 and term.books.shape == (1, 4, 8)
    assert term.codes.values().shape == (2, 8)
    b, node = _random_vq(rng, 16, 8, (1, 4), 1, 4)  # vector_shape [1, d] in version 2 decodes as version 1
    node["version"], node["vector_shape"] = 2, [1, 4]
    assert lowering.plan(b.finish(node).record).terms[0].vector_rows == 1
    record = {"shape": [4, 8], "weight": {"codec": "vq", "version": 2, "vector_shape": [2]}}
    with pytest.raises(lowering.Unsupported, match=r"weight: vector_shape \[2\]"):
        lowering.plan(record)
    assert triton_plan.why_unsupported(qt.record) == "weight: vq vectors across 8 rows (version 2)"


# ---------------------------------------------------------------------------------------------------------------
# version 1 (AQLM): which path each record takes, each against the reference decoder

def _vq_term(qt: QuantizedTensor) -> VqTerm:
    (term,) = [t for _, terms in NUMBA.prepare(qt).groups for t in terms]
    return term


@pytest.mark.parametrize("books_n,bits,rows,cols", [(2, 8, 256, 40), (1, 8, 256, 64), (2, 4, 16, 24)])
def test_code_bytes_path(books_n: int, bits: int, rows: int, cols: int) -> None:
    """Codes of <= 8 bits under a row scale, rows >= entries: the per-call table read a code byte at a time (code
    bytes per row 10, 8 and 6: padded to whole words or not)."""
    qt = method_trees.aqlm(rows, cols, seed=bits, books_n=books_n, bits=bits)
    assert _vq_term(qt).words is not None
    assert check_kernel(NUMBA, [qt], batches=(1, 3)).checked == 2


def test_direct_rows_path() -> None:
    """AQLM 1x16 (and any codebook larger than the rows) reads the codebooks directly."""
    qt = method_trees.build("aqlm1x16", 24, 64)
    term = _vq_term(qt)
    assert term.direct_rows and term.words is None
    assert check_kernel(NUMBA, [qt], batches=(1, 3)).checked == 2
