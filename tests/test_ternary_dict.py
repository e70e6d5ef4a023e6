"""ternary_dict: QMoE's dictionary-coded ternary stream (codec, encoder, ``qmoe -p stream=true``, Numba kernel).

Reference: IST-DASLab/qmoe is not a package and its encoder and kernel are CUDA; its dictionary construction
(``sub1.py`` ``setup()``: a heap of pair-symbol sequences by probability) is plain Python and is transcribed here to
check ours entry by entry, and its greedy packing (``Sub1PreparePack``) is checked through an independent
longest-match encoder (the conformance generator's). Decoding is checked against the symbols encoded, the kernel
against the reference decode, and a stream record against the same weights stored as 2-bit codes.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from helpers import layer_input
from qformat_conformance.generate import ternary_dict_encode
from qformat_kernels import method_trees
from qformat_kernels.numba_plugin import NumbaKernel
from qformat_plugins.qmoe import QMoE

from qformat.errors import FormatError
from qformat.format import RecordBuilder, ternary_dict
from qformat.testing import check_kernel, check_method, sample_layers

LAYERS = sample_layers(2)


def qmoe_setup_dictionary() -> list[list[int]]:
    """sub1.py setup(), its dictionary part (COUNT = 2**16, ZEROS = .885), as published."""
    count, zeros = 2 ** 16, .885
    probs = [zeros] + [(1 - zeros) / 2] * 2
    pair_probs: list[float] = []

    def gen(prob: float, depth: int) -> None:
        if depth == 0:
            pair_probs.append(prob)
        else:
            for p in probs:
                gen(prob * p, depth - 1)

    gen(1., 2)
    res: list[list[int]] = []
    pq: list[tuple[float, list[int]]] = [(-1., [])]
    while len(res) < count:
        top = heapq.heappop(pq)
        if top[0] != -1.:
            res.append(top[1])
        if len(top[1]) == 14:
            continue
        for i in range(len(pair_probs)):
            heapq.heappush(pq, (top[0] * pair_probs[i], top[1] + [i]))
    return res


def test_dictionary_is_qmoes() -> None:
    symbols, lengths = ternary_dict.dictionary()
    reference = qmoe_setup_dictionary()
    assert all(symbols[i, :lengths[i]].tolist() == seq for i, seq in enumerate(reference))
    assert ternary_dict.digest() == ternary_dict.DICTIONARY_SHA256  # the hash the spec gives


@pytest.mark.parametrize("shape, zeros", [((7, 33), 0.885), ((50, 400), 0.6), ((3, 1), 0.5), ((4, 28), 1.0)])
def test_encoder_is_greedy_longest_match_and_round_trips(shape: tuple[int, int], zeros: float) -> None:
    rng = np.random.default_rng(sum(shape))
    symbols = rng.choice(3, size=shape, p=[zeros, (1 - zeros) / 2, (1 - zeros) / 2])
    words, row_ptr = ternary_dict.encode(symbols)
    expected_words, expected_ptr = ternary_dict_encode(symbols)
    assert np.array_equal(words, expected_words) and np.array_equal(row_ptr, expected_ptr)
    codes, pairs, _ = ternary_dict.expand_rows(words, row_ptr.astype(np.int64), shape[1])
    assert np.array_equal(codes, symbols) and np.all(pairs == -(-shape[1] // 2))
    if zeros == 1.0:  # 28 zeros: fourteen zero pairs are one codeword, the best case (16 bits for 28 weights)
        assert words.size == shape[0]


def test_qmoe_stream_decodes_like_its_two_bit_form_in_fewer_bytes() -> None:
    for sample, expected_bits in zip(LAYERS, (1.43, 1.68), strict=True):
        packed = QMoE().run(layer_input(sample), {})
        stream = QMoE().run(layer_input(sample), {"stream": True})
        assert np.array_equal(stream.qt.decode(), packed.qt.decode())
        assert np.array_equal(stream.qt.decode(), stream.dequantized.numpy())
        assert stream.qt.bits_per_weight == pytest.approx(expected_bits, abs=0.01)  # MiniLM: 79% / 74% zeros
        assert packed.qt.bits_per_weight == pytest.approx(2 + 64 / sample.weight.shape[1])
    check_method(QMoE(), {"stream": True}, layers=LAYERS[:1], max_relative_error=1.3)


def test_numba_kernel_reads_the_stream() -> None:
    kernel = NumbaKernel()
    records = [QMoE().run(layer_input(LAYERS[0]), {"stream": True}).qt, method_trees.build("qmoe_stream", 48, 301)]
    for qt in records:
        assert kernel.why_unsupported(qt.record) is None
    report = check_kernel(kernel, records, batches=(1, 3))
    assert report.checked == 4
    prepared = kernel.prepare(records[1])
    assert prepared.nbytes() < 48 * 301 * 2 / 8 + 48 * 4 * 4  # codewords: below 2 bits per weight


def test_bad_stream_records_are_refused() -> None:
    b = RecordBuilder("x.weight", (1, 4))
    words, ptr = ternary_dict.encode(np.array([[0, 1, 0, 2]]))
    node = b.node("ternary_dict", 1, tensor=b.store("codewords", words), row_ptr=b.store("row_ptr", ptr),
                  shape=[1, 4], dictionary="other")
    with pytest.raises(FormatError, match="dictionary") as info:
        b.finish(b.lut(node, b.tensor("table", np.ones(3, np.float32))))
    assert info.value.code == "bad_field"
    b = RecordBuilder("x.weight", (1, 4))
    node = b.node("ternary_dict", 1, tensor=b.store("codewords", words.astype(np.int16)),
                  row_ptr=b.store("row_ptr", ptr), shape=[1, 4], dictionary="qmoe")
    with pytest.raises(FormatError) as info:
        b.finish(b.lut(node, b.tensor("table", np.ones(3, np.float32))))
    assert info.value.code == "bad_dtype"
    with pytest.raises(ValueError, match="symbols"):
        ternary_dict.encode(np.array([[0, 3]]))
