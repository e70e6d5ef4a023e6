"""QMoE's dictionary for ternary streams (spec/components.md, ``ternary_dict``): 2^16 codewords of 1-14 pair symbols.

A ternary symbol is 0 (zero), 1 (low level) or 2 (high level); a *pair* symbol covers two neighbouring weights,
``p = first + 3 * second`` (0..8). Its probability is ``π[p // 3] * π[p % 3]`` (IEEE binary64) with
``π = (0.885, 0.0575, 0.0575)``, QMoE's assumed ternary statistics; a sequence's is the left-to-right product
``((−1 · P(p_0)) · P(p_1)) · …`` of those. The dictionary is the 65536 sequences of length 1 to 14 with the largest
probability, in decreasing probability, ties in ascending lexicographic order of the sequences; a codeword is an index
into it. This is exactly the table IST-DASLab/qmoe ``sub1.py`` ``setup()`` builds (its heap pops in that order).
"""

from __future__ import annotations

import hashlib
import heapq
from functools import lru_cache

import numpy as np

NAME = "qmoe"
ENTRIES = 1 << 16
MAX_PAIRS = 14
PAIR_SYMBOLS = 9
TERNARY_PROBS = (0.885, (1 - 0.885) / 2, (1 - 0.885) / 2)
# sha256 of symbols.tobytes() + lengths.tobytes() (uint8 [65536, 14] zero padded, uint8 [65536]): spec/components.md
DICTIONARY_SHA256 = "ebb305ef73687e6e38c50050680472cde55dd62061f0bc700174447213cfef2e"
ROOT = ENTRIES  # the trie's root: the row after the codewords


@lru_cache(maxsize=1)
def dictionary() -> tuple[np.ndarray, np.ndarray]:
    """(symbols uint8 [65536, 14], pair symbols of each codeword, zero padded; lengths uint8 [65536])."""
    pair = []
    for i in range(3):  # sub1.py gen(): outer symbol i, inner j -> index 3 i + j, probability probs[i] * probs[j]
        for j in range(3):
            pair.append(TERNARY_PROBS[i] * TERNARY_PROBS[j])
    heap: list[tuple[float, list[int]]] = [(-1.0, [])]
    found: list[list[int]] = []
    while len(found) < ENTRIES:
        prob, seq = heapq.heappop(heap)
        if seq:
            found.append(seq)
        if len(seq) == MAX_PAIRS:
            continue
        for p in range(PAIR_SYMBOLS):
            heapq.heappush(heap, (prob * pair[p], seq + [p]))
    symbols = np.zeros((ENTRIES, MAX_PAIRS), dtype=np.uint8)
    lengths = np.zeros(ENTRIES, dtype=np.uint8)
    for index, seq in enumerate(found):
        symbols[index, :len(seq)] = seq
        lengths[index] = len(seq)
    symbols.setflags(write=False)
    lengths.setflags(write=False)
    return symbols, lengths


def digest() -> str:
    symbols, lengths = dictionary()
    return hashlib.sha256(symbols.tobytes() + lengths.tobytes()).hexdigest()


def expand_rows(codewords: np.ndarray, row_ptr: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int [R, C] in {0, 1, 2}, pairs per row, the second symbol of each row's last pair) of rows whose
    codewords are ``codewords[row_ptr[r]:row_ptr[r + 1]]``; a row whose pair count is not ceil(C / 2) is left
    partly filled: the caller checks ``pairs`` (and, for odd C, that the pad symbols are 0) before using codes."""
    symbols, lengths = dictionary()
    rows = row_ptr.shape[0] - 1
    width = -(-cols // 2)
    cw = codewords.astype(np.int64)
    lens = lengths[cw].astype(np.int64)
    per_row = np.add.reduceat(lens, np.minimum(row_ptr[:-1], max(len(lens) - 1, 0))) if len(lens) else np.zeros(rows)
    per_row = np.where(row_ptr[1:] > row_ptr[:-1], per_row, 0).astype(np.int64)
    out = np.zeros((rows, 2 * width), dtype=np.uint8)
    pad = np.zeros(rows, dtype=np.uint8)
    good = per_row == width
    if good.any() and len(lens):
        mask = np.arange(MAX_PAIRS)[None, :] < lens[:, None]
        stream = symbols[cw][mask]  # every row's pair symbols, rows in order
        starts = np.concatenate([[0], np.cumsum(per_row)])
        for r in np.flatnonzero(good):
            pairs = stream[starts[r]:starts[r + 1]]
            out[r, 0::2] = pairs % 3
            out[r, 1::2] = pairs // 3
            pad[r] = out[r, -1]
    return out[:, :cols], per_row, pad


@lru_cache(maxsize=1)
def trie() -> np.ndarray:
    """int32 [65537, 9]: the codeword extending each codeword (and the root, last row) by one pair symbol, or -1."""
    symbols, lengths = dictionary()
    index = {tuple(symbols[i, :lengths[i]].tolist()): i for i in range(ENTRIES)}
    table = np.full((ROOT + 1, PAIR_SYMBOLS), -1, dtype=np.int32)
    for seq, i in index.items():
        table[ROOT if len(seq) == 1 else index[seq[:-1]], seq[-1]] = i  # every prefix is more probable: present
    table.setflags(write=False)
    return table


def encode(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QMoE's greedy encoding (``Sub1PreparePack``) of symbols [R, C] in {0, 1, 2}: (codewords uint16 [N], row_ptr
    int32 [R + 1] (int64 past 2^31 codewords)). Per row, walk the trie pair by pair; when the next pair does not extend
    the current entry, emit it and restart from that pair; emit the last entry at the row's end. Rows advance in
    lock-step (one vector step per pair position)."""
    symbols = np.asarray(symbols)
    if symbols.ndim != 2 or (symbols.size and (symbols.min() < 0 or symbols.max() > 2)):
        raise ValueError("ternary_dict symbols must be a 2-D array of 0, 1 and 2")
    rows, cols = symbols.shape
    padded = np.zeros((rows, cols + cols % 2), dtype=np.int64)
    padded[:, :cols] = symbols
    pairs = padded[:, 0::2] + 3 * padded[:, 1::2]
    table = trie()
    out = np.zeros((rows, pairs.shape[1] + 1), dtype=np.int64)
    count = np.zeros(rows, dtype=np.int64)
    node = np.full(rows, ROOT, dtype=np.int64)
    every = np.arange(rows)
    for j in range(pairs.shape[1]):
        p = pairs[:, j]
        child = table[node, p].astype(np.int64)
        ends = child < 0
        if ends.any():
            out[every[ends], count[ends]] = node[ends]
            count[ends] += 1
            child[ends] = table[ROOT, p[ends]]
        node = child
    if rows and pairs.shape[1]:
        out[every, count] = node
        count += 1
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(count, out=row_ptr[1:])
    words = out[np.arange(out.shape[1])[None, :] < count[:, None]]
    return words.astype(np.uint16), row_ptr.astype(np.int32 if row_ptr[-1] < 2**31 else np.int64)
