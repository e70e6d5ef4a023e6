"""Integer codes out of other tools' int32 words, exactly as their readers take them apart (numpy only).

- **Stream** (:func:`stream_codes`): the words of one row read as a little-endian bit stream, code ``i`` at bits
  ``i·b … i·b + b − 1``, straddling word boundaries freely. GPTQ's ``qweight`` (per output column, along the input) and
  ``qzeros`` (per group row, along the outputs) for 2, 3, 4 and 8 bits: AutoGPTQ's 3-bit layout puts codes 0–9 in
  bits 0–29 of word 0, code 10 in its bits 30–31 plus bit 0 of word 1, and so on (``qlinear_cuda.py`` ``pack``; GPTQModel
  ``model_dequant._unpack_rows_3bit``), which is this stream. compressed-tensors' ``pack-quantized`` since 0.18.0
  (``pack_to_int32``: "32 consecutive elements are packed into exactly num_bits int32 words") is the same stream.
- **Padded** (:func:`padded_codes`): compressed-tensors' ``pack-quantized`` before 0.18.0: ``32 // b`` codes per word,
  code ``j`` at bits ``(j mod (32 // b))·b`` of word ``j // (32 // b)``, the word's high bits unused. For b = 1, 2, 4, 8
  both layouts are the same bits.
- **AWQ** (:func:`awq_codes`): AutoAWQ GEMM: eight 4-bit codes per word along the outputs, nibble ``i`` holding output
  ``8·k + AWQ_ORDER[i]`` (``awq/modules/linear/gemm.py`` ``from_linear``; undone by ``reverse_awq_order``).
"""

from __future__ import annotations

import numpy as np

from qformat.format import bitpack

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _words(words: np.ndarray) -> np.ndarray:
    """int32/uint32 words [R, W] as little-endian uint32 (a copy only where the host is big-endian)."""
    return np.ascontiguousarray(words).view(np.uint32).astype("<u4", copy=False)


def stream_codes(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes uint8/uint16 [R, count] of each row's words [R, W] read as one LSB-first bit stream."""
    data = _words(words).view(np.uint8).reshape(words.shape[0], -1)
    return bitpack.unpack_codes(data, bits, count, dtype=bitpack.code_dtype(bits))


def padded_codes(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes [R, count] with ``32 // bits`` codes per word (compressed-tensors < 0.18 ``pack_to_int32``)."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    codes = (_words(words)[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :count].astype(bitpack.code_dtype(bits))


def stream_words(count: int, bits: int) -> int:
    """int32 words a row of ``count`` codes takes in the stream layout."""
    return -(-count * bits // 32)


def padded_words(count: int, bits: int) -> int:
    return -(-count // (32 // bits))


def awq_codes(words: np.ndarray) -> np.ndarray:
    """AWQ GEMM words [R, W] -> 4-bit codes uint8 [R, 8·W] in output order."""
    nibbles = (_words(words)[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & np.uint32(0xF)
    codes = np.empty(nibbles.shape, dtype=np.uint8)
    codes[:, :, list(AWQ_ORDER)] = nibbles  # nibble i holds output 8k + AWQ_ORDER[i]
    return codes.reshape(words.shape[0], -1)
