"""Bit layouts (spec/components.md): packed codes, bit-planes and ternary bytes, byte for byte and at the edges."""

from __future__ import annotations

import numpy as np
import pytest

from qformat.format import bitpack


def naive_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The spec's definition, bit by bit: stream bit k is bit k % 8 of byte k // 8, each code LSB first."""
    rows, cols = codes.shape
    out = np.zeros((rows, (cols * bits + 7) // 8), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            for i in range(bits):
                k = c * bits + i
                out[r, k // 8] |= ((int(codes[r, c]) >> i) & 1) << (k % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("cols", [1, 3, 7, 8, 13])
def test_pack_matches_spec_definition_and_round_trips(bits, cols, rng):
    codes = rng.integers(0, 1 << bits, size=(3, cols))
    codes[0, 0], codes[-1, -1] = 0, (1 << bits) - 1
    packed = bitpack.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, bitpack.packed_row_bytes(cols, bits))
    np.testing.assert_array_equal(packed, naive_pack(codes, bits))
    np.testing.assert_array_equal(bitpack.unpack_codes(packed, bits, cols), codes)
    assert bitpack.padding_bits_are_zero(packed, bits, cols)
    narrow = bitpack.unpack_codes(packed, bits, cols, bitpack.code_dtype(bits))  # what the reference decoder uses
    assert narrow.dtype == (np.uint8 if bits <= 8 else np.uint16) and narrow.flags.c_contiguous
    np.testing.assert_array_equal(narrow, codes)
    planes = bitpack.pack_bitplanes(codes, bits)
    for keep in {1, bits}:
        wide = bitpack.unpack_bitplanes(planes, cols, keep)
        assert wide.dtype == np.int64
        np.testing.assert_array_equal(bitpack.unpack_bitplanes(planes, cols, keep, bitpack.code_dtype(bits)), wide)


def test_known_bytes():
    # 3-bit codes 1, 2, 3, 4, 5: stream 100 010 110 001 101 (LSB first) -> bytes 0xd1, 0x58 (one padding bit)
    np.testing.assert_array_equal(bitpack.pack_codes(np.array([[1, 2, 3, 4, 5]]), 3), [[0xD1, 0x58]])
    # 4-bit: the first code is the low nibble
    np.testing.assert_array_equal(bitpack.pack_codes(np.array([[0x1, 0xF, 0x7]]), 4), [[0xF1, 0x07]])
    # 12-bit: 0xABC then 0x123 -> bc 3a 12
    np.testing.assert_array_equal(bitpack.pack_codes(np.array([[0xABC, 0x123]]), 12), [[0xBC, 0x3A, 0x12]])


def test_each_row_starts_on_a_byte():
    packed = bitpack.pack_codes(np.array([[1], [1]]), 1)
    np.testing.assert_array_equal(packed, [[1], [1]])


@pytest.mark.parametrize("bits,cols", [(3, 5), (1, 9), (5, 3), (7, 1), (12, 1), (15, 3)])
def test_padding_check_catches_every_padding_bit(bits, cols):
    packed = bitpack.pack_codes(np.zeros((2, cols), dtype=np.int64), bits)
    used = cols * bits
    for bit in range(used % 8, 8):
        dirty = packed.copy()
        dirty[1, -1] |= 1 << bit
        assert not bitpack.padding_bits_are_zero(dirty, bits, cols)
    assert bitpack.padding_bits_are_zero(packed, bits, cols)


def test_padding_check_without_padding():
    packed = np.full((2, 3), 0xFF, dtype=np.uint8)
    assert bitpack.padding_bits_are_zero(packed, 8, 3)
    assert bitpack.padding_bits_are_zero(packed, 4, 6)


@pytest.mark.parametrize("bad", [(np.array([[4]]), 2), (np.array([[-1]]), 3), (np.zeros((2, 2)), 0),
                                 (np.zeros((2, 2)), 17), (np.zeros(3), 4)])
def test_pack_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bitpack.pack_codes(*bad)


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 16])
def test_bitplanes_layout_and_truncation(bits, rng):
    codes = rng.integers(0, 1 << bits, size=(3, 11))
    planes = bitpack.pack_bitplanes(codes, bits)
    assert planes.shape == (bits, 3, 2)
    # plane 0 is the most significant bit, packed as a 1-bit row
    np.testing.assert_array_equal(planes[0], bitpack.pack_codes((codes >> (bits - 1)) & 1, 1))
    np.testing.assert_array_equal(bitpack.unpack_bitplanes(planes, 11), codes)
    for keep in range(1, bits):
        dropped = bits - keep
        expected = ((codes >> dropped) << dropped) | (1 << (dropped - 1))
        np.testing.assert_array_equal(bitpack.unpack_bitplanes(planes, 11, keep), expected)
    with pytest.raises(ValueError):
        bitpack.unpack_bitplanes(planes, 11, bits + 1)


def test_ternary_bytes():
    # digits (v + 1) in base 3, first value least significant: [-1, 0, 1, 1, -1] -> 0 + 1*3 + 2*9 + 2*27 + 0*81 = 75
    np.testing.assert_array_equal(bitpack.pack_ternary(np.array([[-1, 0, 1, 1, -1]])), [[75]])
    # 6 values need 2 bytes; the pad digits of the second byte are 0
    values = np.array([[1, 1, 1, 1, 1, 0]])
    packed = bitpack.pack_ternary(values)
    np.testing.assert_array_equal(packed, [[242, 1]])
    decoded, valid = bitpack.unpack_ternary(packed, 6)
    assert valid
    np.testing.assert_array_equal(decoded, values)


@pytest.mark.parametrize("cols", [1, 4, 5, 6, 23])
def test_ternary_round_trip_and_validity(cols, rng):
    values = rng.integers(-1, 2, size=(4, cols))
    packed = bitpack.pack_ternary(values)
    decoded, valid = bitpack.unpack_ternary(packed, cols)
    assert valid and decoded.dtype == np.int8
    np.testing.assert_array_equal(decoded, values)
    too_big = packed.copy()
    too_big[0, 0] = 243
    assert not bitpack.unpack_ternary(too_big, cols)[1]
    if cols % 5:
        pad = packed.copy()
        pad[1, -1] += 81  # the last digit of the last byte is always padding here
        assert not bitpack.unpack_ternary(pad, cols)[1]


def test_ternary_rejects_out_of_range():
    with pytest.raises(ValueError):
        bitpack.pack_ternary(np.array([[2]]))
