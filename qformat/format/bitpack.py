"""Bit-level layouts of the spec (spec/components.md): packed codes, bit-planes, ternary bytes.

Every layout packs each row independently so a kernel can start any row at a byte boundary.
Bits are little-endian: bit k of a row's stream is bit (k % 8) of byte k // 8, and a code's least
significant bit comes first.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

TRITS_PER_BYTE = 5
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer codes [R, C] of width ``bits`` (1..16) into uint8 [R, ceil(C*bits/8)]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: [{codes.min()}, {codes.max()}]")
    rows, cols = codes.shape
    if bits == 8:
        return codes.astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint32)
    bit_matrix = ((codes.astype(np.uint32)[..., None] >> shifts) & 1).astype(np.uint8).reshape(rows, cols * bits)
    return np.packbits(bit_matrix, axis=1, bitorder="little")


def code_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned dtype that holds ``bits``-bit codes (the reference decoder's working type)."""
    return np.dtype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


def unpack_codes(packed: np.ndarray, bits: int, cols: int, dtype: DTypeLike = np.int64) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 [R, row_bytes] -> codes [R, cols] (int64 unless ``dtype`` says otherwise).

    Works at about one byte per code plus the result: a 4096 x 14336 matrix must not need gigabytes of bit matrices.
    """
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    if bits == 8:
        codes = packed[:, :cols].copy()  # never a view of the stored tensor
    elif 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, LSB first
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        codes = ((packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(rows, -1)[:, :cols]
    else:  # a code spans at most 3 bytes (shift <= 7, width <= 16): gather them into a 32-bit window
        start = np.arange(cols, dtype=np.int64) * bits
        first, shift = start // 8, (start % 8).astype(np.uint32)
        padded = np.zeros((rows, packed.shape[1] + 2), dtype=np.uint8)
        padded[:, :packed.shape[1]] = packed
        window = np.take(padded, first, axis=1).astype(np.uint32)  # take: C order, unlike padded[:, first]
        window |= np.take(padded, first + 1, axis=1).astype(np.uint32) << 8
        if bits > 9:  # shift + bits > 16 is possible: the code reaches into a third byte
            window |= np.take(padded, first + 2, axis=1).astype(np.uint32) << 16
        codes = (window >> shift) & np.uint32((1 << bits) - 1)
    return np.ascontiguousarray(codes, dtype=dtype)


def padding_bits_are_zero(packed: np.ndarray, bits: int, cols: int) -> bool:
    """Whether the unused bits after each row's last code are zero, as the spec requires."""
    used = cols * bits
    if used % 8 == 0 or packed.shape[1] == 0:
        return True
    last = np.asarray(packed[:, -1], dtype=np.uint8)
    return not np.any(last >> (used % 8))


def pack_bitplanes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [R, C] -> uint8 [bits, R, ceil(C/8)]; plane 0 holds the most significant bit."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    planes = [pack_codes((codes >> (bits - 1 - p)) & 1, 1) for p in range(bits)]
    return np.stack(planes)


def unpack_bitplanes(planes: np.ndarray, cols: int, use_planes: int | None = None,
                     dtype: DTypeLike = np.int64) -> np.ndarray:
    """Rebuild codes from the first ``use_planes`` planes; dropped low bits decode to the middle of their interval."""
    bits = planes.shape[0]
    keep = bits if use_planes is None else use_planes
    if not 1 <= keep <= bits:
        raise ValueError(f"use_planes must be in 1..{bits}, got {use_planes}")
    work = code_dtype(bits)
    codes = np.zeros((planes.shape[1], cols), dtype=work)
    for p in range(keep):
        codes |= unpack_codes(planes[p], 1, cols, work) << work.type(bits - 1 - p)
    if keep < bits:
        codes |= work.type(1 << (bits - keep - 1))
    return codes if codes.dtype == np.dtype(dtype) else codes.astype(dtype)


def pack_ternary(values: np.ndarray) -> np.ndarray:
    """Values in {-1, 0, +1} [R, C] -> uint8 [R, ceil(C/5)], byte = sum_i (v_i + 1) * 3**i; pad digits are 0."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"ternary values must be 2-D, got shape {values.shape}")
    if values.size and (values.min() < -1 or values.max() > 1):
        raise ValueError("ternary values must be -1, 0 or +1")
    rows, cols = values.shape
    nbytes = (cols + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE
    digits = np.zeros((rows, nbytes * TRITS_PER_BYTE), dtype=np.uint8)
    digits[:, :cols] = (values + 1).astype(np.uint8)
    return (digits.reshape(rows, nbytes, TRITS_PER_BYTE) * _POW3).sum(axis=2, dtype=np.uint8)


def unpack_ternary(packed: np.ndarray, cols: int) -> tuple[np.ndarray, bool]:
    """uint8 [R, nbytes] -> (int8 values [R, cols], whether every byte and pad digit is valid)."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows, nbytes = packed.shape
    digits = (packed[..., None] // _POW3) % 3
    digits = digits.reshape(rows, nbytes * TRITS_PER_BYTE)
    valid = bool(np.all(packed < 243)) and not np.any(digits[:, cols:])
    return digits[:, :cols].astype(np.int8) - 1, valid
