"""Text for calibration and evaluation: the shipped default texts, reading a UTF-8 file with errors that name it,
and tokenizing a long text exactly as one tokenizer call would, in less memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QformatError, shorten

if TYPE_CHECKING:  # torch loads when a text is tokenized, not when the CLI reads a default
    import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION = DATA_DIR / "calibration.txt"
DEFAULT_EVAL = DATA_DIR / "eval.txt"


class TextFileError(QformatError):
    """An evaluation text cannot be used: missing, unreadable, or not UTF-8 text."""


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents; a missing, unreadable or binary file is a :class:`TextFileError` naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TextFileError(f"cannot read the text file {shorten(path)}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextFileError(f"{shorten(path)} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} "
                            "cannot be decoded); give a UTF-8 text file") from None
    if "\0" in text:
        raise TextFileError(f"{shorten(path)} contains NUL bytes, so it is binary, not text; give a UTF-8 text file")
    return text


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


