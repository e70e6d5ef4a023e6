"""Calibration data: a text tokenized once, cut into N seeded random windows of L tokens (GPTQ's protocol)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConversionError

if TYPE_CHECKING:  # torch loads when windows are made, not when the CLI reads DEFAULT_SAMPLES
    import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CALIBRATION = DATA_DIR / "calibration.txt"
DEFAULT_EVAL = DATA_DIR / "eval.txt"
# Sized for a 2-core CPU: 64 x 512 = 32k tokens per block forward.
DEFAULT_SAMPLES = 64
DEFAULT_SEQLEN = 512


@dataclass(frozen=True)
class CalibrationText:
    path: Path
    text: str
    sha256: str
    is_default: bool

    @property
    def label(self) -> str:
        return "qformat default (Wikipedia lead sections, CC BY-SA 4.0)" if self.is_default else self.path.name


def read_text(path: str | Path | None) -> CalibrationText:
    """Read a UTF-8 calibration text (the shipped default when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read the calibration text {file}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"the calibration text {file} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ConversionError(f"the calibration text {file} is empty")
    return CalibrationText(file, text, hashlib.sha256(data).hexdigest(), path is None)


# Tokenizing a text in one call costs ~600 bytes of tokenizer state per token (+540 MiB peak for a 3.9 MB text), so
# long texts are tokenized in pieces, cut only where a check around the cut shows that cutting changes no id.
CHUNK_CHARS = 1 << 18
SEAM_CONTEXT = 512  # characters each side of a candidate cut that are tokenized to check it
SEAM_TRIES = 64  # candidate cuts tried before giving up: the rest of the text then goes in one call


def tokenize(tokenizer: Any, text: str, *, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """All token ids of the text without special tokens (1-D int64), exactly as one tokenizer call would give them,
    computed piecewise between :func:`clean_cuts`."""
    import torch

    cuts = clean_cuts(tokenizer, text, chunk_chars)
    pieces = [torch.tensor(_ids(tokenizer, text[a:b]), dtype=torch.long)
              for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def clean_cuts(tokenizer: Any, text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Offsets [0, ..., len(text)] that split the text into pieces of about ``chunk_chars`` whose ids concatenate to
    the whole text's.

    A cut goes after a newline where the ids of the surrounding context equal the ids of its two halves joined.
    Tokenizers that treat a piece's start specially (a SentencePiece dummy prefix) never pass that check; their
    text stays in one piece.
    """
    cuts = [0]
    while len(text) - cuts[-1] > 2 * chunk_chars:
        cut = _clean_cut(tokenizer, text, cuts[-1] + chunk_chars)
        if cut is None:
            break
        cuts.append(cut)
    return cuts + [len(text)]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _clean_cut(tokenizer: Any, text: str, start: int) -> int | None:
    """The first line start at or after ``start`` where cutting the text keeps its ids, or None."""
    newline = start - 2
    for _ in range(SEAM_TRIES):
        newline = text.find("\n", newline + 1)
        if newline < 0 or newline + 1 + SEAM_CONTEXT >= len(text):
            return None
        cut = newline + 1
        left, right = text[max(cut - SEAM_CONTEXT, 0): cut], text[cut: cut + SEAM_CONTEXT]
        if _ids(tokenizer, left + right) == _ids(tokenizer, left) + _ids(tokenizer, right):
            return cut
    return None


def sample_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, *, source: str = "the text") -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seqlen`` tokens at seeded random offsets, shape [samples, seqlen].

    Non-overlapping windows need ``samples * seqlen`` tokens; a shorter text is an error that says by how much.
    """
    if samples < 1 or seqlen < 2:
        raise ConversionError(f"calibration needs at least 1 sample of at least 2 tokens (got {samples} x {seqlen})")
    needed = samples * seqlen
    total = int(ids.numel())
    if total < needed:
        raise ConversionError(f"calibration text too short: {source} has {total:,} tokens, but {samples} samples x "
                              f"{seqlen} tokens need {needed:,}; give a longer --calib text or lower --calib-samples "
                              f"/ --calib-seqlen")
    # Uniform random placement of non-overlapping windows: split the slack into samples+1 random gaps.
    rng = random.Random(seed)
    slack = total - needed
    gaps = sorted(rng.randint(0, slack) for _ in range(samples))
    starts = [gap + k * seqlen for k, gap in enumerate(gaps)]
    import torch

    return torch.stack([ids[s: s + seqlen] for s in starts])
